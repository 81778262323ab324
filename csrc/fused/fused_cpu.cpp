// CPU kernel of adam_select_update_: per tensor, the k largest |grad| (or, with
// error feedback, |residual + grad|) chosen and Adam applied to them in one call,
// the same result as select(score="grad", scope="tensor") then adam_update_ at the
// positions it returns, without the int64 positions written and read back.
//
//  - Small tensors (up to kBlock elements), one thread each: the Selector (exact,
//    one read), then the chosen elements updated while the tensor is in L2.
//  - Large tensors, the tile-fused stream: a band [L, H] on the k-th key from the
//    Selector's sample; (exact mode) a count pass proves that the keys > H
//    ("winners") are among the k largest and the k-th lies in the band; then one
//    pass compares each 16-element tile's keys with L and H, updates every tile
//    holding a winner as a whole (the rule on all lanes, blended by the winner
//    mask, unchosen lanes written back bit-identical) and keeps the band's
//    (key, position) candidates; the (k - #winners)-th candidate, ties to the
//    lowest position, closes the answer. Nothing is updated before it is known
//    to be chosen. A band that misses (exact mode) falls back to select + update.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/rules.h"
#include "select/selector_cpu.h"
#include "update/adam_stream_cpu.h"
#include "update/update_checks.h"

namespace incrkern {
namespace {

using namespace incrkern::select;

constexpr int64_t kChunkTiles = 256;   // tiles per scan of the fused pass (4K elements)
constexpr int64_t kDenseGrain = 1 << 15;
constexpr int64_t kTileAhead = 8;      // listed tiles prefetched ahead of the update

// 8 mask bits as 8 bytes (0 or 1): the byte mask the streaming loop reads.
struct ByteMasks {
  uint64_t of[256];
  constexpr ByteMasks() : of{} {
    for (int m = 0; m < 256; ++m)
      for (int j = 0; j < 8; ++j)
        if ((m >> j) & 1) of[m] |= uint64_t(1) << (8 * j);
  }
};
inline constexpr ByteMasks kByteMasks{};

// The listed tiles (first element starts[j], chosen lanes masks[j]) updated as
// wholes by the masked streaming loop; consume zeroes the chosen lanes of g.
template <typename T, typename G, typename M>
[[gnu::always_inline]] inline void adam_tiles(T* p, G* g, M* m, M* v, bool consume,
                                              const int64_t* starts, const uint32_t* masks,
                                              int64_t n, const AdamHyper<M> h,
                                              const M step_size, const M bc2_sqrt,
                                              const M grad_scale) {
  // A tile's p, m and v lines are requested kTileAhead listed tiles early: at low
  // density the listed tiles are far apart and each would wait on memory.
  auto fetch = [&](int64_t s) {
    __builtin_prefetch(p + s, 0, 1);
    __builtin_prefetch(m + s, 0, 1);
    __builtin_prefetch(v + s, 0, 1);
  };
  for (int64_t j = 0; j < std::min(n, kTileAhead); ++j) fetch(starts[j]);
  for (int64_t j = 0; j < n; ++j) {
    if (j + kTileAhead < n) fetch(starts[j + kTileAhead]);
    const int64_t s = starts[j];
    const uint64_t bytes[2] = {kByteMasks.of[masks[j] & 0xffu], kByteMasks.of[(masks[j] >> 8) & 0xffu]};
    const bool* mask = reinterpret_cast<const bool*>(bytes);
    if (consume)
      adam_stream<T, G, M, true, true>(p + s, g + s, m + s, v + s, mask, 0, kTile, h, step_size,
                                       bc2_sqrt, grad_scale);
    else
      adam_stream<T, G, M, true, false>(p + s, g + s, m + s, v + s, mask, 0, kTile, h, step_size,
                                        bc2_sqrt, grad_scale);
  }
}

// The fp32 form for each ISA, as update_cpu.cpp's streaming loops.
IK_ISA_CLONES void adam_tiles_f32(float* p, float* g, float* m, float* v, bool consume,
                                  const int64_t* starts, const uint32_t* masks, int64_t n,
                                  const AdamHyper<float> h, const float step_size,
                                  const float bc2_sqrt, const float grad_scale) {
  adam_tiles<float, float, float>(p, g, m, v, consume, starts, masks, n, h, step_size, bc2_sqrt,
                                  grad_scale);
}

// Per tile of x: bit j of the low 16 bits set when key j >= lo (order > lo_gt),
// of the high 16 when key j > hi (order > hi_gt); |x| keys (select_keys.h).
#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,f16c"))) void tile_masks_avx2(const T* x, int64_t tiles, int32_t lo_gt,
                                                          int32_t hi_gt, uint32_t* masks) {
  const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
  for (int64_t t = 0; t < tiles; ++t) {
    const T* q = x + t * kTile;
    const __m256i a = order8_avx2<T, false>(q), b = order8_avx2<T, false>(q + 8);
    masks[t] = gt_mask16(a, b, lo) | (gt_mask16(a, b, hi) << 16);
  }
}
#endif

template <typename T>
void tile_masks(const T* x, int64_t tiles, int32_t lo_gt, int32_t hi_gt, uint32_t* masks) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return tile_masks_avx2<T>(x, tiles, lo_gt, hi_gt, masks);
#endif
  for (int64_t t = 0; t < tiles; ++t) {
    uint32_t ml = 0, mh = 0;
    for (int j = 0; j < kTile; ++j) {
      const int32_t order = order_at<false>(x, t * kTile + j);
      ml |= uint32_t(order > lo_gt) << j;
      mh |= uint32_t(order > hi_gt) << j;
    }
    masks[t] = ml | (mh << 16);
  }
}

