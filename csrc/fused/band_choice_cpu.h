// The band's answer in the fused CPU select-and-update (fused_cpu.cpp): the listing
// pass's per-block lists (winner tiles, the band's candidates), the need-th largest
// of the candidates' keys, and the candidates it chooses, ties to the lowest position;
// for a tensor of nearly all zeros, the k largest among its listed nonzero tiles.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "common/claims.h"
#include "fused/adam_tensor_cpu.h"
#include "select/band_kth_cpu.h"
#include "select/kth_cpu.h"
#include "select/scan_cpu.h"

namespace incrkern::fused {

using select::band_kth;
using select::BandBlock;
using select::BandKth;
using select::choose_in_band;
using select::kth_largest;
using select::ties_lowest_first;
using select::kTile;

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

// Whether the listing pass kept the keys of every block's listed tiles and tail
// winners (list_pass's tile_keys, which stops at a share of the block).
inline bool tile_keys_complete(std::span<const BlockOut> out) {
  for (const BlockOut& o : out)
    if (o.ckey.size() != o.wstart.size() * kTile + o.tail_winners.size()) return false;
  return true;
}

// The k-th largest of the keys kept by a listing of a tensor's nonzero tiles (each
// block's ckey: 16 a listed tile, then its tail winners'; more nonzeros than k),
// and per block how many of its keys equal to it are chosen, ties to the lowest
// position. The keys counted by their top 13 bits (a histogram per thread), then the
// k-th among the keys of its bin alone, gathered per block.
struct TileKeysKth {
  uint32_t kth;
  std::vector<int64_t> ties;
};

inline TileKeysKth tile_keys_kth(std::span<const BlockOut> out, int64_t k) {
  constexpr int kShift = 32 - 13;
  constexpr uint32_t kBins = uint32_t(1) << 13;
  const auto nblocks = int64_t(out.size());
  // Four copies a thread, so that neighbouring keys (a row's, in one bin) do not
  // each wait on the previous increment of their bin.
  std::vector<std::vector<uint32_t>> hists(size_t(at::get_num_threads()));
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t>& hist = hists[size_t(at::get_thread_num())];
    if (hist.empty()) hist.assign(4 * kBins, 0);
    for (int64_t bi = b0; bi < b1; ++bi) {
      const std::vector<uint32_t>& keys = out[size_t(bi)].ckey;
      size_t j = 0;
      for (; j + 4 <= keys.size(); j += 4)
        for (uint32_t c = 0; c < 4; ++c) ++hist[c * kBins + (keys[j + c] >> kShift)];
      for (; j < keys.size(); ++j) ++hist[keys[j] >> kShift];
    }
  });
  std::vector<uint32_t> total(kBins, 0);
  for (const std::vector<uint32_t>& hist : hists)
    for (size_t b = 0; b < hist.size(); ++b) total[b % kBins] += hist[b];
  uint32_t bin = kBins - 1;
  int64_t rank = k;
  for (; rank > int64_t(total[bin]); --bin) rank -= total[bin];
  const uint32_t base = bin << kShift, top = base + ((uint32_t(1) << kShift) - 1);
  std::vector<int64_t> greater(out.size());
  std::vector<std::vector<uint32_t>> in_bin(out.size());
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      int64_t above = 0;
      for (uint32_t key : out[size_t(bi)].ckey) {
        above += key > top;
        // One unsigned compare: a branch rarely taken, where key >= base alone was
        // taken at random.
        if (key - base <= top - base) in_bin[size_t(bi)].push_back(key);
      }
      greater[size_t(bi)] = above;
    }
  });
  std::vector<uint32_t> keys;
  for (const std::vector<uint32_t>& v : in_bin) keys.insert(keys.end(), v.begin(), v.end());
  TileKeysKth c{kth_largest(keys, rank, base, top), {}};
  int64_t ties = k;  // keys equal to kth still to take, lowest positions first
  std::vector<int64_t> equal(out.size());
  for (size_t bi = 0; bi < out.size(); ++bi) {
    for (uint32_t key : in_bin[bi]) greater[bi] += key > c.kth, equal[bi] += key == c.kth;
    ties -= greater[bi];
  }
  c.ties = ties_lowest_first(equal, ties);
  return c;
}

// The k largest keys of a tensor whose nonzero tiles a listing pass has listed, with
// their keys (tile_keys), more nonzeros than k: the k-th among the kept keys, then
// each listed tile's lanes above it and its ties, lowest positions first, updated as
// tiles. Returns k.
template <typename T>
int64_t run_among_nonzeros(const AdamTensor<T>& t, std::span<BlockOut> out, int64_t k) {
  const TileKeysKth c = tile_keys_kth(out, k);
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      BlockOut& o = out[size_t(bi)];
      int64_t ties = c.ties[size_t(bi)];
      const uint32_t* key = o.ckey.data();
      size_t kept = 0;
      for (size_t j = 0; j < o.wstart.size(); ++j, key += kTile) {
        uint32_t lanes = 0;
        for (int lane = 0; lane < kTile; ++lane) lanes |= uint32_t(key[lane] > c.kth) << lane;
        for (int lane = 0; ties > 0 && lane < kTile; ++lane)
          if (key[lane] == c.kth) lanes |= 1u << lane, --ties;
        if (lanes) o.wstart[kept] = o.wstart[j], o.wmask[kept++] = lanes;
      }
      o.wstart.resize(kept);
      o.wmask.resize(kept);
      t.tiles_ahead(o.wstart.data(), o.wmask.data(), int64_t(kept));
      for (int64_t e : o.tail_winners) {
        const bool tie = *key == c.kth && ties > 0;
        ties -= tie;
        if (*key++ > c.kth || tie) t.one(e);
      }
    }
  });
  return k;
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
