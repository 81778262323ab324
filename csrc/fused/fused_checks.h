// The argument checks of incrkern::adam_select_update_, shared by its CPU and CUDA
// kernels (the residuals' by sgd_select_update_ too): a bad call names the argument
// and changes nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "select/select_keys.h"
#include "update/update_checks.h"

namespace incrkern {

// Error feedback's residuals[i] (none: nothing to check): a contiguous tensor of the
// param's math dtype and size, on its device.
inline void check_residual(const char* op, const at::Tensor& p, at::TensorList residuals,
                           size_t i) {
  if (residuals.empty()) return;
  const at::Tensor& r = residuals[i];
  const auto math = opmath_dtype(p.scalar_type());
  TORCH_CHECK(r.device() == p.device() && r.scalar_type() == math && r.numel() == p.numel() &&
                  r.is_contiguous(),
              op, ": residuals[", i, "] must be a contiguous ", math, " tensor of ", p.numel(),
              " elements on ", p.device());
}

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
    check_residual(op, p, residuals, i);
  }
}

// Where the keys of each of the op's score names are read, or nothing for another name.
inline std::optional<KeyFrom> key_from_score(c10::string_view score) {
  if (score == "grad") return KeyFrom::Grad;
  if (score == "weight") return KeyFrom::Param;
  if (score == "grad_sq") return KeyFrom::Scores;
  if (score == "random") return KeyFrom::Random;
  return std::nullopt;
}

// The score name whose keys are read from `key_from` (key_from_score's inverse).
inline const char* score_name(KeyFrom key_from) {
  switch (key_from) {
    case KeyFrom::Param: return "weight";
    case KeyFrom::Scores: return "grad_sq";
    case KeyFrom::Random: return "random";
    default: return "grad";
  }
}

// The op's score: "grad" (|g|, or |r + g| with residuals) or, on the CPU, "weight"
// (|p|), "grad_sq" (the given `scores`: the Fisher, one per param, of its math dtype)
// or "random" (a hash of the seed, the tensor's number and the index), none with
// residuals. Returns where the keys are read.
inline KeyFrom check_select_update_score(c10::string_view score, at::TensorList params,
                                         at::TensorList residuals, at::TensorList scores,
                                         c10::DeviceType device_type) {
  const char* op = "incrkern.adam_select_update_";
  const std::optional<KeyFrom> key_from = key_from_score(score);
  TORCH_CHECK(key_from.has_value(), op,
              ": score must be 'grad', 'weight', 'grad_sq' or 'random', got '",
              std::string(score), "'");
  TORCH_CHECK(*key_from == KeyFrom::Scores || scores.empty(), op,
              ": scores are for score='grad_sq' only, got ", scores.size(), " with score='",
              std::string(score), "'");
  if (*key_from == KeyFrom::Grad) return KeyFrom::Grad;
  TORCH_CHECK(residuals.empty(), op, ": score='", std::string(score), "' takes no residuals "
              "(error feedback selects by |r + g|)");
  TORCH_CHECK(device_type == c10::DeviceType::CPU, op, ": score='", std::string(score),
              "' has a CPU kernel only (ops.adam_select_update_ composes select and "
              "adam_update_ on CUDA)");
  if (*key_from != KeyFrom::Scores) return *key_from;
  TORCH_CHECK(scores.size() == params.size(), op, ": scores must hold one tensor per param (",
              params.size(), "), got ", scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& s = scores[i];
    const auto math = opmath_dtype(p.scalar_type());
    TORCH_CHECK(s.device() == p.device() && s.scalar_type() == math &&
                    s.numel() == p.numel() && s.is_contiguous(),
                op, ": scores[", i, "] must be a contiguous ", math, " tensor of ", p.numel(),
                " elements on ", p.device());
  }
  return KeyFrom::Scores;
}

}  // namespace incrkern
