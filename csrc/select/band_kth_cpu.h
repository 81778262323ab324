// The k-th among the keys a counting pass kept in a band around it, per block in
// position order, and how many of its ties each block takes: shared by the fused
// select-and-update's threshold stream (fused/fused_cpu.cpp), select_mask
// (select/select_cpu.cpp) and the fused step's listing pass (band_kth alone).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "common/claims.h"
#include "select/kth_cpu.h"

namespace incrkern::select {

// How many of `ties` keys equal to a k-th each block takes, where block b holds
// equal[b] of them: all of a block's before the next's, lowest positions first.
inline std::vector<int64_t> ties_lowest_first(const std::vector<int64_t>& equal,
                                              int64_t ties) {
  std::vector<int64_t> taken;
  taken.reserve(equal.size());
  for (int64_t eq : equal) taken.push_back(std::min(eq, ties)), ties -= taken.back();
  return taken;
}

// The need-th largest of a band's keys, kept per block in position order (keys_of(o):
// block o's), every key in [lo, hi], 0 < need < their count; and per block, how many
// of its keys equal it and how many of those are chosen, ties to the lowest position.
struct BandKth {
  uint32_t kth;
  std::vector<int64_t> equal, ties;
};

template <typename Blocks, typename KeysOf>
BandKth band_kth(const Blocks& blocks, KeysOf&& keys_of, int64_t need, uint32_t lo,
                 uint32_t hi) {
  // A dense step's band holds hundreds of thousands of keys, kept by the blocks of a
  // pass over every thread: one histogram of them per thread, in 2^11 bins of the
  // band, then the need-th largest among the keys of its bin alone.
  constexpr int kBits = 11;
  constexpr size_t kBins = size_t(1) << kBits;
  const int shift = std::max(0, int(std::bit_width(hi - lo)) - kBits);
  const auto nblocks = int64_t(blocks.size());
  std::vector<std::vector<uint32_t>> hists(size_t(at::get_num_threads()));
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t>& hist = hists[size_t(at::get_thread_num())];
    if (hist.empty()) hist.assign(kBins, 0);
    for (int64_t bi = b0; bi < b1; ++bi)
      for (uint32_t key : keys_of(blocks[size_t(bi)])) ++hist[(key - lo) >> shift];
  });
  std::vector<uint32_t> total(kBins, 0);
  for (const std::vector<uint32_t>& hist : hists)
    for (size_t b = 0; b < hist.size(); ++b) total[b] += hist[b];
  size_t bin = size_t((hi - lo) >> shift);
  int64_t rank = need;
  for (; rank > int64_t(total[bin]); --bin) rank -= total[bin];
  std::vector<uint32_t> keys;
  keys.reserve(total[bin]);
  for (const auto& o : blocks)
    for (uint32_t key : keys_of(o))
      if (size_t((key - lo) >> shift) == bin) keys.push_back(key);
  const uint32_t base = lo + (uint32_t(bin) << shift);
  const uint32_t top =
      uint32_t(std::min<uint64_t>(hi, uint64_t(base) + ((uint64_t(1) << shift) - 1)));
  BandKth b{kth_largest(keys, rank, base, top), std::vector<int64_t>(blocks.size()), {}};
  std::vector<int64_t> greater(blocks.size());
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      int64_t gt = 0, eq = 0;
      for (uint32_t key : keys_of(blocks[size_t(bi)])) gt += key > b.kth, eq += key == b.kth;
      greater[size_t(bi)] = gt, b.equal[size_t(bi)] = eq;
    }
  });
  int64_t ties = need;  // keys equal to kth still to take, lowest positions first
  for (int64_t gt : greater) ties -= gt;
  b.ties = ties_lowest_first(b.equal, ties);
  return b;
}

// Per block of a counting pass over a band [lo, hi]: the keys above it counted, those
// inside it kept in position order (select_mask counts those equal to lo in at_lo
// instead of keeping them); once the k-th is known, how many of the block's keys equal
// it and how many of those are chosen.
struct BandBlock {
  int64_t above = 0;
  std::vector<uint32_t> keys;
  int64_t at_lo = 0;
  int64_t equal = 0, ties = 0;
};

// A key a counting pass keeps in the band [lo, hi] into its block: lo's counted apart
// (at_lo), the others kept in order.
inline void keep_band_key(uint32_t key, uint32_t lo, BandBlock& o) {
  if (key == lo) ++o.at_lo;
  else o.keys.push_back(key);
}

// The chosen elements: every key >= at_least, and each block's first `ties` keys
// equal to tie.
struct BandChoice {
  uint64_t at_least;
  uint32_t tie;
};

// The choice of `need` more keys among the band's (need: k less the keys above the
// band; any value, an approximate count's too), each block's equal and ties set.
inline BandChoice choose_in_band(std::vector<BandBlock>& blocks, int64_t need, uint32_t lo,
                                 uint32_t hi) {
  int64_t kept = 0, at_lo = 0;
  for (const BandBlock& o : blocks) kept += int64_t(o.keys.size()), at_lo += o.at_lo;
  if (need <= 0) return {uint64_t(hi) + 1, 0};
  if (need >= kept + at_lo) return {lo, 0};
  if (need >= kept) {  // every key above lo, some equal to it
    std::vector<int64_t> equal;
    for (const BandBlock& o : blocks) equal.push_back(o.at_lo);
    const std::vector<int64_t> taken = ties_lowest_first(equal, need - kept);
    for (size_t bi = 0; bi < blocks.size(); ++bi)
      blocks[bi].equal = equal[bi], blocks[bi].ties = taken[bi];
    return {uint64_t(lo) + 1, lo};
  }
  const BandKth b = band_kth(
      blocks, [](const BandBlock& o) -> const std::vector<uint32_t>& { return o.keys; }, need,
      lo, hi);
  for (size_t bi = 0; bi < blocks.size(); ++bi)
    blocks[bi].equal = b.equal[bi], blocks[bi].ties = b.ties[bi];
  return {uint64_t(b.kth) + 1, b.kth};
}

}  // namespace incrkern::select
