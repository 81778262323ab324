// CPU selection, part 3: the passes of the exact fallback (Selector::run_radix)
// over the whole input, cut into blocks of kBlock elements, one task each:
//  - digit_histogram: the count of every value of one digit (up to 11 bits) of the
//    keys that share the digits above it, with each bin's least and largest key;
//  - final_counts, final_write (final_pass does both): once the k-th key t is
//    known, the keys > t and the first ties at t written out, lowest positions
//    first. The tie guess (Selector::run) uses them too.
// The Selector's other passes over blocks (band_pass, merge) share Block and
// block_outputs.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "common/claims.h"
#include "select/scan_cpu.h"

namespace incrkern::select {

constexpr int64_t kBlock = int64_t(1) << 18;  // elements per block of work

// Up to this many elements, a selection sparse enough for the tile maxima
// (Selector::run_tile_max: k at most half the 16-element tiles) runs on one thread,
// side by side with the list's other small tensors: one read, then the chosen tiles
// again from the cache, beats a sample and a band pass over both threads.
constexpr int64_t kTileMaxNumel = int64_t(1) << 20;

inline bool tile_max_fits(int64_t n, int64_t k) {
  return n <= kTileMaxNumel && 2 * k <= (n + 15) / 16;
}

// A larger tensor that runs on one thread beside others (a list's mid-sized
// matrices: fused/fused_cpu.cpp) takes the tile maxima too when sparser still: its
// chosen tiles are then few enough that reading them again costs less than the
// sample and the candidates of a band.
constexpr int64_t kTileMaxBesideNumel = int64_t(1) << 23;
constexpr int64_t kTilesPerKeyBeside = 16;  // density up to 1/256

inline bool tile_max_fits_beside(int64_t n, int64_t k) {
  return n <= kTileMaxBesideNumel && kTilesPerKeyBeside * k <= (n + 15) / 16;
}

// Whether the selection of k of n elements runs on one thread (lists run those side
// by side) rather than over every thread.
inline bool one_thread_selection(int64_t n, int64_t k) {
  return n <= kBlock || tile_max_fits(n, k);
}

// A range of one source's elements: the unit of work of a pass.
struct Block {
  int src;
  int64_t begin, end;  // element range inside the source
};

// The blocks of the sources, in position order.
inline std::vector<Block> blocks_of(const std::vector<Source>& srcs) {
  std::vector<Block> blocks;
  for (int i = 0; i < int(srcs.size()); ++i)
    for (int64_t b = 0; b < srcs[i].n; b += kBlock)
      blocks.push_back(Block{i, b, std::min(srcs[i].n, b + kBlock)});
  return blocks;
}

// The outputs: one int64 tensor of per_src[i] positions for source i.
inline std::vector<at::Tensor> position_tensors(const std::vector<int64_t>& per_src) {
  std::vector<at::Tensor> outs;
  for (int64_t c : per_src) outs.push_back(at::empty({c}, at::TensorOptions().dtype(at::kLong)));
  return outs;
}

// Output tensors sized from per-block counts; offset[b] = block b's first slot.
inline std::vector<at::Tensor> block_outputs(const std::vector<Source>& srcs,
                                             const std::vector<Block>& blocks,
                                             const std::vector<int64_t>& count,
                                             std::vector<int64_t>& offset) {
  std::vector<int64_t> sizes(srcs.size(), 0);
  for (size_t bi = 0; bi < blocks.size(); ++bi) {
    offset[bi] = sizes[blocks[bi].src];
    sizes[blocks[bi].src] += count[bi];
  }
  return position_tensors(sizes);
}

// Histogram of one digit, with the smallest and largest key of each bin.
template <typename K>
struct DigitHistogram {
  std::vector<int64_t> count;
  std::vector<K> min, max;
};

// Histogram of the digit of width `bits` above bit `shift`, over the keys whose
// higher bits equal those of `prefix` (all keys when `top`). Per-thread
// histograms, four interleaved copies each (repeated bins would otherwise
// serialise on one counter).
template <typename K>
DigitHistogram<K> digit_histogram(const std::vector<Source>& srcs,
                                  const std::vector<Block>& blocks, K prefix, int shift,
                                  int bits, bool top) {
  const int nbins = 1 << bits;
  const int high = shift + bits;  // bits at and above are fixed by the prefix
  const K mask = K(nbins - 1);
  DigitHistogram<K> total{std::vector<int64_t>(nbins, 0),
                          std::vector<K>(nbins, std::numeric_limits<K>::max()),
                          std::vector<K>(nbins, K(0))};
  std::mutex mu;
  struct Bin {
    uint32_t n;
    K min, max;
  };
  // Copies kept apart by a few bins, so that equal bins of two copies do not
  // share their low 12 address bits (4K aliasing stalls the store forwarding).
  const size_t stride = size_t(nbins) + 5;
  parallel_claims(0, int64_t(blocks.size()), 1, [&](Claims& claims) {
    const Bin empty{0, std::numeric_limits<K>::max(), K(0)};
    std::vector<Bin> bins(4 * stride, empty);
    std::vector<int64_t> local(nbins, 0);
    for (int64_t bi; claims.next_index(bi);) {
      const Block& blk = blocks[bi];
      with_reader<K>(srcs[blk.src], [&](auto rd) {
        auto add = [&](size_t copy, K key) {
          Bin& x = bins[copy * stride + size_t((key >> shift) & mask)];
          ++x.n;
          x.min = std::min(x.min, key);
          x.max = std::max(x.max, key);
        };
        int64_t i = blk.begin;
        if (top) {
          for (; i + kTile <= blk.end; i += kTile) {
            K keys[kTile];
            tile_keys(rd, i, keys);
            for (int j = 0; j < kTile; ++j) add(size_t(j & 3), keys[j]);
          }
          for (; i < blk.end; ++i) add(0, rd(i));
        } else {
          const K want = prefix >> high;
          for (; i + kTile <= blk.end; i += kTile) {
            K keys[kTile];
            tile_keys(rd, i, keys);
            for (int j = 0; j < kTile; ++j)
              if ((keys[j] >> high) == want) add(size_t(j & 3), keys[j]);
          }
          for (; i < blk.end; ++i) {
            const K key = rd(i);
            if ((key >> high) == want) add(0, key);
          }
        }
      });
      // 32-bit counts flushed per block (a block has < 2^32 elements)
      for (size_t c = 0; c < 4; ++c)
        for (int d = 0; d < nbins; ++d) {
          local[d] += bins[c * stride + d].n;
          bins[c * stride + d].n = 0;
        }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int d = 0; d < nbins; ++d) {
      total.count[d] += local[d];
      for (size_t c = 0; c < 4; ++c) {
        total.min[d] = std::min(total.min[d], bins[c * stride + d].min);
        total.max[d] = std::max(total.max[d], bins[c * stride + d].max);
      }
    }
  });
  return total;
}

// The answer once its k-th key t is known, in two reads: per block, the keys > t
// and == t are counted (final_counts); block b then takes its keys > t and its
// first q_b keys == t, where the q_b add up to `ties`, lowest positions first
// (ties < 0: every key >= t) (final_write).
struct FinalCounts {
  std::vector<int64_t> greater, equal;  // per block: keys > t, keys == t
};

template <typename K>
FinalCounts final_counts(const std::vector<Source>& srcs, const std::vector<Block>& blocks,
                         K t) {
  const int64_t nb = int64_t(blocks.size());
  FinalCounts c{std::vector<int64_t>(nb), std::vector<int64_t>(nb)};
  parallel_for_claimed(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = blocks[bi];
      with_reader<K>(srcs[blk.src], [&](auto rd) {
        int64_t gt = 0, eq = 0;
        int64_t i = blk.begin;
        for (; i + kTile <= blk.end; i += kTile) {
          K keys[kTile];
          tile_keys(rd, i, keys);
          for (int j = 0; j < kTile; ++j) gt += keys[j] > t, eq += keys[j] == t;
        }
        for (; i < blk.end; ++i) {
          const K key = rd(i);
          gt += key > t, eq += key == t;
        }
        c.greater[bi] = gt;
        c.equal[bi] = eq;
      });
    }
  });
  return c;
}

