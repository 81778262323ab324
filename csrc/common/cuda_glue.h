// Helpers of the CUDA registrations (*_cuda_ops.cpp): torch types to the kernels'
// plain ones.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>

#include "common/cuda_dtype.h"

namespace incrkern {

// The kernels' element type for t, or nothing when the CUDA kernels lack it.
inline std::optional<cuda::DType> cuda_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kHalf: return cuda::DType::Float16;
    default: return std::nullopt;
  }
}

// Mixed precision with step counts (update_cuda_ops.cpp): see there.
bool host_counts_may_skip(std::optional<at::Tensor>& found, at::TensorList steps,
                          bool increment_steps);
void count_step(at::TensorList steps, const std::optional<at::Tensor>& found);

}  // namespace incrkern