// One param's tensors and constants. With a residual r (error feedback), the
// gradient the rule reads is u = r + g, kept in r; a chosen element's r becomes 0.
template <typename T>
struct AdamTensor {
  using M = at::opmath_type<T>;
  T* p;
  const T* g;
  M* m;
  M* v;
  M* r;  // null without error feedback
  AdamHyper<M> h;
  M step_size, bc2_sqrt, grad_scale;

  // The update of element e alone.
  void one(int64_t e) const {
    M pm = M(p[e]);
    M gm;
    if (r) {
      gm = r[e] * grad_scale;
      r[e] = M(0);
    } else {
      gm = M(g[e]) * grad_scale;
    }
    adam_rule(pm, gm, m[e], v[e], h, step_size, bc2_sqrt);
    p[e] = T(pm);
  }

  // r = r + g over [b, e), as accumulate_ with alpha 1 computes it.
  void add_residual(int64_t b, int64_t e) const {
    for (int64_t i = b; i < e; ++i) r[i] = r[i] + M(1) * M(g[i]);
  }

  // Every element of [b, e) updated.
  void dense(int64_t b, int64_t e) const {
    if (r) add_residual(b, e);
    if constexpr (std::is_same_v<T, float>)
      adam_stream_f32(p, r ? r : const_cast<T*>(g), m, v, nullptr, r != nullptr, b, e, h,
                      step_size, bc2_sqrt, grad_scale);
    else if (r)
      adam_stream_any<T, M, M>(p, r, m, v, nullptr, true, b, e, h, step_size, bc2_sqrt,
                               grad_scale);
    else
      adam_stream_any<T, T, M>(p, const_cast<T*>(g), m, v, nullptr, false, b, e, h, step_size,
                               bc2_sqrt, grad_scale);
  }

  void tiles(const int64_t* starts, const uint32_t* masks, int64_t n) const {
    if constexpr (std::is_same_v<T, float>)
      adam_tiles_f32(p, r ? r : const_cast<T*>(g), m, v, r != nullptr, starts, masks, n, h,
                     step_size, bc2_sqrt, grad_scale);
    else if (r)
      adam_tiles<T, M, M>(p, r, m, v, true, starts, masks, n, h, step_size, bc2_sqrt, grad_scale);
    else
      adam_tiles<T, T, M>(p, const_cast<T*>(g), m, v, false, starts, masks, n, h, step_size,
                          bc2_sqrt, grad_scale);
  }

  // The key of element e (after add_residual, with a residual).
  uint32_t key(int64_t e) const {
    return abs_key32(r ? float(r[e]) : float(g[e]));
  }
};

// What a call shares: its tensors (for the positional fallback) and its constants.
struct Call {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps, residuals;
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
  bool decoupled_weight_decay, maximize, approx;
};

// The positions' update by the adam_update_ op (prefetching, spread over threads):
// for a large tensor's chosen candidates and its fallback. With a residual it reads
// the residual (already r + g) as the gradient and zeroes what it read.
void update_positions(const Call& c, size_t i, const at::Tensor& pos) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("incrkern::adam_update_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                      double, double, double, double, bool, bool, double, bool, bool,
                      const std::optional<at::Tensor>&, bool)>();
  const bool ef = !c.residuals.empty();
  const at::Tensor& g = ef ? c.residuals[i] : c.grads[i];
  op.call({c.params[i]}, {g}, {c.exp_avgs[i]}, {c.exp_avg_sqs[i]}, {c.steps[i]}, {pos}, {}, {},
          c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled_weight_decay, c.maximize,
          c.grad_scale, ef, false, std::nullopt, false);
}

