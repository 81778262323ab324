// Argument checks shared by the CPU and CUDA update kernels. They run before any
// element is written, so a call that fails changes nothing.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/ahead.h"
#include "common/amp_checks.h"
#include "common/dtypes.h"

namespace incrkern {

// The tensors of one update call. The optimizer state is named by moment: Adam's
// exp_avgs are its first moments and exp_avg_sqs its second; SGD's momentum buffers
// are its first moments, and it has no second. AMSGrad keeps the largest second
// moment so far too (max_exp_avg_sqs; empty: no AMSGrad).
struct UpdateLists {
  at::TensorList params, grads, first_moments, second_moments, steps, indices, masks, ages;
  bool compact_state;
  bool has_second_moments;  // Adam: true; SGD: false
  at::TensorList max_second_moments = {};
};

inline void check_same_length(const char* name, at::TensorList list, size_t n, bool may_be_empty) {
  TORCH_CHECK(list.size() == n || (may_be_empty && list.empty()), "incrkern: ", name, " has ",
              list.size(), " tensors, expected ", n, may_be_empty ? " (or none)" : "");
}

// Checks every tensor of an update call against its param; `op` names the op.
inline void check_update_lists(const char* op, const UpdateLists& a) {
  const size_t n = a.params.size();
  check_same_length("grads", a.grads, n, false);
  if (a.has_second_moments) {
    check_same_length("exp_avgs", a.first_moments, n, false);
    check_same_length("exp_avg_sqs", a.second_moments, n, false);
  } else {
    check_same_length("momentum_buffers", a.first_moments, n, true);
  }
  if (!a.steps.empty() || a.has_second_moments) check_same_length("steps", a.steps, n, false);
  check_same_length("indices", a.indices, n, true);
  check_same_length("masks", a.masks, n, true);
  check_same_length("ages", a.ages, n, true);
  check_same_length("max_exp_avg_sqs", a.max_second_moments, n, true);
  TORCH_CHECK(a.max_second_moments.empty() || a.has_second_moments, op,
              ": max_exp_avg_sqs needs exp_avg_sqs");
  TORCH_CHECK(a.indices.empty() || a.masks.empty(), op, ": give indices or masks, not both");
  TORCH_CHECK(!a.compact_state || !a.indices.empty(), op, ": compact_state needs indices");
  for (size_t i = 0; i < n; ++i) {
    for (at::TensorList list : {a.params, a.grads, a.first_moments, a.second_moments, a.steps})
      request_tensors_ahead(list, i);
    const at::Tensor& p = a.params[i];
    const auto dev = p.device();
    TORCH_CHECK(at::isFloatingType(p.scalar_type()) && p.scalar_type() != at::kFloat8_e4m3fn,
                op, ": params[", i, "] must be a floating tensor, got ", p.scalar_type());
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    const auto math = opmath_dtype(p.scalar_type());
    const at::Tensor& g = a.grads[i];
    TORCH_CHECK(g.device() == dev, op, ": grads[", i, "] is on ", g.device(), ", params[", i,
                "] on ", dev);
    TORCH_CHECK(g.scalar_type() == p.scalar_type() || g.scalar_type() == math, op, ": grads[",
                i, "] has dtype ", g.scalar_type(), ", expected ", p.scalar_type(), " or ", math);
    TORCH_CHECK(g.numel() == p.numel() && g.is_contiguous(), op, ": grads[", i,
                "] must be contiguous with ", p.numel(), " elements");
    int64_t state_numel = p.numel();
    if (!a.indices.empty()) {
      const at::Tensor& idx = a.indices[i];
      TORCH_CHECK(idx.device() == dev && idx.scalar_type() == at::kLong && idx.dim() == 1 &&
                      idx.is_contiguous(),
                  op, ": indices[", i, "] must be a contiguous 1-D int64 tensor on ", dev);
      if (a.compact_state) state_numel = idx.numel();
    }
    if (!a.masks.empty()) {
      const at::Tensor& mk = a.masks[i];
      TORCH_CHECK(mk.device() == dev && mk.scalar_type() == at::kBool &&
                      mk.numel() == p.numel() && mk.is_contiguous(),
                  op, ": masks[", i, "] must be a contiguous bool tensor of ", p.numel(),
                  " elements on ", dev);
    }
    auto check_state = [&](const char* name, const at::Tensor& s, at::ScalarType dtype) {
      TORCH_CHECK(s.device() == dev && s.scalar_type() == dtype && s.numel() == state_numel &&
                      s.is_contiguous(),
                  op, ": ", name, "[", i, "] must be a contiguous ", dtype, " tensor of ",
                  state_numel, " elements on ", dev);
    };
    if (!a.first_moments.empty())
      check_state(a.has_second_moments ? "exp_avgs" : "momentum_buffers", a.first_moments[i],
                  math);
    if (a.has_second_moments) check_state("exp_avg_sqs", a.second_moments[i], math);
    if (!a.max_second_moments.empty())
      check_state("max_exp_avg_sqs", a.max_second_moments[i], math);
    if (!a.ages.empty()) check_state("ages", a.ages[i], at::kInt);
    if (!a.steps.empty()) {
      const at::Tensor& s = a.steps[i];
      TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat &&
                      (s.device() == dev || s.device().is_cpu()),
                  op, ": steps[", i, "] must be a float32 scalar on ", dev, " or the CPU");
    }
  }
}

// SGD's own arguments: one momentum buffer per param when momentum is used, and one
// first-step flag per param (or none).
inline void check_sgd_args(const char* op, double momentum, at::TensorList momentum_buffers,
                           const c10::List<bool>& first_step, at::TensorList params) {
  TORCH_CHECK(momentum == 0 || momentum_buffers.size() == params.size(), op,
              ": momentum != 0 needs one momentum buffer per param");
  TORCH_CHECK(first_step.size() == params.size() || first_step.size() == 0, op,
              ": first_step has ", first_step.size(), " entries, expected ", params.size());
}

inline void check_lr_tensor(const char* op, const std::optional<at::Tensor>& lr, at::TensorList params) {
  if (!lr.has_value()) return;
  TORCH_CHECK(lr->numel() == 1 && lr->scalar_type() == at::kFloat, op,
              ": lr_tensor must be a float32 scalar");
  TORCH_CHECK(params.empty() || lr->device() == params[0].device(), op,
              ": lr_tensor must be on the params' device");
}

}  // namespace incrkern
