// The element types of the CUDA kernels' plain interfaces (update, accumulate,
// select) and their access width: torch-free, so that the .cu files compile without
// torch headers, and CUDA-free, so that the host runs of the kernels use them too.
#pragma once

#include <cstdint>

namespace incrkern::cuda {

enum class DType : int32_t { Float32 = 0, BFloat16 = 1, Float16 = 2 };
constexpr int kDTypes = 3;

constexpr int kILP = 4;  // elements per thread per step: 16-byte accesses for fp32

}  // namespace incrkern::cuda
