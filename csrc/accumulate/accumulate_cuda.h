// The CUDA accumulate kernel's plain interface: raw pointers and a stream, so that
// the .cu file needs no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/cuda_dtype.h"

namespace incrkern::cuda {

// One gradient's share of an accumulate call: count elements of grad (of the
// call's grad dtype) into the fp32 accumulators acc and sq (unused when the call
// has no such list).
struct AccumulateTensor {
  const void* grad;
  float* acc;
  float* sq;
  int64_t count;
};

struct AccumulateArgs {
  float alpha, sq_alpha, sq_decay;
  // Mixed precision, device scalars or null: alpha and sq_alpha are taken times
  // 1 / *amp_scale and its square; a nonzero *found_inf skips the launch's work.
  const float* amp_scale;
  const float* found_inf;
  // Which accumulator lists the call has. Never inferred from a pointer: an empty
  // tensor's data pointer is null, so tensors[0].acc == nullptr says nothing about
  // the other tensors.
  bool has_acc, has_sq;
};

// Throws std::runtime_error on a launch failure.
void accumulate(const AccumulateTensor* tensors, int64_t n, DType grad_dtype,
                const AccumulateArgs& args, cudaStream_t stream);

}  // namespace incrkern::cuda
