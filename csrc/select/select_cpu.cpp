// CPU kernels of the select family (the ops topk, select and select_mask): indices
// (ascending) of the k largest scores of one tensor, of each tensor of a list, or of
// the concatenation of a list, or per tensor a bool mask of them. The work is the
// Selector's (select/selector_cpu.h), and for a mask a band from its sample.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common/claims.h"
#include "common/flat_blocks.h"
#include "fused/scans_cpu.h"
#include "select/band_kth_cpu.h"
#include "select/mask_scans_cpu.h"
#include "select/select_checks.h"
#include "select/selector_cpu.h"

namespace incrkern {
namespace {

using namespace incrkern::select;

// ---------------------------------------------------------------------------------
// Ops

bool needs_wide_keys(const std::vector<Source>& srcs) {
  for (const Source& s : srcs)
    if (s.score != ScoreKind::Random && (s.dtype == at::kDouble || s.res_dtype == at::kDouble))
      return true;
  return false;
}

std::vector<at::Tensor> run_selection(std::vector<Source> srcs, int64_t k, bool approx) {
  if (needs_wide_keys(srcs)) return Selector<uint64_t>(std::move(srcs), k, approx).run();
  return Selector<uint32_t>(std::move(srcs), k, approx).run();
}

void check_cpu_dtype(const char* op, const char* name, size_t i, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble, op,
              ": ", name, "[", i, "] must be float32, bfloat16, float16 or float64, got ", d);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
              ", expected the CPU");
}

at::Tensor topk_cpu(const at::Tensor& x, int64_t k, bool approx) {
  check_cpu_dtype("incrkern.topk", "x", 0, x);
  TORCH_CHECK(k >= 0 && k <= x.numel(), "incrkern.topk: k must be in [0, ", x.numel(),
              "], got ", k);
  const at::Tensor xc = x.contiguous();
  Source s{ScoreKind::Signed, xc.scalar_type(), xc.data_ptr(), at::kFloat, nullptr, {}, xc.numel(), 0};
  return run_selection({s}, k, approx)[0];
}

// The Sources of a select call's tensors, its arguments checked first; `keep` holds
// the contiguous copies they read.
std::vector<Source> checked_sources(const char* op, at::TensorList tensors, at::IntArrayRef ks,
                                    c10::string_view score, bool global_scope,
                                    at::TensorList residuals, at::TensorList weights,
                                    int64_t seed, std::vector<at::Tensor>& keep) {
  const SelectArgs a = check_select_args(op, tensors, ks, std::string(score), global_scope,
                                         residuals, weights);
  std::vector<Source> srcs;
  keep.reserve(2 * tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& data_t = a.score == "weight" ? weights[i] : tensors[i];
    check_cpu_dtype(op, a.score == "weight" ? "weights" : "tensors", i, data_t);
    Source s{a.kind, data_t.scalar_type(), nullptr, at::kFloat, nullptr, {}, tensors[i].numel(), 0};
    if (a.kind != ScoreKind::Random) {
      keep.push_back(data_t.contiguous());
      s.data = keep.back().data_ptr();
    }
    if (a.kind == ScoreKind::Accumulated) {
      keep.push_back(residuals[i].contiguous());
      s.res = keep.back().data_ptr();
      s.res_dtype = residuals[i].scalar_type();
    }
    s.rk = random_keys(seed, int64_t(i));
    srcs.push_back(s);
  }
  return srcs;
}

std::vector<at::Tensor> select_cpu(at::TensorList tensors, at::IntArrayRef ks, c10::string_view score,
                                   bool global_scope, bool approx, at::TensorList residuals,
                                   at::TensorList weights, int64_t seed) {
  std::vector<at::Tensor> keep;  // contiguous inputs, alive until the end
  std::vector<Source> srcs = checked_sources("incrkern.select", tensors, ks, score, global_scope,
                                             residuals, weights, seed, keep);
  if (global_scope) {
    int64_t pos = 0;
    for (Source& s : srcs) s.pos0 = pos, pos += s.n;
    return run_selection(srcs, ks[0], approx);
  }
  std::vector<at::Tensor> outs(srcs.size());
  // Small tensors side by side, one thread each; large ones one after another,
  // each over every thread.
  std::vector<int64_t> small, large;
  for (size_t i = 0; i < srcs.size(); ++i)
    (one_thread_selection(srcs[i].n, ks[i]) ? small : large).push_back(int64_t(i));
  parallel_for_claimed(0, int64_t(small.size()), 8, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t i = small[j];
      outs[i] = run_selection({srcs[i]}, ks[i], approx)[0];
    }
  });
  for (int64_t i : large) outs[i] = run_selection({srcs[i]}, ks[i], approx)[0];
  return outs;
}


// ---------------------------------------------------------------------------------
// select_mask: per tensor (or over the concatenation: scope="global"), its chosen
// elements as a bool mask. A band [lo, hi] on the k-th key from the Selector's sample;
// one pass per block counts the keys above it and keeps those inside it (keys equal to
// lo only counted: a gradient or a Fisher of mostly zeros puts its k-th among them); the
// k-th found among the kept keys; a second pass marks every key above the k-th and each
// block's share of its ties, lowest positions first. Two reads of the scores and one
// write of a byte per element, where the positions of a dense selection cost 8 bytes
// each to write and merge. A band that misses, and float64 scores, mark the positions
// select chooses.

