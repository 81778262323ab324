// CPU kernel of adam_select_update_: per tensor, the k largest |grad| (or, with
// error feedback, |residual + grad|) chosen and Adam applied to them in one call,
// the same result as select(score="grad", scope="tensor") then adam_update_ at the
// positions it returns, without the int64 positions written and read back.
//
//  - Small tensors (up to kBlock elements, or kTileMaxNumel when sparse enough for
//    the tile maxima: one_thread_selection), one thread each: the Selector (exact,
//    one read), then the chosen elements updated while the tensor is in cache.
//  - Mid-sized tensors (past those limits, each at most half a thread's share of
//    the call's elements), one thread each, side by side, largest first: the tile
//    maxima when k <= n / 256 (up to kTileMaxBesideNumel), else as large tensors.
//  - Large tensors, the tile lists: a band [L, H] on the k-th key from the
//    Selector's sample; one pass over the keys lists, per block, the 16-element
//    tiles holding a key > H ("winners", with their lanes) and keeps the band's
//    (key, position) candidates. The counts then prove (exact mode) that the
//    winners are among the k largest and that the k-th lies in the band; the
//    (k - #winners)-th candidate, ties to the lowest position, closes the answer.
//    Only then is anything updated: each block's listed tiles, their lines
//    requested a few tiles ahead, then its chosen candidates.
//    A band that misses falls back to select + update.
//  - Large tensors of nearly all zeros, or whose sampled k-th key is 0
//    (run_zero_floor): the nonzero tiles listed and counted; then, with fewer of them
//    than k, a dense prefix of zeros completing k and those tiles, else the k largest
//    among their lanes.
//  - scope="global" (the one-call step's global_k): fused/global_cpu.h's passes over
//    every tensor's blocks as one flat list, the call described by AdamGlobal.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/ahead.h"
#include "common/claims.h"
#include "common/prefetched.h"
#include "common/rules.h"
#include "common/versions.h"
#include "select/selector_cpu.h"
#include "update/adam_stream_cpu.h"
#include "fused/adam_tensor_cpu.h"
#include "fused/band_choice_cpu.h"
#include "fused/fused_call_cpu.h"
#include "fused/fused_checks.h"
#include "fused/global_cpu.h"
#include "fused/list_pass_cpu.h"
#include "fused/random_stream_cpu.h"
#include "fused/fused_cpu.h"
#include "fused/scans_cpu.h"
#include "fused/threshold_stream_cpu.h"
#include "update/update_checks.h"

namespace incrkern {
namespace {

using namespace incrkern::select;
using namespace incrkern::fused;

constexpr int64_t kResolveGrain = 512;  // params per thread's run when reading their addresses
constexpr int64_t kSmallGrain = 8;  // small tensors per claim
// What a one-thread tensor's element costs, in reads of a key: a read, a selection
// and the chosen lines (adam_select_update_checked: a read beside them).
constexpr double kOneThreadReads = 1.5;
constexpr int64_t kZeroProbe = 256;  // keys read to tell a tensor mostly_zeros
// The positions' update by the adam_update_ op (prefetching, spread over threads):
// for a large tensor's chosen candidates and its fallback. With a residual it reads
// the residual (already r + g) as the gradient and zeroes what it read.
void update_positions(const Call& c, size_t i, const at::Tensor& pos) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("incrkern::adam_update_", "")
          .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, double,
                      double, double, double, double, bool, bool, double, bool, bool,
                      const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&)>();
  const bool ef = !c.residuals.empty();
  const at::Tensor& g = ef ? c.residuals[i] : c.grads[i];
  op.call({c.params[i]}, {g}, {c.exp_avgs[i]}, {c.exp_avg_sqs[i]}, {c.steps[i]}, {pos}, {}, {}, {},
          c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled_weight_decay, c.maximize,
          c.grad_scale, ef, false, std::nullopt, false,
          ef ? std::optional<at::Tensor>() : c.amp_scale, std::nullopt);
}

// A large tensor whose band missed: select, then the positional update. A residual
// gets the gradient added first (a Fisher its EMA; by the listing or counting pass,
// after_pass, or here), and the selection then reads it alone: a selection over r + g
// would read both arrays in each of its passes.
template <typename T>
int64_t run_fallback(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k,
                     bool after_pass) {
  Source src = source_of(c, i);
  if (t.r || t.fisher) {
    if (!after_pass) accumulate_every(t, src.n, /*whole=*/true);
    src = accumulated_source(t, src.n);
  }
  const at::Tensor pos = select_positions(src, k, c.approx);
  update_positions(c, i, pos);
  return pos.numel();
}

