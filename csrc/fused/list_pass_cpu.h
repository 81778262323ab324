// The listing pass of the fused CPU select-and-update kernels (fused_cpu.cpp for Adam,
// sgd_fused_cpu.cpp for SGD with error feedback), over any tensor type that gives its
// keys, gradient and residual (fused::AdamTensor, fused::SgdTensor): one read of a
// large tensor's keys listing, per block, the tiles holding a key above a band and the
// band's (key, position) candidates, with error feedback's r += g or the Fisher's EMA
// formed a chunk at a time as it reads (docs/design.md, "Fused select-and-update: the
// tile lists").
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "common/claims.h"
#include "common/rules.h"
#include "fused/band_choice_cpu.h"
#include "fused/scans_cpu.h"
#include "select/radix_cpu.h"
#include "select/scan_cpu.h"
#include "select/select_keys.h"

namespace incrkern::fused {

using select::abs_key32;
using select::kBlock;
using select::order_greater_than;

constexpr int64_t kChunkTiles = 256;  // tiles per scan of the listing pass (4K elements)
// The listed tiles' keys (tile_keys) are kept while they hold at most
// 1 / kTileKeysShare of each block's elements.
constexpr int64_t kTileKeysShare = 4;
// A large tensor whose probe of kNonzeroProbe keys finds at most kNonzeroProbeMost
// nonzero: one tensor's step lists its nonzero tiles without a sample (fused_cpu.cpp,
// run_band), their keys kept (tile_keys); the global stream lists its blocks instead
// of streaming them (global_cpu.h).
constexpr int64_t kNonzeroProbe = 512;
constexpr int64_t kNonzeroProbeMost = 12;
// The fraction of tiles holding a key >= L under which the listing pass branches per
// tile (fused/scans_cpu.h, list_tiles: few_hits).
constexpr double kFewHits = 0.03;

// Whether nearly no tile is expected to hold a chosen key at k of n (list_pass's
// few_hits for a thread's first chunk).
inline bool few_hits(int64_t k, int64_t n) {
  return 1.4 * double(k) / double(n) * select::kTile < kFewHits;
}

// One thread's buffers for the listing pass: a chunk's tiles holding candidates, the
// block's tiles holding winners (written here, then copied out at their length: a
// block-sized vector per block would be zeroed whole), and whether the last chunk's
// tiles said that nearly none holds a key >= lo (`few`).
struct ListScratch {
  uint32_t cmask[kChunkTiles];
  int64_t cstart[kChunkTiles];
  std::unique_ptr<int64_t[]> wstart{new int64_t[kBlock / kTile]};
  std::unique_ptr<uint32_t[]> wmask{new uint32_t[kBlock / kTile]};
  bool few;
  explicit ListScratch(bool few_hits) : few(few_hits) {}
};

// The listing pass over the block [begin, end) of t into o: the winners (key > hi) and
// the candidates (lo <= key <= hi), keys read from t.stored_keys() or else t.own_keys()
// (g, or p by |p|). Keys not yet `added` (a residual's u = r + g, a Fisher's EMA) are
// formed a chunk at a time, written first. `values` (no residual): the listed lanes'
// gradients kept too (BlockOut::wval, cval). `tile_keys` (winners only, lo > hi): the
// keys of every listed tile's 16 lanes, then of the tail's winners, kept in
// BlockOut::ckey while they are at most 1 / kTileKeysShare of the block's elements
// (tile_keys_complete).
template <typename Tensor>
void list_block(const Tensor& t, int64_t begin, int64_t end, uint32_t lo, uint32_t hi,
                bool added, bool values, bool tile_keys, ListScratch& s, BlockOut& o) {
  const int32_t lo_gt = order_greater_than<false>(lo);
  const int32_t hi_gt = order_greater_than<false>(uint64_t(hi) + 1);
  const auto* stored = t.stored_keys();
  const auto* own = t.own_keys();
  int64_t* const wstart = s.wstart.get();
  uint32_t* const wmask = s.wmask.get();
  const int64_t whole = begin + (end - begin) / kTile * kTile;
  TileLists l{wstart, wmask, 0, s.cstart, s.cmask, 0, 0};
  for (int64_t e = begin; e < whole; e += kChunkTiles * kTile) {
    const int64_t tiles = std::min(kChunkTiles, (whole - e) / kTile);
    const int64_t listed = l.nw;
    l.nc = 0;
    if (!added) t.accumulate_keys(e, e + tiles * kTile);
    const float* keys = stored ? static_cast<const float*>(stored + e) : nullptr;
    if (keys) list_tiles(keys, tiles, lo_gt, hi_gt, e, l, s.few);
    else list_tiles(own + e, tiles, lo_gt, hi_gt, e, l, s.few);
    // The scan with a branch per tile pays where nearly no tile holds a key >= lo;
    // after the first chunk the last chunk's tiles say so, not the density: an
    // embedding's chosen keys fill the rows of the batch's tokens, in a few tiles.
    s.few = double(l.nw - listed + l.nc) < kFewHits * double(tiles);
    if (tile_keys && l.nw * kTile <= (end - begin) / kTileKeysShare) {
      // Every lane of the new tiles, read while in cache (0 where not listed).
      const size_t at = o.ckey.size();
      o.ckey.resize(at + size_t(l.nw - listed) * kTile);
      const auto keep = [&](const auto* x) {
        uint32_t* key = o.ckey.data() + at;
        for (int64_t j = listed; j < l.nw; ++j, key += kTile)
          for (int lane = 0; lane < kTile; ++lane)
            key[lane] = abs_key32(float(x[wstart[j] + lane]));
      };
      if (stored) keep(stored);
      else keep(own);
    }
    for (int64_t j = 0; j < l.nc; ++j)
      for (uint32_t mc = s.cmask[j]; mc; mc &= mc - 1) {
        const int64_t q = s.cstart[j] + __builtin_ctz(mc);
        o.ckey.push_back(t.key(q));
        o.cpos.push_back(q);
        if (values) o.cval.push_back(float(t.g[q]));
      }
    if (values) {
      // Gathered here, then appended once a chunk: a push a lane kept reloading
      // and storing the vector's end.
      float kept[kChunkTiles * kLaneByLane];
      int64_t nkept = 0;
      for (int64_t j = listed; j < l.nw; ++j)
        if (lanes_set(wmask[j]) <= kLaneByLane)
          for (uint32_t mw = wmask[j]; mw; mw &= mw - 1)
            kept[nkept++] = float(t.g[wstart[j] + __builtin_ctz(mw)]);
      o.wval.insert(o.wval.end(), kept, kept + nkept);
    }
  }
  o.wstart.assign(wstart, wstart + l.nw);
  o.wmask.assign(wmask, wmask + l.nw);
  o.winners = l.w;
  for (int64_t e = whole; e < end; ++e) {
    if (!added) t.accumulate_keys(e, e + 1);
    const uint32_t key = t.key(e);
    if (key > hi) {
      o.tail_winners.push_back(e);
      ++o.winners;
      if (tile_keys) o.ckey.push_back(key);
    } else if (key >= lo) {
      o.ckey.push_back(key);
      o.cpos.push_back(e);
      if (values) o.cval.push_back(float(t.g[e]));
    }
  }
}

// The listing pass over a large tensor's n elements, per block (list_block), over every
// thread. few_hits: whether nearly no tile is expected to hold a key >= lo, for a
// thread's first chunk (each later one goes by the chunk before it).
template <typename Tensor>
std::span<BlockOut> list_pass(const Tensor& t, int64_t n, uint32_t lo, uint32_t hi,
                              bool added, bool few_hits, bool values, bool tile_keys = false) {
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  const std::span<BlockOut> out = cleared_block_lists(nblocks);
  parallel_claims(0, nblocks, 1, [&](Claims& claims) {
    ListScratch s(few_hits);
    for (int64_t bi; claims.next_index(bi);)
      list_block(t, bi * kBlock, std::min(n, (bi + 1) * kBlock), lo, hi, added, values,
                 tile_keys, s, out[bi]);
  });
  return out;
}

// A listing pass's keys above the band (winners) and in it (candidates).
inline std::pair<int64_t, int64_t> listed_counts(std::span<const BlockOut> out) {
  int64_t winners = 0, candidates = 0;
  for (const BlockOut& o : out) winners += o.winners, candidates += int64_t(o.cpos.size());
  return {winners, candidates};
}

}  // namespace incrkern::fused
