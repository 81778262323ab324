// The CUDA fused select-and-update's plain interface: raw pointers and a stream.
// The glue (fused_cuda_ops.cpp) plans the selection (select/select_plan.h), runs
// select_find, then fused_adam_apply (fused_sgd_apply) over the same launch.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fused/fused_pass.h"
#include "select/select_cuda.h"
#include "update/update_cuda.h"

namespace incrkern::cuda {

// Where each segment's selection state holds (selected by select_find), applies the
// Adam update with u = (r + g) * grad_scale (or g * grad_scale), in place; with
// residuals, r becomes 0 where chosen and r + g elsewhere. counts[index] gets the
// number of elements updated. Launches only; throws std::runtime_error on failure.
void fused_adam_apply(const SelectLaunch& launch, const FusedTensor* tensors,
                      const UpdateOptions& options, const AdamArgs& args,
                      unsigned long long* counts, cudaStream_t stream);

// The same with the SGD update (each FusedTensor's first_moment its momentum buffer,
// null without momentum; update.first: the buffer is new).
void fused_sgd_apply(const SelectLaunch& launch, const FusedTensor* tensors,
                     const UpdateOptions& options, const SgdArgs& args,
                     unsigned long long* counts, cudaStream_t stream);

}  // namespace incrkern::cuda