// The threshold stream (fused/threshold_stream_cpu.h), for densities where the chosen
// elements' lines are most of the tensor's; a band the counts refute falls back to
// select and update. Returns the count updated.
template <typename T>
int64_t run_stream(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k, bool added,
                   uint32_t lo, uint32_t hi, bool approx) {
  if (const auto chosen = stream_update(t, c.res[i].numel, k, added, lo, hi, approx))
    return *chosen;
  return run_fallback(c, i, t, k, true);
}

// A block's chosen candidates q[0..n) updated after its winner tiles, their lines
// requested ahead; with `vals`, by the gradients the listing pass kept. A candidate
// in a winner tile finds that tile's lines still in cache: merging the two lists
// into one cost more than the second visit.
template <typename T, typename M>
void update_chosen(const AdamTensor<T>& t, const int64_t* q, const M* vals, int64_t n) {
  if (vals)
    prefetched(0, n, [&](int64_t j) { t.one_kept(q[j], vals[j]); },
               [&](int64_t j) { t.fetch_written(q[j]); });
  else
    update_at(t, q, n);
}

// A small tensor's chosen positions whose update waits for the next small tensor's
// selection on the same thread: their lines are requested first, and that selection
// reads on while they arrive. At low density a tensor of 10K elements has a few
// chosen positions, and updating them at once left the thread waiting on their lines.
struct Deferred {
  std::vector<int64_t> positions, spare;  // spare: the next tensor's, swapped in
  size_t tensor = 0;
  bool pending = false;
};

// The waiting update, if any.
void update_deferred(const Call& c, Deferred& d) {
  if (!d.pending) return;
  d.pending = false;
  with_param_type(c.res[d.tensor].dtype, [&](auto tag) {
    using T = decltype(tag);
    update_at(adam_tensor<T>(c, d.tensor), d.positions.data(), int64_t(d.positions.size()));
  });
}

// A small tensor, on the calling thread: the Selector, then its positions updated
// (after the thread's next small tensor is selected: Deferred); from the stream
// density on, the threshold stream over a sample's band. Exact in either mode, as
// ops.adam_select_update_ documents for small tensors.
template <typename T>
int64_t run_small(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k, Deferred& d) {
  const int64_t n = c.res[i].numel;
  if (k == n) {
    t.dense(0, n);
    return n;
  }
  if (t.r) t.add_residual(0, n);  // the score is then r alone
  if (k == 0) return 0;
  const Source src = t.r ? accumulated_source(t, n) : source_of(c, i);
  if constexpr (!std::is_same_v<T, double>) {
    if (stream_pays(n, k)) {
      const auto band = Selector<uint32_t>({src}, k, c.approx).stream_band();
      if (band) return run_stream(c, i, t, k, true, band->first, band->second, /*approx=*/false);
    }
  }
  if (src.dtype != at::kDouble && (tile_max_fits(n, k) || tile_max_fits_beside(n, k))) {
    // A model's many small tensors: the selection's vectors kept per thread, and the
    // positions left in a vector, not in a tensor.
    thread_local Selector<uint32_t>::TileMaxBuffers buffers;
    Selector<uint32_t>({src}, k, c.approx).tile_max_positions(buffers, d.spare);
    const int64_t* q = d.spare.data();
    const auto chosen = int64_t(d.spare.size());
    for (int64_t j = 0; j < std::min(chosen, kPrefetch); ++j) t.fetch_written(q[j]);
    update_deferred(c, d);
    std::swap(d.positions, d.spare);
    d.tensor = i, d.pending = true;
    return chosen;
  }
  const at::Tensor pos = select_positions(src, k, c.approx);
  return update_at(t, pos.data_ptr<int64_t>(), pos.numel());
}

