// The math dtype of a tensor dtype, for the argument checks of every kernel family.
#pragma once

#include <c10/core/ScalarType.h>

namespace incrkern {

// The dtype the kernels compute in, and in which optimizer state and gradient
// accumulators are kept: float64 for float64 tensors, float32 for every other
// floating dtype (float32, bfloat16, float16), as at::opmath_type has it on the CPU.
inline c10::ScalarType opmath_dtype(c10::ScalarType t) {
  return t == c10::kDouble ? c10::kDouble : c10::kFloat;
}

}  // namespace incrkern