Source source_of(const Call& c, size_t i) {
  const at::Tensor& g = c.grads[i];
  const bool ef = !c.residuals.empty();
  return Source{ef ? ScoreKind::Accumulated : ScoreKind::Abs,
                g.scalar_type(),
                g.data_ptr(),
                ef ? c.residuals[i].scalar_type() : at::kFloat,
                ef ? c.residuals[i].data_ptr() : nullptr,
                {},
                g.numel(),
                0};
}

at::Tensor select_positions(const Source& s, int64_t k, bool approx) {
  if (s.dtype == at::kDouble) return Selector<uint64_t>({s}, k, approx).run()[0];
  return Selector<uint32_t>({s}, k, approx).run()[0];
}

// A small tensor, on the calling thread: the Selector, then its positions updated.
template <typename T>
int64_t run_small(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k) {
  const int64_t n = c.params[i].numel();
  if (k == n) {
    t.dense(0, n);
    return n;
  }
  at::Tensor pos;
  if (k > 0) pos = select_positions(source_of(c, i), k, c.approx);  // reads r + g itself
  if (t.r) t.add_residual(0, n);
  if (k == 0) return 0;
  const int64_t* q = pos.data_ptr<int64_t>();
  for (int64_t j = 0; j < pos.numel(); ++j) t.one(q[j]);
  return pos.numel();
}

// A large tensor whose band missed: select, then the positional update.
template <typename T>
int64_t run_fallback(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k) {
  const at::Tensor pos = select_positions(source_of(c, i), k, c.approx);
  if (t.r)
    at::parallel_for(0, c.params[i].numel(), kDenseGrain,
                     [&](int64_t b, int64_t e) { t.add_residual(b, e); });
  update_positions(c, i, pos);
  return pos.numel();
}

// Per block of the fused pass: its winners' count and its candidates in position order.
struct BlockOut {
  int64_t winners = 0, band = 0;
  std::vector<uint32_t> ckey;
  std::vector<int64_t> cpos;
};

bool forced_fallback() { return std::getenv("INCRKERN_FUSED_FALLBACK") != nullptr; }

