// One kernel launch over many tensors, after PyTorch's MultiTensorApply.cuh: the
// host cuts every tensor into chunks and packs a table of (tensor, chunk) pairs
// into the kernel arguments; each block takes one chunk. A new launch starts when
// the table's tensor slots or block entries run out. Element offsets are 64-bit;
// chunk numbers are 32-bit.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace incrkern::cuda {

// Elements per block for streaming (dense) tensors: enough work per block to hide
// its start-up.
constexpr int64_t kChunk = 65536;
constexpr int kBlocksPerLaunch = 320;
constexpr int kThreads = 512;

template <typename Slot, int kSlots>
struct ChunkTable {
  Slot slots[kSlots];
  uint8_t block_slot[kBlocksPerLaunch];
  int32_t block_chunk[kBlocksPerLaunch];
};

// The largest slot count whose table, plus `extra` bytes of other kernel
// arguments, fits in the 4 KB of kernel parameters every CUDA version accepts.
template <typename Slot>
constexpr int slots_that_fit(int extra) {
  return int((4000 - extra - kBlocksPerLaunch * 5) / sizeof(Slot)) > 255
             ? 255
             : int((4000 - extra - kBlocksPerLaunch * 5) / sizeof(Slot));
}

// Calls launch(table, blocks) once per launch needed to cover every chunk of
// `chunk` elements of items[0..n) (each item has an int64 `count`). Empty items
// are skipped.
template <int kSlots, typename Slot, typename Launch>
void for_each_launch(const Slot* items, int64_t n, int64_t chunk, Launch&& launch) {
  static_assert(kSlots > 0 && kSlots <= 255, "slot numbers are stored in a byte");
  ChunkTable<Slot, kSlots> table;
  int slots = 0, blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (items[i].count == 0) continue;
    const int64_t chunks = (items[i].count + chunk - 1) / chunk;
    int slot = slots++;
    table.slots[slot] = items[i];
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_slot[blocks] = uint8_t(slot);
      table.block_chunk[blocks] = int32_t(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kBlocksPerLaunch || (slots == kSlots && last_chunk)) {
        launch(table, blocks);
        blocks = 0;
        if (last_chunk) {
          slots = 0;
        } else {  // the rest of this tensor's chunks go into the next table
          table.slots[0] = table.slots[slot];
          slot = 0;
          slots = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

}  // namespace incrkern::cuda