// A listed block's chosen elements updated: its winner tiles, its tail's winners, its
// chosen candidates (`values`: with the gradients the listing pass kept).
template <typename T>
void update_listed(const AdamTensor<T>& t, const BlockOut& o, bool values) {
  t.tiles_ahead(o.wstart.data(), o.wmask.data(), int64_t(o.wstart.size()),
                values ? o.wval.data() : nullptr);
  for (int64_t e : o.tail_winners) t.one(e);
  update_chosen(t, o.chosen.data(), values ? o.chosen_val.data() : nullptr,
                int64_t(o.chosen.size()));
}

// A large tensor of 32-bit keys whose k-th key may be 0 (0 < k < n), as in an
// embedding's gradient, nonzero in the rows of the batch's tokens alone. One pass
// lists the nonzero tiles. Fewer nonzero keys than k: every nonzero is chosen, and
// the zeros of lowest position complete k: with the nonzeros among them they fill a
// prefix [0, P), updated as a dense range, and the nonzero tiles past P are updated
// as tiles. More: with their keys kept (tile_keys), the k largest among them
// (run_among_nonzeros), else select then update. Nothing is updated before the
// count of nonzeros decides.
template <typename T>
int64_t run_zero_floor(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k, bool added,
                       bool tile_keys) {
  const int64_t n = c.res[i].numel;
  // Winners: the keys above 0 (hi = 0); lo = 1 above hi leaves no candidates.
  const std::span<BlockOut> out =
      list_pass(t, n, 1, 0, added, /*few_hits=*/true, /*values=*/false, tile_keys);
  int64_t nonzeros = 0;
  for (const BlockOut& o : out) nonzeros += o.winners;
  if (forced_fallback("after")) return run_fallback(c, i, t, k, true);
  if (nonzeros > k)
    return tile_keys && tile_keys_complete(out) ? run_among_nonzeros(t, out, k)
                                                : run_fallback(c, i, t, k, true);
  int64_t prefix = 0;  // P: just past the (k - nonzeros)-th zero
  for (int64_t bi = 0, zeros_left = k - nonzeros; zeros_left > 0; ++bi) {
    const int64_t begin = bi * kBlock, end = std::min(n, begin + kBlock);
    const int64_t zeros = end - begin - out[bi].winners;
    if (zeros < zeros_left) {
      zeros_left -= zeros;
      continue;
    }
    for (prefix = begin; zeros_left > 0; ++prefix) zeros_left -= t.key(prefix) == 0;
  }
  parallel_for_claimed(0, prefix, kDenseGrain,
                       [&](int64_t b, int64_t e) { t.dense(b, e, /*added=*/true); });
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      BlockOut& o = out[bi];
      // The tiles past the prefix, the one that straddles it cut to its lanes past P.
      size_t a = size_t(std::lower_bound(o.wstart.begin(), o.wstart.end(), prefix - kTile + 1) -
                        o.wstart.begin());
      if (a < o.wstart.size() && o.wstart[a] < prefix) {
        o.wmask[a] &= ~0u << (prefix - o.wstart[a]);
        a += o.wmask[a] == 0;
      }
      t.tiles_ahead(o.wstart.data() + a, o.wmask.data() + a, int64_t(o.wstart.size() - a));
      for (int64_t e : o.tail_winners)
        if (e >= prefix) t.one(e);
    }
  });
  return k;
}