// A large tensor of 32-bit keys (0 < k < n): the band, the count pass (exact), the
// fused pass, the resolve. Returns the count updated.
template <typename T>
int64_t run_band(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k) {
  const int64_t n = c.params[i].numel();
  Selector<uint32_t> sel({source_of(c, i)}, k, c.approx);
  const auto band = sel.sample_band();
  if (!band || forced_fallback()) return run_fallback(c, i, t, k);
  const uint32_t lo = band->first, hi = band->second;
  const int32_t lo_gt = order_greater_than<false>(lo);
  const int32_t hi_gt = order_greater_than<false>(uint64_t(hi) + 1);
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<BlockOut> out(static_cast<size_t>(nblocks));

  // Calls tile_masks on the keys of the chunk [b, b + 16 * tiles): g itself, or the
  // residual sum (r + g) either in r (written) or in scratch (count pass).
  auto chunk_masks = [&](int64_t b, int64_t tiles, bool write_residual, float* scratch,
                         uint32_t* masks) {
    if (!t.r) return tile_masks(t.g + b, tiles, lo_gt, hi_gt, masks);
    if (write_residual) {
      t.add_residual(b, b + tiles * kTile);
      return tile_masks(t.r + b, tiles, lo_gt, hi_gt, masks);
    }
    for (int64_t e = 0; e < tiles * kTile; ++e) scratch[e] = t.r[b + e] + float(t.g[b + e]);
    tile_masks(static_cast<const float*>(scratch), tiles, lo_gt, hi_gt, masks);
  };
  auto tail_key = [&](int64_t e, bool write_residual) {
    if (!t.r) return t.key(e);
    const float u = t.r[e] + float(t.g[e]);
    if (write_residual) t.r[e] = u;
    return abs_key32(u);
  };

  if (!c.approx) {
    // The count pass: no writes. The fused pass may update the winners at once only
    // when they are at most k and the band holds the k-th key.
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      uint32_t masks[kChunkTiles];
      std::vector<float> scratch(t.r ? size_t(kChunkTiles * kTile) : 0);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t begin = bi * kBlock, end = std::min(n, begin + kBlock);
        const int64_t whole = begin + (end - begin) / kTile * kTile;
        int64_t w = 0, cnt = 0;
        for (int64_t e = begin; e < whole; e += kChunkTiles * kTile) {
          const int64_t tiles = std::min(kChunkTiles, (whole - e) / kTile);
          chunk_masks(e, tiles, false, scratch.data(), masks);
          for (int64_t j = 0; j < tiles; ++j) {
            const uint32_t mh = masks[j] >> 16;
            w += __builtin_popcount(mh);
            cnt += __builtin_popcount(masks[j] & 0xffffu & ~mh);
          }
        }
        for (int64_t e = whole; e < end; ++e) {
          const uint32_t key = tail_key(e, false);
          w += key > hi;
          cnt += key >= lo && key <= hi;
        }
        out[bi].winners = w;
        out[bi].band = cnt;
      }
    });
    int64_t w = 0, cnt = 0;
    for (const BlockOut& o : out) w += o.winners, cnt += o.band;
    if (!(w <= k && k <= w + cnt)) return run_fallback(c, i, t, k);
  }

  // The fused pass.
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    uint32_t masks[kChunkTiles], wmask[kChunkTiles], cmask[kChunkTiles];
    int64_t wstart[kChunkTiles], cstart[kChunkTiles];
    for (int64_t bi = b0; bi < b1; ++bi) {
      BlockOut& o = out[bi];
      o.winners = 0;
      const int64_t begin = bi * kBlock, end = std::min(n, begin + kBlock);
      const int64_t whole = begin + (end - begin) / kTile * kTile;
      for (int64_t e = begin; e < whole; e += kChunkTiles * kTile) {
        const int64_t tiles = std::min(kChunkTiles, (whole - e) / kTile);
        chunk_masks(e, tiles, true, nullptr, masks);
        // The tiles holding a winner, and those holding a candidate, listed without
        // a branch that depends on the data.
        int64_t nw = 0, nc = 0;
        for (int64_t j = 0; j < tiles; ++j) {
          const uint32_t mh = masks[j] >> 16, mc = masks[j] & 0xffffu & ~mh;
          wstart[nw] = e + j * kTile;
          wmask[nw] = mh;
          nw += mh != 0;
          cstart[nc] = e + j * kTile;
          cmask[nc] = mc;
          nc += mc != 0;
        }
        for (int64_t j = 0; j < nw; ++j) o.winners += __builtin_popcount(wmask[j]);
        t.tiles(wstart, wmask, nw);
        for (int64_t j = 0; j < nc; ++j)
          for (uint32_t mc = cmask[j]; mc; mc &= mc - 1) {
            const int64_t q = cstart[j] + __builtin_ctz(mc);
            o.ckey.push_back(t.key(q));
            o.cpos.push_back(q);
          }
      }
      for (int64_t e = whole; e < end; ++e) {
        const uint32_t key = tail_key(e, true);
        if (key > hi) {
          t.one(e);
          ++o.winners;
        } else if (key >= lo) {
          o.ckey.push_back(key);
          o.cpos.push_back(e);
        }
      }
    }
  });

  // The resolve: the (k - W)-th largest candidate, ties to the lowest position.
  int64_t w = 0, cnt = 0;
  for (const BlockOut& o : out) w += o.winners, cnt += int64_t(o.cpos.size());
  if (w >= k) return w;  // approx only: the sample's H was too low
  std::vector<int64_t> chosen;
  if (w + cnt <= k) {  // every candidate (approx: fewer than k in all)
    for (const BlockOut& o : out) chosen.insert(chosen.end(), o.cpos.begin(), o.cpos.end());
  } else {
    const int64_t r = k - w;
    std::vector<uint32_t> keys;
    keys.reserve(size_t(cnt));
    for (const BlockOut& o : out) keys.insert(keys.end(), o.ckey.begin(), o.ckey.end());
    const uint32_t kth = kth_largest(keys, r);
    int64_t ties = r;  // candidates keyed kth still to take, lowest positions first
    for (const BlockOut& o : out)
      for (uint32_t key : o.ckey) ties -= key > kth;
    chosen.reserve(size_t(r));
    for (const BlockOut& o : out)
      for (size_t j = 0; j < o.cpos.size(); ++j) {
        const bool tie = o.ckey[j] == kth && ties > 0;
        if (o.ckey[j] > kth || tie) chosen.push_back(o.cpos[j]);
        ties -= tie;
      }
  }
  const int64_t m = int64_t(chosen.size());
  if (m > 0) {
    at::Tensor pos = at::empty({m}, at::TensorOptions().dtype(at::kLong));
    std::copy(chosen.begin(), chosen.end(), pos.data_ptr<int64_t>());
    update_positions(c, i, pos);
  }
  return w + m;
}

