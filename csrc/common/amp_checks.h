// Mixed precision (torch.amp.GradScaler) arguments of the update, fused and
// accumulate ops: their checks, and the host-side reading for the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>
#include <utility>

namespace incrkern {

// Mixed precision (torch.amp.GradScaler): `amp_scale`, the loss scale the grads carry,
// and `found_inf`, nonzero when they hold an inf or NaN; each a float32 scalar on the
// params' device. The grads are read times 1 / amp_scale (folded into the call's own
// factor, in fp32); a nonzero found_inf makes the call change nothing at all.
inline void check_amp(const char* op, const std::optional<at::Tensor>& amp_scale,
                      const std::optional<at::Tensor>& found_inf, at::TensorList params) {
  for (const auto& [name, t] : {std::pair{"amp_scale", &amp_scale},
                                std::pair{"found_inf", &found_inf}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.numel() == 1 && v.scalar_type() == at::kFloat, op, ": ", name,
                " must be a float32 scalar");
    TORCH_CHECK(params.empty() || v.device() == params[0].device(), op, ": ", name,
                " must be on the params' device");
  }
}

// The scale's value, read on the host once per call (free for a CPU tensor).
inline std::optional<float> amp_value(const std::optional<at::Tensor>& amp_scale) {
  if (!amp_scale.has_value()) return std::nullopt;
  return amp_scale->item<float>();
}

// `factor` times 1 / amp_scale in the math type M: in fp32 as the CUDA kernels
// compute it from the device scalar, in fp64 for fp64 tensors. `factor` itself
// without a scale.
template <typename M>
M amp_factor(double factor, std::optional<float> amp) {
  if (!amp) return M(factor);
  if constexpr (std::is_same_v<M, double>) return factor * (1.0 / double(*amp));
  else return float(factor) * (1.0f / *amp);
}

// accumulate_'s sq_alpha times (1 / amp_scale)^2, likewise.
template <typename M>
M amp_sq_factor(double sq_alpha, std::optional<float> amp) {
  if (!amp) return M(sq_alpha);
  if constexpr (std::is_same_v<M, double>) {
    const double inv = 1.0 / double(*amp);
    return sq_alpha * (inv * inv);
  } else {
    const float inv = 1.0f / *amp;
    return float(sq_alpha) * (inv * inv);
  }
}

// Whether a CPU call is skipped (found_inf set). Read on the host: free for a CPU tensor.
inline bool amp_found_inf(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.0f;
}

}  // namespace incrkern
