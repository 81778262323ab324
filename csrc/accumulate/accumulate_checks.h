// Argument checks shared by the CPU and CUDA accumulate kernels. They run before
// any element is written, so a call that fails changes nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/dtypes.h"

namespace incrkern {

// `op` names the op; `allow_double`: fp64 grads are accepted (the CPU kernel).
inline void check_accumulate_lists(const char* op, at::TensorList accs, at::TensorList grads,
                                   at::TensorList sq_accs, bool allow_double) {
  const size_t n = grads.size();
  TORCH_CHECK(accs.empty() || accs.size() == n, op, ": accs has ", accs.size(),
              " tensors, expected ", n, " (or none)");
  TORCH_CHECK(sq_accs.empty() || sq_accs.size() == n, op, ": sq_accs has ", sq_accs.size(),
              " tensors, expected ", n, " (or none)");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const auto dev = g.device();
    TORCH_CHECK(dev == grads[0].device(), op, ": grads[", i, "] is on ", dev, ", grads[0] on ",
                grads[0].device(), ": one call takes one device");
    const auto gt = g.scalar_type();
    TORCH_CHECK(gt == at::kFloat || gt == at::kBFloat16 || gt == at::kHalf ||
                    (allow_double && gt == at::kDouble),
                op, ": grads[", i, "] has dtype ", gt, ", expected float32, bfloat16, float16",
                allow_double ? " or float64" : "");
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", i, "] must be contiguous");
    const auto acc_dtype = opmath_dtype(gt);  // the accumulators' dtype
    auto check_acc = [&](const char* name, const at::Tensor& a) {
      TORCH_CHECK(a.device() == dev && a.scalar_type() == acc_dtype && a.numel() == g.numel() &&
                      a.is_contiguous(),
                  op, ": ", name, "[", i, "] must be a contiguous ", acc_dtype, " tensor of ",
                  g.numel(), " elements on ", dev);
    };
    if (!accs.empty()) check_acc("accs", accs[i]);
    if (!sq_accs.empty()) check_acc("sq_accs", sq_accs[i]);
  }
}

}  // namespace incrkern
