// The argument checks of incrkern::adam_select_update_, shared by its CPU and CUDA
// kernels: a bad call names the argument and changes nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "update/update_checks.h"

namespace incrkern {

inline void check_select_update(c10::DeviceType device_type, at::TensorList params,
                                at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList steps,
                                at::IntArrayRef ks, at::TensorList residuals,
                                const std::optional<at::Tensor>& lr_tensor,
                                const std::optional<at::Tensor>& amp_scale,
                                const std::optional<at::Tensor>& found_inf) {
  const char* op = "incrkern.adam_select_update_";
  const UpdateLists a{params, grads, exp_avgs, exp_avg_sqs, steps, {}, {}, {}, false, true};
  check_update_lists(op, a);
  check_lr_tensor(op, lr_tensor, params);
  check_amp(op, amp_scale, found_inf, params);
  const char* where = device_type == c10::DeviceType::CPU ? "the CPU" : "a CUDA device";
  const size_t n = params.size();
  TORCH_CHECK(ks.size() == n, op, ": ks has ", ks.size(), " entries, expected ", n);
  TORCH_CHECK(residuals.empty() || residuals.size() == n, op, ": residuals has ",
              residuals.size(), " tensors, expected ", n, " (or none)");
  for (size_t i = 0; i < n; ++i) {
    for (at::TensorList list : {params, grads, residuals}) request_tensors_ahead(list, i);
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device_type, op, ": params[", i, "] is on ", p.device(),
                ", expected ", where);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ",
                grads[i].scalar_type(), ", expected the param's ", p.scalar_type());
    TORCH_CHECK(ks[i] >= 0 && ks[i] <= p.numel(), op, ": ks[", i, "] must be in [0, ",
                p.numel(), "], got ", ks[i]);
    if (!residuals.empty()) {
      const at::Tensor& r = residuals[i];
      const auto math = opmath_dtype(p.scalar_type());
      TORCH_CHECK(r.device() == p.device() && r.scalar_type() == math &&
                      r.numel() == p.numel() && r.is_contiguous(),
                  op, ": residuals[", i, "] must be a contiguous ", math, " tensor of ",
                  p.numel(), " elements on ", p.device());
    }
  }
}

// The op's score: "grad" (|g|, or |r + g| with residuals) or, on the CPU, "weight"
// (|p|, no residuals). Returns whether it is "weight".
inline bool check_select_update_score(c10::string_view score, at::TensorList residuals,
                                      c10::DeviceType device_type) {
  const char* op = "incrkern.adam_select_update_";
  TORCH_CHECK(score == "grad" || score == "weight", op,
              ": score must be 'grad' or 'weight', got '", std::string(score), "'");
  if (score == "grad") return false;
  TORCH_CHECK(residuals.empty(), op, ": score='weight' takes no residuals (error feedback "
              "selects by |r + g|)");
  TORCH_CHECK(device_type == c10::DeviceType::CPU, op,
              ": score='weight' has a CPU kernel only (ops.adam_select_update_ composes "
              "select and adam_update_ on CUDA)");
  return true;
}

}  // namespace incrkern
