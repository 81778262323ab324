// The threshold stream of the fused select-and-update kernels (fused_cpu.cpp for Adam,
// sgd_fused_cpu.cpp for SGD), over any tensor type that gives its keys and its rule's
// streaming loop (fused::AdamTensor, fused::SgdTensor): a counting pass over the keys
// in a band [lo, hi] around the k-th, the k-th found among the band's keys, then the
// rule's loop over every element, each block's chosen ones marked by comparing their
// keys with the k-th (its ties taken lowest positions first). Nothing is updated
// before the counts show the k-th to lie in the band (docs/design.md, "The threshold
// stream"). Beside it, what both kernels do around it: every element's update, the
// band the stream takes, and select's positions with their update.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common/claims.h"
#include "common/prefetched.h"
#include "fused/band_choice_cpu.h"
#include "select/radix_cpu.h"
#include "select/selector_cpu.h"

namespace incrkern::fused {

// From these densities on, a tensor is updated by the threshold stream: the chosen
// elements' lines are then most of the tensor's, and a stream over every element
// costs less than visiting them. A tensor of up to one block streams on one thread
// after a smaller sample, and pays off from a higher density (docs/design.md, "The
// threshold stream"). INCRKERN_STREAM_DENSITY replaces both, for
// bench/crossover_fused.py to measure the crossover (2 turns the stream off).
constexpr double kStreamDensitySmall = 0.04;
constexpr double kStreamDensityLarge = 0.025;
inline bool stream_pays(int64_t n, int64_t k) {
  static const double forced = [] {
    const char* env = std::getenv("INCRKERN_STREAM_DENSITY");
    return env ? std::atof(env) : -1.0;
  }();
  const double d = forced >= 0 ? forced
                               : n <= select::kBlock ? kStreamDensitySmall : kStreamDensityLarge;
  return double(k) >= d * double(n);
}

constexpr int64_t kDenseGrain = 1 << 15;  // elements per claim of a dense update

// Whether a tensor of n elements, k chosen, runs on one thread beside the others: it
// selects on one (select::one_thread_selection), or streams and holds at most 2^20.
inline bool one_thread_tensor(int64_t n, int64_t k) {
  return select::one_thread_selection(n, k) || (n <= select::kTileMaxNumel && stream_pays(n, k));
}

// Every element of t's n updated (k = n): over every thread (`whole`), or on this one.
template <typename Tensor>
void update_every(const Tensor& t, int64_t n, bool whole) {
  if (!whole) return t.dense(0, n);
  parallel_for_claimed(0, n, kDenseGrain, [&](int64_t b, int64_t e) { t.dense(b, e); });
}

// The keys of t's n elements accumulated (accumulate_keys: a residual's r += g, a
// Fisher's EMA): over every thread (`whole`), or on this one.
template <typename Tensor>
void accumulate_every(const Tensor& t, int64_t n, bool whole) {
  if (!whole) return t.accumulate_keys(0, n);
  parallel_for_claimed(0, n, kDenseGrain,
                       [&](int64_t b, int64_t e) { t.accumulate_keys(b, e); });
}

// The band the threshold stream takes from sel's sample: sample_band for a tensor over
// every thread (`whole`), stream_band for one on a thread; one refused as too wide
// whose low edge is 0 (its k-th among zeros), which the counting pass then counts
// instead of keeping.
inline std::optional<std::pair<uint32_t, uint32_t>> stream_band(select::Selector<uint32_t>& sel,
                                                                bool whole) {
  auto band = whole ? sel.sample_band() : sel.stream_band();
  if (!band)
    if (const auto wide = sel.band(); wide.first == 0) band = wide;
  return band;
}

// Select's positions of the k largest keys of s (64-bit keys for fp64).
inline at::Tensor select_positions(const select::Source& s, int64_t k, bool approx) {
  if (s.dtype == at::kDouble) return select::Selector<uint64_t>({s}, k, approx).run()[0];
  return select::Selector<uint32_t>({s}, k, approx).run()[0];
}

// The chosen positions q[0..n) of t updated, their lines requested ahead. Returns n.
template <typename Tensor>
int64_t update_at(const Tensor& t, const int64_t* q, int64_t n) {
  prefetched(0, n, [&](int64_t j) { t.one(q[j]); }, [&](int64_t j) { t.fetch(q[j]); });
  return n;
}

// INCRKERN_FUSED_FALLBACK (for the tests) forces the fallback "before" the listing
// or counting pass or "after" it, as a band the counts refute.
inline bool forced_fallback(const char* when) {
  const char* env = std::getenv("INCRKERN_FUSED_FALLBACK");
  return env && std::strcmp(env, when) == 0;
}

// Whether a pass's counts (keys above the band, keys in it) prove the k-th to lie in
// the band: exact mode needs #above <= k <= #above + #band; approx accepts a count
// within its tolerance of k. A band forced "after" to miss never holds.
inline bool band_holds(int64_t above, int64_t in_band, int64_t k, bool approx) {
  const int64_t tol = approx ? select::Selector<uint32_t>::tolerance(k) : 0;
  return above <= k + tol && above + in_band >= k - tol && !forced_fallback("after");
}

// A counting pass's keys above the band and in it (those at its low edge included).
inline std::pair<int64_t, int64_t> band_counts(const std::vector<BandBlock>& out) {
  int64_t above = 0, in_band = 0;
  for (const BandBlock& o : out) above += o.above, in_band += int64_t(o.keys.size()) + o.at_lo;
  return {above, in_band};
}

// The counting pass over [begin, end) of t into o: keys > hi counted, lo <= key <= hi
// kept in position order, the keys at lo counted instead where `zeros_counted` (lo is
// 0). Keys not yet `added` (a residual's u = r + g, a Fisher's EMA) are formed a chunk
// at a time, written first.
template <typename Tensor>
void count_block(const Tensor& t, int64_t begin, int64_t end, uint32_t lo, uint32_t hi,
                 bool added, BandBlock& o) {
  constexpr int64_t kChunk = 4096;
  const bool zeros_counted = lo == 0;
  const int32_t lo_gt = select::order_greater_than<false>(zeros_counted ? 1 : lo);
  const int32_t hi_gt = select::order_greater_than<false>(uint64_t(hi) + 1);
  uint32_t keys[kChunk + 8];
  for (int64_t e = begin; e < end; e += kChunk) {
    const int64_t len = std::min(kChunk, end - e);
    if (!added) t.accumulate_keys(e, e + len);
    uint32_t* k = keys;
    const int64_t above = t.count_band(e, len, lo_gt, hi_gt, k);
    o.above += above;
    if (zeros_counted) o.at_lo += len - above - (k - keys);
    o.keys.insert(o.keys.end(), keys, k);
  }
}

// The counting pass over [0, n), per block (BandBlock, count_block). A band from 0
// keeps its keys above 0 and counts the zeros (at_lo): a Fisher or a gradient of mostly
// zeros near its k-th would keep nearly every key.
template <typename Tensor>
std::vector<BandBlock> count_pass(const Tensor& t, int64_t n, uint32_t lo, uint32_t hi,
                                  bool added) {
  constexpr int64_t kBlock = select::kBlock;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<BandBlock> out(static_cast<size_t>(nblocks));
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi)
      count_block(t, bi * kBlock, std::min(n, (bi + 1) * kBlock), lo, hi, added, out[bi]);
  });
  return out;
}