// A large tensor of 32-bit keys (0 < k < n): the band, the listing pass, the
// resolve, the update. Returns the count updated. `added`: the residual already
// holds r + residual_alpha * g, or the Fisher its EMA (the band is then sampled from
// it alone).
template <typename T>
int64_t run_band(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k, bool added) {
  const int64_t n = c.res[i].numel;
  Selector<uint32_t> sel({added ? accumulated_source(t, n) : source_of(c, i)}, k, c.approx);
  // Nearly all keys 0: the nonzero tiles listed, with no sample. The nonzeros hold
  // the k largest keys, and reading them again costs fewer lines than the sample's
  // reads, each of which waits on its own line.
  const bool list_nonzeros =
      !stream_pays(n, k) && !sel.sparse_sample() &&
      sel.few_nonzeros(kNonzeroProbe, kNonzeroProbeMost);
  const auto band = list_nonzeros ? std::nullopt : sel.sample_band();
  if (forced_fallback("before")) return run_fallback(c, i, t, k, added);
  if (list_nonzeros) return run_zero_floor(c, i, t, k, added, /*tile_keys=*/true);
  if (!band && sel.tie_guess() == uint32_t(0))
    return run_zero_floor(c, i, t, k, added, /*tile_keys=*/false);
  if (!band) return run_fallback(c, i, t, k, added);
  if (stream_pays(n, k))
    return run_stream(c, i, t, k, added, band->first, band->second, c.approx);
  // A gradient of mostly exact zeros (an embedding's: nonzero in the rows of the
  // batch's tokens) has its chosen lanes in full tiles, read whole from their lines:
  // its gradients are not kept. Keys from p leave g unread until the update.
  const bool values =
      !t.r && t.key_from != KeyFrom::Param && sel.sampled_zeros() < 0.5;
  const std::span<BlockOut> out =
      list_pass(t, n, band->first, band->second, added, few_hits(k, n), values);

  // The counts: exact mode needs the k-th in the band; approx accepts a count within
  // its tolerance of k.
  const auto [w, cnt] = listed_counts(out);
  if (!band_holds(w, cnt, k, c.approx)) return run_fallback(c, i, t, k, true);
  choose_candidates(out, k - w, band->first, band->second, values);

  // The update: nothing was written to p or its state before this point.
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) update_listed(t, out[bi], values);
  });
  int64_t m = 0;
  for (const BlockOut& o : out) m += int64_t(o.chosen.size());
  return w + m;
}

// Whether a tensor's step is little more than one read of its keys: most of its
// keys (a few hundred at a constant stride) are 0, as in an embedding's gradient,
// nonzero in the rows of the batch's tokens, and neither the dense step (k = n), the
// threshold stream nor the fp64 fallback takes it.
bool mostly_zeros(const Call& c, size_t i, int64_t k) {
  const int64_t n = c.res[i].numel;
  if (k == 0 || k == n || stream_pays(n, k) || c.res[i].dtype == at::kDouble) return false;
  return Selector<uint32_t>({source_of(c, i)}, k, c.approx)
      .few_nonzeros(kZeroProbe, kZeroProbe / 2);
}

// A large tensor, over every thread (fp64 by select and update: no 32-bit keys).
template <typename T>
int64_t run_large(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k) {
  const int64_t n = c.res[i].numel;
  if (k == 0 || k == n) {
    parallel_for_claimed(0, n, kDenseGrain, [&](int64_t b, int64_t e) {
      if (k == n) t.dense(b, e);
      else if (t.r) t.add_residual(b, e);
    });
    return k;
  }
  if constexpr (std::is_same_v<T, double>) {
    return run_fallback(c, i, t, k, false);
  } else {
    // The band's sample reads r + g as select's accumulated score does, without the
    // mixed-precision unscale: with one, the residual is summed first and sampled.
    const bool add_first = t.r && t.residual_alpha != 1.0f;
    if (add_first) accumulate_every(t, n, /*whole=*/true);
    return run_band(c, i, t, k, add_first);
  }
}

// The "random" score (fused/random_stream_cpu.h). Where the threshold stream pays
// (`stream`): the keys hashed by the counting pass, then again a chunk at a time for
// the masked loop. Below it: one pass of hashes listing the positions above and in
// the band, then only the chosen positions updated. Its keys cost no read, and
// select's hashes (a key at a time where its passes read one) cost more at every
// density.
template <typename T>
int64_t run_random(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k, uint32_t lo,
                   uint32_t hi, bool stream) {
  const int64_t n = c.res[i].numel;
  const RandomKeys rk = source_of(c, i).rk;
  std::vector<BandBlock> out;
  std::vector<RandomLists> lists;
  if (stream) out = count_random(rk, n, kBlock, lo, hi);
  else list_random(rk, n, kBlock, lo, hi, out, lists);
  const auto [w, cnt] = band_counts(out);
  if (!band_holds(w, cnt, k, c.approx)) return run_fallback(c, i, t, k, true);
  const int64_t chosen = std::clamp(k, w, w + cnt);
  const auto [at_least, tie] = choose_in_band(out, k - w, lo, hi);
  if (stream) {
    update_random(rk, n, kBlock, out, at_least, tie,
                  [&](int64_t b, int64_t e, const uint8_t* mask) { t.stream(b, e, mask); });
    return chosen;
  }
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (size_t bi = size_t(b0); bi < size_t(b1); ++bi) {
      update_at(t, lists[bi].win.data(), int64_t(lists[bi].win.size()));
      const std::vector<int64_t> more = chosen_in_band(out[bi], lists[bi], at_least, tie);
      update_at(t, more.data(), int64_t(more.size()));
    }
  });
  return chosen;
}