template <typename K>
std::vector<at::Tensor> final_write(const std::vector<Source>& srcs,
                                    const std::vector<Block>& blocks, K t, int64_t ties,
                                    const FinalCounts& c) {
  const int64_t nb = int64_t(blocks.size());
  const std::vector<int64_t>& greater = c.greater;
  const std::vector<int64_t>& equal = c.equal;
  std::vector<int64_t> quota(nb), count(nb), offset(nb);
  int64_t left = ties < 0 ? std::numeric_limits<int64_t>::max() : ties;
  for (int64_t bi = 0; bi < nb; ++bi) {
    quota[bi] = std::min(left, equal[bi]);
    left -= quota[bi];
    count[bi] = greater[bi] + quota[bi];
  }
  std::vector<at::Tensor> outs = block_outputs(srcs, blocks, count, offset);
  parallel_for_claimed(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const Block& blk = blocks[bi];
      int64_t* dst = outs[blk.src].data_ptr<int64_t>() + offset[bi];
      int64_t q = quota[bi];
      with_reader<K>(srcs[blk.src], [&](auto rd) {
        auto one = [&](int64_t i, K key) {
          if (key > t) {
            *dst++ = i;
          } else if (key == t && q > 0) {
            *dst++ = i;
            --q;
          }
        };
        int64_t i = blk.begin;
        for (; i + kTile <= blk.end; i += kTile) {
          K keys[kTile];
          tile_keys(rd, i, keys);
#if defined(__SSE2__)
          if constexpr (sizeof(K) == 4) {
            // Masks: the keys > t, then the first ties while the quota lasts.
            uint32_t take = t == std::numeric_limits<K>::max() ? 0u : mask_greater(keys, t);
            if (q > 0) {
              uint32_t eq = (t == 0 ? 0xffffu : mask_greater(keys, t - 1)) & ~take;
              for (; eq && q > 0; eq &= eq - 1, --q) take |= eq & (~eq + 1);
            }
            for (; take; take &= take - 1) *dst++ = i + __builtin_ctz(take);
            continue;
          }
#endif
          if (!any_at_least(keys, t)) continue;
          for (int j = 0; j < kTile; ++j) one(i + j, keys[j]);
        }
        for (; i < blk.end; ++i) one(i, rd(i));
      });
    }
  });
  return outs;
}

template <typename K>
std::vector<at::Tensor> final_pass(const std::vector<Source>& srcs,
                                   const std::vector<Block>& blocks, K t, int64_t ties) {
  return final_write(srcs, blocks, t, ties, final_counts(srcs, blocks, t));
}

}  // namespace incrkern::select
