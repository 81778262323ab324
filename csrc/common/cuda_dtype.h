// The element types of the CUDA kernels' plain interfaces (update, accumulate,
// select): torch-free, so that the .cu files compile without torch headers.
#pragma once

#include <cstdint>

namespace incrkern::cuda {

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2 };
constexpr int kDTypes = 3;

}  // namespace incrkern::cuda