// Keys not from the gradient: |p| (score="weight"), each read by the pass that updates
// it before the update, given scores (score="grad_sq") or the index's hash
// (score="random", run_random at every density). By |p| and the scores, from
// kKeyedStreamDensity on, the threshold stream (the counting pass and the loop's
// compare read the keys); below it, and where the band misses, select's positions
// over the keys then their update (`whole`: over every thread). fp64 takes the
// positions. The stream starts later than |g|'s, whose alternative is the tile lists:
// against select's positions by |p| it lost at 0.03 on a transformer's embedding
// (docs/measurements-selects.md). Below |g|'s stream densities a large tensor's |p|
// takes |g|'s tile lists (run_band), the listing pass reading p. A Fisher whose EMA the
// call forms (t.fisher): a large tensor's goes as |g|'s at every density, the listing
// or counting pass forming it as it reads (run_band); any other's is formed first,
// then read as given scores.
constexpr double kKeyedStreamDensity = 0.05;
template <typename T>
int64_t run_keyed(const Call& c, size_t i, const AdamTensor<T>& t, int64_t k, bool whole) {
  const int64_t n = c.res[i].numel;
  if constexpr (!std::is_same_v<T, double>) {
    const bool listed = t.fisher || (c.key_from == KeyFrom::Param && !stream_pays(n, k));
    if (listed && whole && k > 0 && k < n) return run_band(c, i, t, k, /*added=*/false);
  }
  if (t.fisher) accumulate_every(t, n, whole);
  if (k == 0) return 0;
  if (k == n) {
    update_every(t, n, whole);
    return n;
  }
  const Source src = t.fisher ? accumulated_source(t, n) : source_of(c, i);
  if constexpr (!std::is_same_v<T, double>) {
    // The random score's listing updates scattered positions, not |p|'s clustered ones:
    // the stream pays from |g|'s densities (docs/design.md).
    const bool stream = stream_pays(n, k) && (c.key_from == KeyFrom::Random ||
                                              double(k) >= kKeyedStreamDensity * double(n));
    if (stream || c.key_from == KeyFrom::Random) {
      Selector<uint32_t> sel({src}, k, c.approx);
      const auto band = stream_band(sel, whole);
      if (band && c.key_from == KeyFrom::Random && !forced_fallback("before"))
        return run_random(c, i, t, k, band->first, band->second, stream);
      if (band && !forced_fallback("before"))
        return run_stream(c, i, t, k, true, band->first, band->second, c.approx);
    }
  }
  const at::Tensor pos = select_positions(src, k, c.approx);
  if (!whole) return update_at(t, pos.data_ptr<int64_t>(), pos.numel());
  update_positions(c, i, pos);
  return pos.numel();
}

// A global call's tensors as fused/global_cpu.h reads them.
struct AdamGlobal {
  const Call& c;
  size_t size() const { return c.res.size(); }
  int64_t numel(size_t i) const { return c.res[i].numel; }
  at::ScalarType dtype(size_t i) const { return c.res[i].dtype; }
  bool approx() const { return c.approx; }
  bool residuals() const { return !c.residuals.empty(); }
  Source source(size_t i) const { return source_of(c, i); }
  Source added_source(size_t i) const {
    Source s{};
    with_tensor(i, [&](const auto& t) { s = accumulated_source(t, c.res[i].numel); });
    return s;
  }
  template <typename Fn>
  void with_tensor(size_t i, Fn&& fn) const {
    with_param_type(c.res[i].dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, double>) fn(adam_tensor<T>(c, i));
    });
  }
  void update_positions(size_t i, const at::Tensor& pos) const {
    incrkern::update_positions(c, i, pos);
  }
  template <typename T>
  void update_listed(const AdamTensor<T>& t, const BlockOut& o, bool values) const {
    incrkern::update_listed(t, o, values);
  }
};

}  // namespace

