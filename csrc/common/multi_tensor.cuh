// One kernel launch over many tensors, after PyTorch's MultiTensorApply.cuh: the
// host cuts every tensor into chunks and packs a table of tensors into the kernel
// arguments; each block takes one chunk. Unlike MultiTensorApply's table of one
// (tensor, chunk) entry per block, the table holds one entry per tensor (its
// first block and first chunk) and a block finds its tensor by binary search: a
// launch then has no block limit, so a 1e6-position indexed tensor (245 blocks) or
// a 1e9-element dense one is one launch, and the 4 KB of parameters go to tensor
// slots. Element offsets are 64-bit; chunk numbers are 32-bit.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace incrkern::cuda {

// Elements per block for streaming (dense) tensors: enough work per block to hide
// its start-up.
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
// Blocks of one launch; a tensor with more chunks continues in the next launch.
constexpr int32_t kMaxBlocksPerLaunch = int32_t(1) << 24;

template <typename Slot, int kSlots>
struct ChunkTable {
  Slot slots[kSlots];
  // Slot s covers blocks [first_block[s], first_block[s + 1]); entries past the
  // last slot hold INT32_MAX, so the search needs no slot count.
  int32_t first_block[kSlots + 1];
  int32_t first_chunk[kSlots];  // the chunk number of slot s's first block
};

// The largest slot count whose table, plus `extra` bytes of other kernel
// arguments, fits in the 4 KB of kernel parameters every CUDA version accepts.
template <typename Slot>
constexpr int slots_that_fit(int extra) {
  return int((4000 - extra - int(sizeof(int32_t))) / (sizeof(Slot) + 2 * sizeof(int32_t)));
}

// The slot and chunk number of block `block`: the last slot starting at or before
// it. Host and device, so the host can check the table covers every chunk once.
template <typename Slot, int kSlots>
__host__ __device__ __forceinline__ int64_t locate_chunk(const ChunkTable<Slot, kSlots>& table,
                                                         int32_t block, int& slot) {
  int lo = 0, hi = kSlots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_block[mid] <= block) lo = mid;
    else hi = mid - 1;
  }
  slot = lo;
  return int64_t(table.first_chunk[lo]) + (block - table.first_block[lo]);
}

// Calls launch(table, blocks) once per launch needed to cover every chunk of
// `chunk` elements of items[0..n) (each item has an int64 `count`). Empty items
// are skipped.
template <int kSlots, typename Slot, typename Launch>
void for_each_launch(const Slot* items, int64_t n, int64_t chunk, Launch&& launch) {
  static_assert(kSlots > 0, "no room for a tensor slot in the kernel parameters");
  ChunkTable<Slot, kSlots> table;
  int slots = 0;
  int32_t blocks = 0;
  auto flush = [&] {
    for (int s = slots; s <= kSlots; ++s) table.first_block[s] = s == slots ? blocks : INT32_MAX;
    launch(table, int(blocks));
    slots = 0;
    blocks = 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t chunks = (items[i].count + chunk - 1) / chunk;
    for (int64_t done = 0; done < chunks;) {
      const int64_t take = chunks - done < kMaxBlocksPerLaunch - blocks
                               ? chunks - done
                               : kMaxBlocksPerLaunch - blocks;
      table.slots[slots] = items[i];
      table.first_block[slots] = blocks;
      table.first_chunk[slots] = int32_t(done);
      ++slots;
      blocks += int32_t(take);
      done += take;
      if (slots == kSlots || blocks == kMaxBlocksPerLaunch) flush();
    }
  }
  if (slots > 0) flush();
}

}  // namespace incrkern::cuda