constexpr int64_t kMaskBlock = int64_t(1) << 16;
// Tensors of up to this many elements are marked one thread each, side by side: the
// second pass then finds most of the tensor in the last-level cache, and the passes of
// a few blocks are not split unevenly over the threads.
constexpr int64_t kMaskOneThread = int64_t(1) << 21;

// Calls fn(x, kSigned) with the data of a source the vector scans read (|x| or x of
// fp32, bf16 or fp16) and returns true; false for any other.
template <typename Fn>
bool with_scanned(const Source& s, Fn&& fn) {
  if ((s.score != ScoreKind::Abs && s.score != ScoreKind::Signed) ||
      (s.dtype != at::kFloat && s.dtype != at::kBFloat16 && s.dtype != at::kHalf))
    return false;
  with_dtype<uint32_t>(s.dtype, [&](auto t) {
    using T = decltype(t);
    const T* x = static_cast<const T*>(s.data);
    if (s.score == ScoreKind::Signed) fn(x, std::true_type{});
    else fn(x, std::false_type{});
  });
  return true;
}

// fn(keys, i, len) over [b, e) a chunk at a time: the "random" score's keys of
// elements [i, i + len).
constexpr int64_t kKeyChunk = 4096;

template <typename Fn>
void random_chunks(const Source& s, int64_t b, int64_t e, Fn&& fn) {
  uint32_t keys[kKeyChunk];
  for (int64_t i = b; i < e; i += kKeyChunk) {
    const int64_t len = std::min(kKeyChunk, e - i);
    random_keys(s.rk.kt, s.rk.kt2, i, len, keys);
    fn(keys, i, len);
  }
}

// The counting pass over [b, e) into o.
void count_band(const Source& s, int64_t b, int64_t e, uint32_t lo, uint32_t hi, BandBlock& o) {
  const uint32_t width = hi - lo;
  const auto keep = [&](uint32_t key) { keep_band_key(key, lo, o); };
  if (s.score == ScoreKind::Random) {
    uint32_t kept[kKeyChunk + 8];
    random_chunks(s, b, e, [&](const uint32_t* keys, int64_t, int64_t len) {
      uint32_t* end = kept;
      o.above += keys_in_band(keys, len, lo, hi, end);
      for (const uint32_t* k = kept; k < end; ++k) keep(*k);
    });
    return;
  }
  const bool scanned = with_scanned(s, [&](const auto* x, auto is_signed) {
    constexpr bool kSigned = decltype(is_signed)::value;
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
    const int32_t lo_gt = order_greater_than<kSigned>(lo);
    const int32_t hi_gt = order_greater_than<kSigned>(uint64_t(hi) + 1);
    uint32_t keys[kKeyChunk + 8];
    for (int64_t i = b; i < e; i += kKeyChunk) {
      uint32_t* end = keys;
      o.above += fused::band_keys<T, kSigned>(x + i, std::min(kKeyChunk, e - i), lo_gt, hi_gt,
                                              end);
      for (const uint32_t* k = keys; k < end; ++k) keep(*k);
    }
  });
  if (scanned) return;
  with_reader<uint32_t>(s, [&](const auto& rd) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t key = rd(i);
      o.above += key > hi;
      if (key - lo <= width) keep(key);
    }
  });
}

// out[i - b] = key(i) >= at_least over [b, e).
void mark_at_least(const Source& s, int64_t b, int64_t e, uint64_t at_least, bool* out) {
  if (at_least == 0 || at_least > 0xffffffffu) {
    std::memset(out, at_least == 0, size_t(e - b));
    return;
  }
  const bool scanned = with_scanned(s, [&](const auto* x, auto is_signed) {
    constexpr bool kSigned = decltype(is_signed)::value;
    mark_orders<kSigned>(x + b, e - b, order_greater_than<kSigned>(at_least), out);
  });
  if (scanned) return;
  const uint32_t gt = uint32_t(at_least - 1);
  if (s.score == ScoreKind::Random) {
    random_chunks(s, b, e, [&](const uint32_t* keys, int64_t i, int64_t len) {
      mark_keys(keys, len, gt, out + (i - b));
    });
    return;
  }
  with_reader<uint32_t>(s, [&](const auto& rd) {
    for (int64_t i = b; i < e; ++i) *out++ = rd(i) > gt;
  });
}

// out[i - b] over [b, e): keys above tie, and the first `ties` keys equal to it.
template <typename Reader>
void mark_some_ties(const Reader& rd, int64_t b, int64_t e, uint32_t tie, int64_t ties,
                    bool* out) {
  for (int64_t i = b; i < e; ++i) {
    const uint32_t key = rd(i);
    out[i - b] = key > tie || (key == tie && ties-- > 0);
  }
}