at::Tensor adam_select_update_checked(at::TensorList params, at::TensorList grads,
                                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList steps, at::IntArrayRef ks,
                                      at::TensorList residuals, bool approx, double lr,
                                      double beta1, double beta2, double eps, double weight_decay,
                                      bool decoupled_weight_decay, bool maximize,
                                      double grad_scale,
                                      const std::optional<at::Tensor>& lr_tensor,
                                      Bookkeeping book,
                                      const std::optional<at::Tensor>& amp_scale,
                                      const std::optional<at::Tensor>& found_inf,
                                      KeyFrom key_from, at::TensorList scores,
                                      int64_t seed, std::optional<double> fisher_beta,
                                      std::optional<int64_t> global_k) {
  Call c{params, grads, exp_avgs, exp_avg_sqs, steps, residuals, lr, beta1, beta2, eps,
         weight_decay, grad_scale, decoupled_weight_decay, maximize, approx};
  c.key_from = key_from;
  c.seed = seed;
  c.fisher_beta = fisher_beta;
  if (lr_tensor.has_value()) c.lr = lr_tensor->item<double>();
  const int64_t n = int64_t(params.size());
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* count = counts.data_ptr<int64_t>();
  if (amp_found_inf(found_inf)) return counts;
  c.amp_scale = amp_scale;
  c.amp = amp_value(amp_scale);
  // Every check has passed: from here on the call changes its arguments.
  c.res.resize(params.size());
  // The step counts where a step tensor may serve several params: all incremented
  // after the pass, then read.
  std::vector<float*> shared_counts(book.steps_distinct ? 0 : params.size());
  const auto storage_and_version = [](const at::Tensor& t) {
    request_storage(t);
    request_version(t);
  };
  // The tensors the call writes (residuals: none without error feedback).
  const std::array<at::TensorList, 5> written{params, exp_avgs, exp_avg_sqs, steps, residuals};
  at::parallel_for(0, n, kResolveGrain, [&](int64_t b, int64_t e) {
    for (size_t i = size_t(b); i < size_t(e); ++i) {
      for (at::TensorList list : written) {
        list = list.slice(0, std::min(list.size(), size_t(e)));
        if (book.bump_written) request_tensors_ahead(list, i, storage_and_version);
        else request_tensors_ahead(list, i, request_storage);
      }
      request_tensors_ahead(grads.slice(0, size_t(e)), i, request_storage);
      c.res[i] = Resolved{params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                          exp_avg_sqs[i].data_ptr(),
                          residuals.empty() ? nullptr : residuals[i].data_ptr(),
                          scores.empty() ? nullptr : scores[i].const_data_ptr(),
                          params[i].numel(), 0.0f, params[i].scalar_type()};
      float* count = steps[i].data_ptr<float>();
      if (!book.steps_distinct) {
        shared_counts[i] = count;
      } else {
        if (book.increment_steps) *count += 1.0f;
        c.res[i].step = *count;
      }
      if (book.bump_written)
        for (at::TensorList list : written)
          if (!list.empty()) bump_versions(list.slice(i, 1));
    }
  });
  // A step tensor given for several params counts each of them before any is read.
  for (size_t i = 0; i < shared_counts.size(); ++i) {
    if (i + kPrefetch < shared_counts.size()) request_line(shared_counts[i + kPrefetch]);
    if (book.increment_steps) *shared_counts[i] += 1.0f;
  }
  for (size_t i = 0; i < shared_counts.size(); ++i) c.res[i].step = *shared_counts[i];
  if (global_k) {
    run_global(AdamGlobal{c}, *global_k);
    return counts;
  }
  // Small tensors side by side, one thread each (up to 2^20 elements when they take
  // the tile maxima or the threshold stream: a transformer's mid-sized matrices), and
  // before them, largest first, the tensors that would run over every thread but hold
  // at most half a thread's share of the call's elements: their samples, choices and
  // joins then overlap the other threads' reads. Those left run one after another,
  // each over every thread.
  std::vector<int64_t> small, beside, large;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += c.res[i].numel;
  const int threads = at::get_num_threads();
  const double half_share = double(total) / double(2 * threads);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = c.res[i].numel;
    const bool one_thread = one_thread_tensor(numel, ks[i]);
    (one_thread ? small : double(numel) <= half_share ? beside : large).push_back(i);
  }
  // A tensor past that share whose step is about one read of its keys (mostly_zeros)
  // runs beside them too while the one-thread tensors give each other thread as much
  // work, at kOneThreadReads reads an element: its read then overlaps their
  // selections, where over every thread it ran after them, alone.
  int64_t beside_work = 0;
  for (int64_t i : small) beside_work += c.res[i].numel;
  for (int64_t i : beside) beside_work += c.res[i].numel;
  // On one thread nothing overlaps, and the probe is skipped.
  const auto read_beside = [&](int64_t i) {
    return threads > 1 &&
           double(threads - 1) * double(c.res[i].numel) <= kOneThreadReads * double(beside_work) &&
           mostly_zeros(c, size_t(i), ks[i]);
  };
  const auto moved = std::stable_partition(large.begin(), large.end(),
                                           [&](int64_t i) { return !read_beside(i); });
  beside.insert(beside.end(), moved, large.end());
  large.erase(moved, large.end());
  std::stable_sort(beside.begin(), beside.end(),
                   [&](int64_t a, int64_t b) { return c.res[a].numel > c.res[b].numel; });
  const bool keyed = c.key_from != KeyFrom::Grad;
  Claims beside_claims(0, int64_t(beside.size()), 1);
  Claims small_claims(0, int64_t(small.size()), kSmallGrain);
  const auto run_one = [&](size_t i, Deferred& deferred) {
    with_param_type(c.res[i].dtype, [&](auto tag) {
      using T = decltype(tag);
      const AdamTensor<T> t = adam_tensor<T>(c, i);
      const int64_t numel = c.res[i].numel;
      const bool small_path =
          numel <= select::kTileMaxNumel || select::tile_max_fits_beside(numel, ks[i]);
      count[i] = keyed        ? run_keyed<T>(c, i, t, ks[i], !small_path)
                 : small_path ? run_small<T>(c, i, t, ks[i], deferred)
                              : run_large<T>(c, i, t, ks[i]);
    });
  };
  const int64_t runs =
      int64_t(beside.size()) + (int64_t(small.size()) + kSmallGrain - 1) / kSmallGrain;
  on_threads(runs, [&] {
    thread_local Deferred deferred;
    deferred.pending = false;  // what a call that raised left
    for (int64_t j; beside_claims.next_index(j);) run_one(size_t(beside[j]), deferred);
    for (int64_t b, e; small_claims.next(b, e);)
      for (int64_t j = b; j < e; ++j) run_one(size_t(small[j]), deferred);
    update_deferred(c, deferred);
  });
  for (int64_t i : large)
    with_param_type(c.res[i].dtype, [&](auto tag) {
      using T = decltype(tag);
      const AdamTensor<T> t = adam_tensor<T>(c, size_t(i));
      count[i] = keyed ? run_keyed<T>(c, size_t(i), t, ks[i], true)
                          : run_large<T>(c, size_t(i), t, ks[i]);
    });
  return counts;
}

