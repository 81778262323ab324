// Device helpers of the select kernels that the fused select-and-update kernel
// (fused/fused_cuda.cu) shares: the keys of a tensor's elements; with the predicate
// a finished selection state gives them (select/radix_digits.h), both kernels
// choose the same elements.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/rules.h"
#include "select/radix_digits.h"
#include "select/select_cuda.h"
#include "select/select_keys.h"

namespace incrkern::cuda {

using select::abs_key32;
using select::random_key32;
using select::signed_key32;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// What an Accumulated score adds the gradient to the residual with: accumulate_'s
// alpha, 1 or the mixed-precision unscale (the fused kernel adds with the same).
__device__ __forceinline__ float residual_alpha(const SelSeg& s) {
  return amp_fold(1.f, s.amp_scale);
}

template <typename T>
__device__ __forceinline__ void keys4_typed(const SelSeg& s, ScoreKind kind, int64_t i,
                                            int valid, uint32_t (&key)[kILP]) {
  float v[kILP], r[kILP] = {};
  load_floats(static_cast<const T*>(s.data) + i, valid, v);
  if (kind == ScoreKind::Accumulated) load_floats(s.res + i, valid, r);
  const float alpha = residual_alpha(s);
#pragma unroll
  for (int j = 0; j < kILP; ++j) key[j] = select::score_key32(kind, v[j], r[j], alpha);
}

// Keys of elements i .. i + valid - 1 of tensor s (kind and dtype are uniform
// across a block, so the branches do not diverge).
__device__ __forceinline__ void keys4(const SelSeg& s, ScoreKind kind, int64_t i, int valid,
                                      uint32_t (&key)[kILP]) {
  if (kind == ScoreKind::Random) {
#pragma unroll
    for (int j = 0; j < kILP; ++j) key[j] = random_key32(s.kt, s.kt2, i + j);
    return;
  }
  switch (s.dtype) {
    case DType::Float32: return keys4_typed<float>(s, kind, i, valid, key);
    case DType::BFloat16: return keys4_typed<__nv_bfloat16>(s, kind, i, valid, key);
    case DType::Float16: return keys4_typed<__half>(s, kind, i, valid, key);
  }
}

__device__ __forceinline__ uint32_t key1(const SelSeg& s, ScoreKind kind, int64_t i) {
  uint32_t key[kILP];
  keys4(s, kind, i, 1, key);
  return key[0];
}

}  // namespace incrkern::cuda
