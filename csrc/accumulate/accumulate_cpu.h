// The CPU kernel of incrkern::accumulate_ after its argument checks
// (check_accumulate_lists, check_amp), for callers inside the extension that have run
// them and skip the dispatcher (csrc/fused/fused_step_py.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace incrkern {

void accumulate_checked(at::TensorList accs, at::TensorList grads, double alpha,
                        at::TensorList sq_accs, double sq_alpha, double sq_decay,
                        const std::optional<at::Tensor>& amp_scale,
                        const std::optional<at::Tensor>& found_inf);

}  // namespace incrkern