at::Tensor adam_select_update_cpu(at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList steps, at::IntArrayRef ks,
                                  at::TensorList residuals, bool approx, double lr, double beta1,
                                  double beta2, double eps, double weight_decay,
                                  bool decoupled_weight_decay, bool maximize, double grad_scale,
                                  const std::optional<at::Tensor>& lr_tensor,
                                  bool increment_steps,
                                  const std::optional<at::Tensor>& amp_scale,
                                  const std::optional<at::Tensor>& found_inf,
                                  c10::string_view score,
                                  std::optional<at::TensorList> given, int64_t seed) {
  const at::TensorList scores = given.value_or(at::TensorList());
  check_select_update(c10::DeviceType::CPU, params, grads, exp_avgs, exp_avg_sqs, steps, ks,
                      residuals, lr_tensor, amp_scale, found_inf);
  const KeyFrom key_from =
      check_select_update_score(score, params, residuals, scores, c10::DeviceType::CPU);
  return adam_select_update_checked(params, grads, exp_avgs, exp_avg_sqs, steps, ks, residuals,
                                    approx, lr, beta1, beta2, eps, weight_decay,
                                    decoupled_weight_decay, maximize, grad_scale, lr_tensor,
                                    Bookkeeping{increment_steps}, amp_scale, found_inf, key_from,
                                    scores, seed);
}

TORCH_LIBRARY_IMPL(incrkern, CPU, m) { m.impl("adam_select_update_", &adam_select_update_cpu); }

}  // namespace incrkern
