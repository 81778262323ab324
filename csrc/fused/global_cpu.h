// scope="global" in the fused CPU select-and-update kernels (fused_cpu.cpp for Adam,
// sgd_fused_cpu.cpp for SGD): the k largest keys of the concatenation of a call's
// tensors, every tensor's blocks walked as one flat list by the passes of one tensor's
// step (docs/design.md, "scope=global"). Below the threshold stream's density, the tile
// lists (list_block, the candidates chosen over every block, the listed elements
// updated); from it, the threshold stream (count_block, choose_in_band, stream_block),
// a mostly-zero tensor's blocks listed instead of streamed. One band from a sample of
// the concatenation; ties to the lowest position in it; nothing updated before the
// counts prove the band.
//
// A kernel describes its call by a Kernel: size(), numel(i), dtype(i), approx(),
// residuals() (error feedback: every tensor has one), source(i) (tensor i's keys before
// its residual is added, pos0 0), added_source(i) (its residual alone, once it holds
// r + g), with_tensor(i, fn) (fn on the typed tensor, fp32 and 16-bit),
// update_positions(i, pos) (over every thread) and update_listed(t, block, values).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "common/claims.h"
#include "common/flat_blocks.h"
#include "fused/band_choice_cpu.h"
#include "fused/list_pass_cpu.h"
#include "fused/threshold_stream_cpu.h"
#include "select/selector_cpu.h"

