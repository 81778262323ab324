// The CUDA update kernels' plain interface: raw pointers and a stream, so that the
// .cu file needs no torch headers (it compiles in seconds, not minutes).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "update/update_args.h"

namespace incrkern::cuda {

// Both throw std::runtime_error on a launch failure.
void adam_update(const UpdateTensor* tensors, int64_t n, const UpdateOptions& options,
                 const AdamArgs& args, cudaStream_t stream);
void sgd_update(const UpdateTensor* tensors, int64_t n, const UpdateOptions& options,
                const SgdArgs& args, cudaStream_t stream);

}  // namespace incrkern::cuda
