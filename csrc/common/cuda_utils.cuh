// Device utilities every CUDA kernel family uses: element conversions, kILP-wide
// aligned accesses, error checks.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "common/cuda_dtype.h"  // kILP

namespace incrkern::cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("incrkern: ") + what + " failed: " +
                             cudaGetErrorString(err));
}

// After a launch: a bad configuration is reported here, not at the next sync.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

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

// The `valid` (<= kILP) values at ptr as floats, zeros after them: one access when
// all kILP are there and aligned, else element by element.
template <typename T>
__device__ __forceinline__ void load_floats(const T* ptr, int valid, float (&out)[kILP]) {
  if (valid == kILP && pack_aligned(ptr)) {
    const Pack<T> p = load_pack(ptr);
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = to_float(p.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = j < valid ? to_float(ptr[j]) : 0.f;
  }
}

}  // namespace incrkern::cuda
