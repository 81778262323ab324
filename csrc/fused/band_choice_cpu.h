// The band's answer in the fused CPU select-and-update (fused_cpu.cpp): the listing
// pass's per-block lists (winner tiles, the band's candidates), the need-th largest
// of the candidates' keys, and the candidates it chooses, ties to the lowest position.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "common/claims.h"
#include "select/kth_cpu.h"

namespace incrkern::fused {

using select::kth_largest;

// Per block of the listing pass: the tiles holding a winner (first element, winner
// lanes, ascending), the winners of the tensor's last few elements that fill no
// tile, and the candidates in position order.
struct BlockOut {
  std::vector<int64_t> wstart;
  std::vector<uint32_t> wmask;
  std::vector<int64_t> tail_winners;
  int64_t winners = 0;
  std::vector<uint32_t> ckey;
  std::vector<int64_t> cpos;
  std::vector<int64_t> chosen;  // the candidates chosen, ascending
  // When the listing pass keeps values (without a residual): the gradients of the
  // lanes of every listed tile updated lane by lane (at most kLaneByLane lanes; tile
  // order, lanes ascending) and of every candidate, kept while the pass has their
  // lines in cache. The update then reads them here, in order, not from g's lines
  // (each a wait on memory, as p's, m's and v's are). A fuller tile reads its
  // gradient line (adam_tiles).
  std::vector<float> wval, cval, chosen_val;

  void clear() {
    for (auto* list : {&wstart, &tail_winners, &cpos, &chosen}) list->clear();
    for (auto* list : {&wval, &cval, &chosen_val}) list->clear();
    wmask.clear();
    ckey.clear();
    winners = 0;
  }
};

// The listing pass's per-block lists for nblocks blocks, cleared, kept on the calling
// thread from call to call with their capacity: freed after every step, their pages
// went back to the system and each step faulted them in again (docs/measurements.md,
// "One large tensor's update"). They hold about 16 bytes per chosen element of the
// largest tensor seen.
inline std::span<BlockOut> cleared_block_lists(int64_t nblocks) {
  thread_local std::vector<BlockOut> lists;
  if (int64_t(lists.size()) < nblocks) lists.resize(size_t(nblocks));
  const std::span<BlockOut> out(lists.data(), size_t(nblocks));
  for (BlockOut& o : out) o.clear();
  return out;
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
  for (int64_t equal : b.equal) b.ties.push_back(std::min(equal, ties)), ties -= b.ties.back();
  return b;
}

// The (key, position) candidates chosen to complete `need` winners: the need largest,
// ties to the lowest position; all of them when they are at most need. Every key
// lies in the band [lo, hi]. `values`: the listing pass kept the gradients.
inline void choose_candidates(std::span<BlockOut> out, int64_t need, uint32_t lo, uint32_t hi,
                       bool values) {
  int64_t cnt = 0;
  for (const BlockOut& o : out) cnt += int64_t(o.cpos.size());
  if (need <= 0) return;
  if (cnt <= need) {
    for (BlockOut& o : out) o.chosen = o.cpos, o.chosen_val = o.cval;
    return;
  }
  const BandKth b = band_kth(
      out, [](const BlockOut& o) -> const std::vector<uint32_t>& { return o.ckey; }, need, lo,
      hi);
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      BlockOut& o = out[size_t(bi)];
      int64_t ties = b.ties[size_t(bi)];
      // Without a branch: a band's candidate is chosen about as often as not.
      const size_t n = o.cpos.size();
      o.chosen.resize(n);
      if (values) o.chosen_val.resize(n);
      size_t c = 0;
      for (size_t j = 0; j < n; ++j) {
        const bool tie = (o.ckey[j] == b.kth) & (ties > 0);
        o.chosen[c] = o.cpos[j];
        if (values) o.chosen_val[c] = o.cval[j];
        c += size_t(o.ckey[j] > b.kth) | size_t(tie);
        ties -= tie;
      }
      o.chosen.resize(c);
      if (values) o.chosen_val.resize(c);
    }
  });
}

}  // namespace incrkern::fused
