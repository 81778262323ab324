// The CUDA accumulate kernel's plain interface: raw pointers and a stream, so that
// the .cu file needs no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace incrkern::cuda {

enum class GradDType : int { Float32, BFloat16, Float16 };

// One gradient's share of an accumulate call: count elements of grad (of the
// call's grad dtype) into the fp32 accumulators acc and sq, either of which may be
// null.
struct AccumulateTensor {
  const void* grad;
  float* acc;
  float* sq;
  int64_t count;
};

struct AccumulateArgs {
  float alpha, sq_alpha, sq_decay;
};

// Throws std::runtime_error on a launch failure.
void accumulate(const AccumulateTensor* tensors, int64_t n, GradDType grad_dtype,
                const AccumulateArgs& args, cudaStream_t stream);

}  // namespace incrkern::cuda
