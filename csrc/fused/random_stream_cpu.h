// The threshold stream of the fused select-and-update (fused_cpu.cpp) for the
// "random" score, whose keys are a hash of each element's index (select_keys.h):
// nothing is read to count them. The counting pass hashes a chunk of indices at a
// time and counts and keeps its keys as select_mask does (mask_scans_cpu.h); the
// update hashes them again, marks the chunk's chosen elements in a byte mask and runs
// the masked streaming loop over the chunk. Below the stream's density one pass of
// hashes lists the positions of the keys above the band and of the band's keys
// instead (list_random), and only the chosen positions are updated.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/claims.h"
#include "select/band_kth_cpu.h"
#include "select/mask_scans_cpu.h"
#include "select/select_keys.h"

namespace incrkern::fused {

constexpr int64_t kRandomChunk = 4096;

// Per block of `block` elements of [0, n): the keys above hi counted, those in
// [lo, hi] kept, lo's counted apart (at_lo) as select_mask's counting pass does.
inline std::vector<select::BandBlock> count_random(select::RandomKeys rk, int64_t n,
                                                   int64_t block, uint32_t lo, uint32_t hi) {
  const int64_t nblocks = (n + block - 1) / block;
  std::vector<select::BandBlock> out(static_cast<size_t>(nblocks));
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    uint32_t keys[kRandomChunk], kept[kRandomChunk + 8];
    for (int64_t bi = b0; bi < b1; ++bi) {
      select::BandBlock& o = out[size_t(bi)];
      const int64_t end = std::min(n, (bi + 1) * block);
      for (int64_t e = bi * block; e < end; e += kRandomChunk) {
        const int64_t len = std::min(kRandomChunk, end - e);
        select::random_keys(rk.kt, rk.kt2, e, len, keys);
        uint32_t* last = kept;
        o.above += select::keys_in_band(keys, len, lo, hi, last);
        for (const uint32_t* k = kept; k < last; ++k) select::keep_band_key(*k, lo, o);
      }
    }
  });
  return out;
}

// The chosen elements of each block (select::choose_in_band's at_least, tie and the
// blocks' ties) updated: per chunk the keys hashed again, a byte set for every key
// >= at_least and for the block's first `ties` keys equal to tie, then
// stream(begin, end, mask), the masked streaming loop.
template <typename Stream>
void update_random(select::RandomKeys rk, int64_t n, int64_t block,
                   const std::vector<select::BandBlock>& blocks, uint64_t at_least, uint32_t tie,
                   Stream&& stream) {
  parallel_for_claimed(0, int64_t(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    uint32_t keys[kRandomChunk];
    bool mask[kRandomChunk];
    for (int64_t bi = b0; bi < b1; ++bi) {
      int64_t ties = blocks[size_t(bi)].ties;
      const int64_t end = std::min(n, (bi + 1) * block);
      for (int64_t e = bi * block; e < end; e += kRandomChunk) {
        const int64_t len = std::min(kRandomChunk, end - e);
        select::random_keys(rk.kt, rk.kt2, e, len, keys);
        if (at_least > 0xffffffffu) std::fill(mask, mask + len, false);
        else if (at_least == 0) std::fill(mask, mask + len, true);
        else select::mark_keys(keys, len, uint32_t(at_least - 1), mask);
        for (int64_t j = 0; j < len && ties > 0; ++j)
          if (keys[j] == tie) mask[j] = true, --ties;
        stream(e, e + len, reinterpret_cast<const uint8_t*>(mask));
      }
    }
  });
}

// Per block of list_random: the positions of its keys above the band (`win`) and of
// its band keys (`band_pos`, their keys in the block's BandBlock::keys).
struct RandomLists {
  std::vector<int64_t> win, band_pos;
};

// One pass of hashes over [0, n), per block of `block` elements: bands[b] counts the
// keys above hi and keeps those in [lo, hi] (no at_lo), lists[b] their positions.
inline void list_random(select::RandomKeys rk, int64_t n, int64_t block, uint32_t lo,
                        uint32_t hi, std::vector<select::BandBlock>& bands,
                        std::vector<RandomLists>& lists) {
  const int64_t nblocks = (n + block - 1) / block;
  bands.assign(size_t(nblocks), {});
  lists.assign(size_t(nblocks), {});
  parallel_for_claimed(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    uint32_t keys[kRandomChunk];
    for (int64_t bi = b0; bi < b1; ++bi) {
      RandomLists& l = lists[size_t(bi)];
      select::BandBlock& o = bands[size_t(bi)];
      const int64_t end = std::min(n, (bi + 1) * block);
      for (int64_t e = bi * block; e < end; e += kRandomChunk) {
        const int64_t len = std::min(kRandomChunk, end - e);
        select::random_keys(rk.kt, rk.kt2, e, len, keys);
        select::list_band(keys, len, lo, hi, e, l.win, o.keys, l.band_pos);
      }
      o.above = int64_t(l.win.size());
    }
  });
}

// The chosen band positions of one block of list_random (choose_in_band's at_least,
// tie and the block's ties): keys >= at_least, and the first `ties` equal to tie.
inline std::vector<int64_t> chosen_in_band(const select::BandBlock& o, const RandomLists& l,
                                           uint64_t at_least, uint32_t tie) {
  std::vector<int64_t> chosen;
  int64_t ties = o.ties;
  for (size_t j = 0; j < o.keys.size(); ++j)
    if (o.keys[j] >= at_least || (o.keys[j] == tie && ties-- > 0))
      chosen.push_back(l.band_pos[j]);
  return chosen;
}

}  // namespace incrkern::fused