// masks set at the positions select chooses among srcs (one tensor, or the
// concatenation of several: scope="global"), cleared elsewhere.
void mark_positions(const std::vector<Source>& srcs, int64_t k, std::vector<at::Tensor>& masks) {
  const std::vector<at::Tensor> chosen = run_selection(srcs, k, false);
  for (size_t i = 0; i < masks.size(); ++i) masks[i].zero_().index_fill_(0, chosen[i], true);
}

// The k largest keys of srcs marked in masks (srcs[i]'s in masks[i]), ties to the lowest
// position in the concatenation: the band, the counting pass over every source's
// blocks, the k-th among the kept keys, the marking pass.
void mark_chosen(const std::vector<Source>& srcs, int64_t k, std::vector<at::Tensor>& masks) {
  const std::vector<int64_t> first =
      flat_block_starts(srcs.size(), kMaskBlock, [&](size_t i) { return srcs[i].n; });
  int64_t n = 0;
  for (const Source& s : srcs) n += s.n;
  if (k == 0 || k == n) {
    for (at::Tensor& m : masks) std::memset(m.data_ptr<bool>(), k == n, size_t(m.numel()));
    return;
  }
  if (needs_wide_keys(srcs)) return mark_positions(srcs, k, masks);
  const auto [lo, hi] = Selector<uint32_t>(srcs, k, false).band();
  const int64_t nblocks = first.back();
  std::vector<BandBlock> blocks(static_cast<size_t>(nblocks));
  // fn(source, its block's first element, end, the block) for the flat blocks [b0, b1).
  const auto each_block = [&](int64_t b0, int64_t b1, auto&& fn) {
    each_flat_block(first, kMaskBlock, b0, b1, [&](size_t i, int64_t b, int64_t bi) {
      fn(i, b, std::min(srcs[i].n, b + kMaskBlock), blocks[size_t(bi)]);
    });
  };
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    each_block(b0, b1, [&](size_t i, int64_t b, int64_t e, BandBlock& o) {
      count_band(srcs[i], b, e, lo, hi, o);
    });
  });
  int64_t above = 0, in_band = 0;
  for (const BandBlock& o : blocks)
    above += o.above, in_band += int64_t(o.keys.size()) + o.at_lo;
  if (above > k || above + in_band < k) return mark_positions(srcs, k, masks);
  const auto [at_least, tie] = choose_in_band(blocks, k - above, lo, hi);
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    each_block(b0, b1, [&](size_t i, int64_t b, int64_t e, const BandBlock& o) {
      bool* out = masks[i].data_ptr<bool>();
      if (o.ties == 0 || o.ties == o.equal) {
        mark_at_least(srcs[i], b, e, o.ties > 0 ? tie : at_least, out + b);
        return;
      }
      with_reader<uint32_t>(srcs[i], [&](const auto& rd) {
        mark_some_ties(rd, b, e, tie, o.ties, out + b);
      });
    });
  });
}

void select_mask_cpu(at::TensorList masks, at::TensorList tensors, at::IntArrayRef ks,
                     c10::string_view score, at::TensorList residuals, at::TensorList weights,
                     int64_t seed, bool global_scope) {
  const char* op = "incrkern.select_mask_";
  std::vector<at::Tensor> keep;
  std::vector<Source> srcs =
      checked_sources(op, tensors, ks, score, global_scope, residuals, weights, seed, keep);
  TORCH_CHECK(masks.size() == tensors.size(), op, ": masks has ", masks.size(),
              " entries, expected ", tensors.size());
  std::vector<at::Tensor> outs(masks.begin(), masks.end());
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor& m = outs[i];
    TORCH_CHECK(m.scalar_type() == at::kBool && m.device().is_cpu() && m.is_contiguous() &&
                    m.numel() == tensors[i].numel(),
                op, ": masks[", i, "] must be a contiguous CPU bool tensor of ",
                tensors[i].numel(), " elements, got ", m.scalar_type(), " ", m.sizes(), " on ",
                m.device(), m.is_contiguous() ? "" : " (not contiguous)");
  }
  if (global_scope) {  // one selection over the concatenation, its blocks over every thread
    int64_t pos = 0;
    for (Source& s : srcs) s.pos0 = pos, pos += s.n;
    return mark_chosen(srcs, ks[0], outs);
  }
  // Tensors of up to kMaskOneThread side by side, one thread each; larger ones one
  // after another, each over every thread.
  std::vector<int64_t> small, large;
  for (size_t i = 0; i < srcs.size(); ++i)
    (srcs[i].n <= kMaskOneThread ? small : large).push_back(int64_t(i));
  const auto mark_one = [&](int64_t i) {
    std::vector<at::Tensor> out{outs[size_t(i)]};
    mark_chosen({srcs[size_t(i)]}, ks[i], out);
  };
  parallel_for_claimed(0, int64_t(small.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) mark_one(small[j]);
  });
  for (int64_t i : large) mark_one(i);
}
}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("select", &select_cpu);
  m.impl("select_mask_", &select_mask_cpu);
}

}  // namespace incrkern
