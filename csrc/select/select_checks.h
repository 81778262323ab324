// Argument checks of the select ops, shared by the CPU and CUDA registrations.
// They run before any kernel, so a call that fails does nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "select/select_keys.h"  // ScoreKind

namespace incrkern {

struct SelectArgs {
  std::string score;
  ScoreKind kind;
};

inline SelectArgs check_select_args(const char* op, at::TensorList tensors, at::IntArrayRef ks,
                                    const std::string& score, bool global_scope,
                                    at::TensorList residuals, at::TensorList weights) {
  SelectArgs a{score, ScoreKind::Abs};
  if (score == "grad") a.kind = ScoreKind::Abs;
  else if (score == "weight") a.kind = ScoreKind::Abs;
  else if (score == "grad_sq") a.kind = ScoreKind::Signed;
  else if (score == "accumulated") a.kind = ScoreKind::Accumulated;
  else if (score == "random") a.kind = ScoreKind::Random;
  else
    TORCH_CHECK(false, op, ": score must be one of grad, grad_sq, weight, accumulated, random; got ",
                score);
  const size_t n = tensors.size();
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i].device() == tensors[0].device(), op, ": tensors[", i, "] is on ",
                tensors[i].device(), ", tensors[0] on ", tensors[0].device());
    total += tensors[i].numel();
  }
  if (global_scope) {
    TORCH_CHECK(ks.size() == 1, op, ": global scope takes one k, got ", ks.size());
    TORCH_CHECK(ks[0] >= 0 && ks[0] <= total, op, ": k must be in [0, ", total, "], got ", ks[0]);
  } else {
    TORCH_CHECK(ks.size() == n, op, ": ks has ", ks.size(), " entries, expected ", n);
    for (size_t i = 0; i < n; ++i)
      TORCH_CHECK(ks[i] >= 0 && ks[i] <= tensors[i].numel(), op, ": ks[", i, "] must be in [0, ",
                  tensors[i].numel(), "], got ", ks[i]);
  }
  if (a.kind == ScoreKind::Accumulated) {
    TORCH_CHECK(residuals.size() == n, op, ": score accumulated needs one residual per tensor, got ",
                residuals.size());
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& r = residuals[i];
      const bool wide = tensors[i].scalar_type() == at::kDouble;
      TORCH_CHECK(r.device() == tensors[i].device() && r.numel() == tensors[i].numel() &&
                      (r.scalar_type() == at::kFloat || (wide && r.scalar_type() == at::kDouble)),
                  op, ": residuals[", i, "] must be a float32", wide ? " or float64" : "",
                  " tensor of ", tensors[i].numel(), " elements on ", tensors[i].device());
    }
  }
  if (a.kind == ScoreKind::Abs && score == "weight") {
    TORCH_CHECK(weights.size() == n, op, ": score weight needs one weight tensor per tensor, got ",
                weights.size());
    for (size_t i = 0; i < n; ++i)
      TORCH_CHECK(weights[i].device() == tensors[i].device() &&
                      weights[i].numel() == tensors[i].numel(),
                  op, ": weights[", i, "] must have ", tensors[i].numel(), " elements on ",
                  tensors[i].device());
  }
  return a;
}

}  // namespace incrkern