// A large tensor, over every thread (fp64 by select and update: no 32-bit keys).
template <typename T>
int64_t run_large(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k) {
  const int64_t n = c.params[i].numel();
  if (k == 0 || k == n) {
    at::parallel_for(0, n, kDenseGrain, [&](int64_t b, int64_t e) {
      if (k == n) t.dense(b, e);
      else if (t.r) t.add_residual(b, e);
    });
    return k;
  }
  if constexpr (std::is_same_v<T, double>) return run_fallback(c, i, t, k);
  else return run_band(c, i, t, k);
}

template <typename T>
AdamTensor<T> adam_tensor(const Call& c, size_t i) {
  using M = at::opmath_type<T>;
  const double step = *c.steps[i].data_ptr<float>();  // checked: a float32 scalar on the CPU
  const AdamBias bias = adam_bias(c.lr, c.beta1, c.beta2, step);
  return AdamTensor<T>{
      c.params[i].data_ptr<T>(),
      c.grads[i].data_ptr<T>(),
      c.exp_avgs[i].data_ptr<M>(),
      c.exp_avg_sqs[i].data_ptr<M>(),
      c.residuals.empty() ? nullptr : c.residuals[i].data_ptr<M>(),
      make_adam_hyper<M>(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled_weight_decay,
                         c.maximize),
      M(bias.step_size),
      M(bias.bc2_sqrt),
      M(c.grad_scale)};
}

template <typename Fn>
void with_param_type(at::ScalarType d, Fn&& fn) {
  switch (d) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    case at::kDouble: return fn(double{});
    default: TORCH_CHECK(false, "incrkern.adam_select_update_: unsupported dtype ", d);
  }
}

void check_call(const Call& c, at::IntArrayRef ks, const std::optional<at::Tensor>& lr_tensor) {
  const char* op = "incrkern.adam_select_update_";
  const UpdateLists a{c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.steps, {}, {}, {},
                      false, true};
  check_update_lists(op, a);
  check_lr_tensor(op, lr_tensor, c.params);
  const size_t n = c.params.size();
  TORCH_CHECK(ks.size() == n, op, ": ks has ", ks.size(), " entries, expected ", n);
  TORCH_CHECK(c.residuals.empty() || c.residuals.size() == n, op, ": residuals has ",
              c.residuals.size(), " tensors, expected ", n, " (or none)");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = c.params[i];
    TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(),
                ", expected the CPU");
    TORCH_CHECK(c.grads[i].scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ",
                c.grads[i].scalar_type(), ", expected the param's ", p.scalar_type());
    TORCH_CHECK(ks[i] >= 0 && ks[i] <= p.numel(), op, ": ks[", i, "] must be in [0, ",
                p.numel(), "], got ", ks[i]);
    if (!c.residuals.empty()) {
      const at::Tensor& r = c.residuals[i];
      const auto math = opmath_dtype(p.scalar_type());
      TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == math && r.numel() == p.numel() &&
                      r.is_contiguous(),
                  op, ": residuals[", i, "] must be a contiguous ", math, " tensor of ",
                  p.numel(), " elements on the CPU");
    }
  }
}

at::Tensor adam_select_update_cpu(at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList steps, at::IntArrayRef ks,
                                  at::TensorList residuals, bool approx, double lr, double beta1,
                                  double beta2, double eps, double weight_decay,
                                  bool decoupled_weight_decay, bool maximize, double grad_scale,
                                  const std::optional<at::Tensor>& lr_tensor,
                                  bool increment_steps) {
  Call c{params, grads, exp_avgs, exp_avg_sqs, steps, residuals, lr, beta1, beta2, eps,
         weight_decay, grad_scale, decoupled_weight_decay, maximize, approx};
  check_call(c, ks, lr_tensor);
  if (lr_tensor.has_value()) c.lr = lr_tensor->item<double>();
  const int64_t n = int64_t(params.size());
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* count = counts.data_ptr<int64_t>();
  // Every check has passed: from here on the call changes its arguments.
  if (increment_steps)
    for (const at::Tensor& s : steps) *s.data_ptr<float>() += 1.0f;
  // Small tensors side by side, one thread each; large ones one after another, each
  // over every thread.
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < n; ++i)
    (params[i].numel() <= kBlock ? small : large).push_back(i);
  at::parallel_for(0, int64_t(small.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const size_t i = size_t(small[j]);
      with_param_type(params[i].scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        count[i] = run_small<T>(c, i, adam_tensor<T>(c, i), ks[i]);
      });
    }
  });
  for (int64_t i : large)
    with_param_type(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      count[i] = run_large<T>(c, size_t(i), adam_tensor<T>(c, size_t(i)), ks[i]);
    });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) { m.impl("adam_select_update_", &adam_select_update_cpu); }

}  // namespace incrkern
