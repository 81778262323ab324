// The CPU kernel of incrkern::accumulate_, for callers inside the extension that
// have checked their lists and skip the dispatcher (csrc/fused/fused_step_py.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace incrkern {

void accumulate_cpu(at::TensorList accs, at::TensorList grads, double alpha,
                    at::TensorList sq_accs, double sq_alpha, double sq_decay,
                    const std::optional<at::Tensor>& amp_scale,
                    const std::optional<at::Tensor>& found_inf);

}  // namespace incrkern
