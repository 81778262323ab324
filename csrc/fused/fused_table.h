// What the CUDA fused select-and-update's glue (fused_cuda_ops.cpp) builds from a
// call's tensors before any kernel runs: its groups, one per non-empty tensor, and
// the tensor table the fused pass reads in segment order. Its host run
// (fused_on_host_cpu.cpp) builds them with the same code. CUDA-free.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "fused/fused_pass.h"
#include "select/select_tables.h"

namespace incrkern {

// A group per non-empty tensor, in input order (so segment s is the s-th non-empty
// tensor), k = 0 and k = n among them: the pass still writes the residuals of the one
// and updates every element of the other.
inline cuda::SelectGroups fused_groups(at::TensorList params, at::IntArrayRef ks) {
  cuda::SelectGroups g;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool empty = params[i].numel() == 0;
    g.settled.push_back(empty ? cuda::Settled::Nothing : cuda::Settled::No);
    if (!empty) g.groups.push_back({i}), g.ks.push_back(ks[i]);
  }
  return g;
}

// The entry of tensor i: its param, gradient, size, residual (none without error
// feedback) and place in the call; the rule's state the caller sets.
inline cuda::FusedTensor fused_entry(at::TensorList params, at::TensorList grads,
                                     at::TensorList residuals, size_t i) {
  cuda::FusedTensor f{};
  f.update.param = params[i].data_ptr();
  f.update.grad = grads[i].data_ptr();
  f.update.count = params[i].numel();
  f.residual = residuals.empty() ? nullptr : residuals[i].data_ptr<float>();
  f.index = int64_t(i);
  return f;
}

// The pass's tensor table, one entry per group. A step that step_on_device(s) says
// the kernel reads through its pointer (after the glue counts it, on the stream);
// any other is read here, the increment the glue then makes counted in.
template <typename StepOnDevice>
std::vector<cuda::FusedTensor> fused_table(const cuda::SelectGroups& groups,
                                           at::TensorList params, at::TensorList grads,
                                           at::TensorList exp_avgs,
                                           at::TensorList exp_avg_sqs, at::TensorList steps,
                                           at::TensorList residuals, bool increment_steps,
                                           StepOnDevice step_on_device) {
  std::vector<cuda::FusedTensor> table;
  for (const std::vector<size_t>& group : groups.groups) {
    const size_t i = group[0];
    cuda::FusedTensor f = fused_entry(params, grads, residuals, i);
    f.update.first_moment = exp_avgs[i].data_ptr<float>();
    f.update.second_moment = exp_avg_sqs[i].data_ptr<float>();
    const at::Tensor& s = steps[i];
    f.update.step_on_device = step_on_device(s);
    if (f.update.step_on_device) f.update.step = s.data_ptr<float>();
    else f.update.step_value = *s.const_data_ptr<float>() + (increment_steps ? 1.0f : 0.0f);
    table.push_back(f);
  }
  return table;
}

// SGD's tensor table: each group's momentum buffer (none without momentum) as its
// first moment, no second, first_step[i] (none: false) whether the buffer is new.
inline std::vector<cuda::FusedTensor> sgd_fused_table(const cuda::SelectGroups& groups,
                                                      at::TensorList params,
                                                      at::TensorList grads,
                                                      at::TensorList buffers,
                                                      at::TensorList residuals,
                                                      const c10::List<bool>& first_step) {
  std::vector<cuda::FusedTensor> table;
  for (const std::vector<size_t>& group : groups.groups) {
    const size_t i = group[0];
    cuda::FusedTensor f = fused_entry(params, grads, residuals, i);
    f.update.first_moment = buffers.empty() ? nullptr : buffers[i].data_ptr<float>();
    f.update.first = first_step.size() ? bool(first_step.get(i)) : false;
    table.push_back(f);
  }
  return table;
}

// The options every tensor of the pass shares; the scalars are device pointers on
// a GPU (null: none).
inline cuda::UpdateOptions fused_options(double grad_scale, const float* lr_ptr,
                                         const float* amp_scale, const float* found_inf) {
  cuda::UpdateOptions options{};
  options.grad_scale = grad_scale;
  options.has_first_moment = options.has_second_moment = true;
  options.lr_on_device = lr_ptr != nullptr;
  options.lr_ptr = lr_ptr;
  options.amp_scale = amp_scale;
  options.found_inf = found_inf;
  return options;
}

}  // namespace incrkern
