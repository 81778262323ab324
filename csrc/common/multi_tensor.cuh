// One kernel launch over many tensors, after PyTorch's MultiTensorApply.cuh: the
// host cuts every tensor into kChunk-element chunks and packs a table of
// (tensor, chunk) pairs into the kernel arguments; each block takes one chunk.
// A new launch starts when the table's tensor slots or block entries run out.
// Element offsets are 64-bit; chunk numbers are 32-bit (2^31 chunks of 64K).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace incrkern::cuda {

constexpr int64_t kChunk = 65536;
constexpr int kBlocksPerLaunch = 320;
constexpr int kThreads = 512;
constexpr int kILP = 4;  // elements per thread per step: 16-byte accesses for fp32

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
// items[0..n) (each item has an int64 `count`). Empty items are skipped.
template <int kSlots, typename Slot, typename Launch>
void for_each_launch(const Slot* items, int64_t n, Launch&& launch) {
  static_assert(kSlots > 0 && kSlots <= 255, "slot numbers are stored in a byte");
  ChunkTable<Slot, kSlots> table;
  int slots = 0, blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (items[i].count == 0) continue;
    const int64_t chunks = (items[i].count + kChunk - 1) / kChunk;
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

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("incrkern: ") + what + " launch failed: " +
                             cudaGetErrorString(err));
}

// Element conversions. torch builds extensions with __CUDA_NO_*_CONVERSIONS__, so
// bf16/fp16 convert through the intrinsics (round to nearest even, as torch).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// kILP consecutive elements moved as one aligned access.
template <typename T>
struct alignas(sizeof(T) * kILP) Pack {
  T v[kILP];
};

template <typename T>
__device__ __forceinline__ bool pack_aligned(const T* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % alignof(Pack<T>) == 0;
}

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T>*>(ptr);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& pack) {
  *reinterpret_cast<Pack<T>*>(ptr) = pack;
}

}  // namespace incrkern::cuda