// The position just past the `some`-th key equal to tie in [b, e) of t, which holds at
// least that many (fp32 and 16-bit types): the ties counted a chunk at a time by the
// counting pass's scan (t.count_band), then found key by key in the chunk holding it.
template <typename Tensor>
int64_t past_ties(const Tensor& t, int64_t b, int64_t e, uint32_t tie, int64_t some) {
  constexpr int64_t kChunk = 4096;
  const int32_t lo_gt = select::order_greater_than<false>(tie);
  const int32_t hi_gt = select::order_greater_than<false>(uint64_t(tie) + 1);
  uint32_t keys[kChunk + 8];
  for (; b < e; b += kChunk) {
    const int64_t len = std::min(kChunk, e - b);
    uint32_t* end = keys;
    t.count_band(b, len, lo_gt, hi_gt, end);
    if (end - keys < some) {
      some -= end - keys;
      continue;
    }
    for (int64_t j = b;; ++j)
      if (t.key(j) == tie && --some == 0) return j + 1;
  }
  return e;
}

// The streaming loop over the block [begin, end) of t, counted into o, once the k-th
// is chosen (choose_in_band: at_least, tie, o's ties). The loop compares each key it
// reads with a threshold: tie in a block taking all its ties; in the one taking some,
// tie up to just past the last it takes and at_least from there.
template <typename Tensor>
void stream_block(const Tensor& t, int64_t begin, int64_t end, const BandBlock& o,
                  uint64_t at_least, uint32_t tie) {
  if (o.ties == 0 || o.ties == o.equal) {
    t.stream_at_least(begin, end, o.ties > 0 ? tie : at_least);
    return;
  }
  const int64_t split = past_ties(t, begin, end, tie, o.ties);
  t.stream_at_least(begin, split, tie);
  t.stream_at_least(split, end, at_least);
}

// The threshold stream over t's n elements with the band [lo, hi] around its k-th key:
// the count updated, or nothing (nothing updated either) where the counts refute the
// band, for the caller's fallback. `added`: a residual already holds r + g.
template <typename Tensor>
std::optional<int64_t> stream_update(const Tensor& t, int64_t n, int64_t k, bool added,
                                     uint32_t lo, uint32_t hi, bool approx) {
  constexpr int64_t kBlock = select::kBlock;
  std::vector<BandBlock> out = count_pass(t, n, lo, hi, added);
  const auto [w, cnt] = band_counts(out);
  if (!band_holds(w, cnt, k, approx)) return std::nullopt;
  // approx may take every key above the band (k < w) or every key in it (k > w + cnt)
  const int64_t chosen = std::clamp(k, w, w + cnt);
  const auto [at_least, tie] = choose_in_band(out, k - w, lo, hi);
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi)
      stream_block(t, bi * kBlock, std::min(n, (bi + 1) * kBlock), out[bi], at_least, tie);
  });
  return chosen;
}

}  // namespace incrkern::fused