namespace incrkern::fused {

// Tensor i's blocks are the flat blocks [first[i], first[i + 1]); fn(i, t, begin, end,
// block) on the flat blocks [b0, b1).
template <typename Kernel, typename Fn>
void each_global_block(const Kernel& kern, const std::vector<int64_t>& first, int64_t b0,
                       int64_t b1, Fn&& fn) {
  each_flat_block(first, kBlock, b0, b1, [&](size_t i, int64_t begin, int64_t bi) {
    kern.with_tensor(i, [&](const auto& t) {
      fn(i, t, begin, std::min(kern.numel(i), begin + kBlock), bi);
    });
  });
}

// A global selection the counts refuted, or none to try: the residuals added (unless
// `added`), select's positions over the concatenation, then their update per tensor.
template <typename Kernel>
void run_global_fallback(const Kernel& kern, int64_t k, bool added) {
  std::vector<select::Source> srcs;
  int64_t pos = 0;
  for (size_t i = 0; i < kern.size(); ++i) {
    if (kern.residuals() && !added)
      kern.with_tensor(i, [&](const auto& t) { accumulate_every(t, kern.numel(i), true); });
    srcs.push_back(kern.residuals() ? kern.added_source(i) : kern.source(i));
    srcs.back().pos0 = pos;
    pos += kern.numel(i);
  }
  const std::vector<at::Tensor> chosen =
      select::Selector<uint32_t>(srcs, k, kern.approx()).run();
  for (size_t i = 0; i < chosen.size(); ++i) kern.update_positions(i, chosen[i]);
}

// Below the threshold stream's densities: |g|'s tile lists (one tensor's run_band) over
// every tensor's blocks: the band from one sample of the concatenation, the listing pass
// over every block (forming r + g), the candidates chosen over all of them, the listed
// tiles and chosen candidates updated. A band the sample finds too wide (the k-th among
// ties) or the counts refute: select's global positions.
template <typename Kernel>
void run_global_lists(const Kernel& kern, int64_t k, const std::vector<int64_t>& first,
                      const std::vector<select::Source>& srcs, int64_t total) {
  select::Selector<uint32_t> sel(srcs, k, kern.approx());
  const auto band = sel.sample_band();
  if (!band) return run_global_fallback(kern, k, false);
  const auto [lo, hi] = *band;
  const bool values = !kern.residuals() && sel.sampled_zeros() < 0.5;
  const std::span<BlockOut> out = cleared_block_lists(first.back());
  parallel_claims(0, first.back(), 1, [&](Claims& claims) {
    ListScratch scratch(few_hits(k, total));
    for (int64_t bi; claims.next_index(bi);)
      each_global_block(kern, first, bi, bi + 1, [&](size_t, const auto& t, int64_t b,
                                                      int64_t e, int64_t) {
        list_block(t, b, e, lo, hi, /*added=*/false, values, /*tile_keys=*/false, scratch,
                   out[size_t(bi)]);
      });
  });
  const auto [w, cnt] = listed_counts(out);
  if (!band_holds(w, cnt, k, kern.approx())) return run_global_fallback(kern, k, true);
  choose_candidates(out, k - w, lo, hi, values);
  parallel_for_claimed(0, first.back(), 1, [&](int64_t b0, int64_t b1) {
    each_global_block(kern, first, b0, b1, [&](size_t, const auto& t, int64_t, int64_t,
                                                int64_t bi) {
      kern.update_listed(t, out[size_t(bi)], values);
    });
  });
}

// The k largest keys of the concatenation of the kernel's tensors (fp32 and 16-bit),
// r + g formed where there are residuals: the band on the concatenation's k-th key from
// one sample, the counting pass over every tensor's blocks, the k-th among the kept keys,
// the streaming loop over every block, ties to the lowest position in the concatenation;
// a tensor past the one-thread limit whose probe finds nearly all keys 0 (an embedding's
// gradient, nonzero in the rows of the batch's tokens) is listed, not streamed: its
// chosen keys are among its few nonzeros, and the stream would move every element's
// lines (a band from 0 lists nothing). Below the stream's density, run_global_lists.
// approx: a band whose counts miss k by at most select's tolerance chooses every key
// above it, or every key in it too, as per tensor.
template <typename Kernel>
void run_global(const Kernel& kern, int64_t k) {
  const std::vector<int64_t> first =
      flat_block_starts(kern.size(), kBlock, [&](size_t i) { return kern.numel(i); });
  std::vector<select::Source> srcs;
  int64_t total = 0;
  for (size_t i = 0; i < kern.size(); ++i) {
    TORCH_CHECK(kern.dtype(i) != at::kDouble, "incrkern: a global fused step has no fp64 path");
    srcs.push_back(kern.source(i));
    srcs.back().pos0 = total;
    total += kern.numel(i);
  }
  if (k == 0 || k == total) {
    parallel_for_claimed(0, first.back(), 1, [&](int64_t b0, int64_t b1) {
      each_global_block(kern, first, b0, b1, [&](size_t, const auto& t, int64_t b, int64_t e,
                                                  int64_t) {
        if (k == total) t.dense(b, e);
        else t.accumulate_keys(b, e);
      });
    });
    return;
  }
  if (forced_fallback("before")) return run_global_fallback(kern, k, false);
  if (!stream_pays(total, k)) return run_global_lists(kern, k, first, srcs, total);
  const auto [lo, hi] = select::Selector<uint32_t>(srcs, k, kern.approx()).band();
  std::vector<char> listed(kern.size(), 0);
  bool any_listed = false;
  for (size_t i = 0; i < kern.size() && lo > 0; ++i)
    if (kern.numel(i) > select::kTileMaxNumel &&
        select::Selector<uint32_t>({kern.source(i)}, 1, false)
            .few_nonzeros(kNonzeroProbe, kNonzeroProbeMost))
      listed[i] = 1, any_listed = true;
  std::vector<select::BandBlock> blocks(static_cast<size_t>(first.back()));
  const std::span<BlockOut> lists =
      any_listed ? cleared_block_lists(first.back()) : std::span<BlockOut>();
  parallel_claims(0, first.back(), 1, [&](Claims& claims) {
    std::optional<ListScratch> scratch;
    for (int64_t bi; claims.next_index(bi);)
      each_global_block(kern, first, bi, bi + 1, [&](size_t i, const auto& t, int64_t b,
                                                      int64_t e, int64_t) {
        select::BandBlock& o = blocks[size_t(bi)];
        if (!listed[i]) return count_block(t, b, e, lo, hi, /*added=*/false, o);
        if (!scratch) scratch.emplace(/*few_hits=*/true);
        BlockOut& l = lists[size_t(bi)];
        list_block(t, b, e, lo, hi, /*added=*/false, /*values=*/false, /*tile_keys=*/false,
                   *scratch, l);
        o.above = l.winners;
        o.keys = l.ckey;
      });
  });
  const auto [w, cnt] = band_counts(blocks);
  if (!band_holds(w, cnt, k, kern.approx())) return run_global_fallback(kern, k, true);
  const auto [at_least, tie] = choose_in_band(blocks, k - w, lo, hi);
  parallel_for_claimed(0, first.back(), 1, [&](int64_t b0, int64_t b1) {
    each_global_block(kern, first, b0, b1, [&](size_t i, const auto& t, int64_t b, int64_t e,
                                                int64_t bi) {
      const select::BandBlock& o = blocks[size_t(bi)];
      if (!listed[i]) return stream_block(t, b, e, o, at_least, tie);
      // The listed winners, and the candidates the stream's compare would take: keys at
      // or above at_least, and the block's first o.ties keys equal to tie.
      BlockOut& l = lists[size_t(bi)];
      int64_t ties = o.ties;
      for (size_t j = 0; j < l.cpos.size(); ++j) {
        const bool take_tie = l.ckey[j] == tie && ties > 0;
        ties -= take_tie;
        if (l.ckey[j] >= at_least || take_tie) l.chosen.push_back(l.cpos[j]);
      }
      kern.update_listed(t, l, /*values=*/false);
    });
  });
}

}  // namespace incrkern::fused
