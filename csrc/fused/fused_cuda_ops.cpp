// Registers the CUDA fused select-and-update: checks the call (as the CPU kernel
// does), plans one selection group per non-empty tensor (select/select_plan.h) with
// the tensors' update table beside it, then launches select_find and the fused pass.
// Nothing is read back: the counts stay on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/cuda_glue.h"
#include "fused/fused_checks.h"
#include "fused/fused_cpu.h"
#include "fused/fused_cuda.h"
#include "select/select_plan.h"

namespace incrkern {
namespace {

at::Tensor adam_select_update_cuda(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                   at::TensorList steps, at::IntArrayRef ks,
                                   at::TensorList residuals, bool approx, double lr,
                                   double beta1, double beta2, double eps, double weight_decay,
                                   bool decoupled_weight_decay, bool maximize,
                                   double grad_scale, const std::optional<at::Tensor>& lr_tensor,
                                   bool increment_steps,
                                   const std::optional<at::Tensor>& amp_scale,
                                   const std::optional<at::Tensor>& found_inf) {
  const char* op = "incrkern.adam_select_update_";
  check_select_update(c10::DeviceType::CUDA, params, grads, exp_avgs, exp_avg_sqs, steps, ks,
                      residuals, lr_tensor, amp_scale, found_inf);
  const int64_t n = int64_t(params.size());
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = params[0].device();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device() == device, op, ": all params must be on one device, params[",
                i, "] is on ", params[i].device());
    TORCH_CHECK(cuda_dtype_of(params[i].scalar_type()), op, ": params[", i,
                "] must be float32, bfloat16 or float16 on CUDA, got ",
                params[i].scalar_type());
  }
  const c10::cuda::CUDAGuard guard(device);
  std::optional<at::Tensor> found = found_inf;
  if (!host_counts_may_skip(found, steps, increment_steps))
    return at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));
  const float* amp = amp_scale ? amp_scale->data_ptr<float>() : nullptr;

  std::vector<SelectInput> inputs;
  std::vector<std::vector<size_t>> groups;
  std::vector<int64_t> group_k;
  std::vector<cuda::FusedTensor> table;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    inputs.push_back(SelectInput{grads[i], residuals.empty() ? at::Tensor() : residuals[i],
                                 p.numel(), {}, residuals.empty() ? nullptr : amp});
    groups.push_back({inputs.size() - 1});
    group_k.push_back(ks[i]);
    cuda::FusedTensor f{};
    f.update.param = p.data_ptr();
    f.update.grad = grads[i].data_ptr();
    f.update.first_moment = exp_avgs[i].data_ptr<float>();
    f.update.second_moment = exp_avg_sqs[i].data_ptr<float>();
    f.update.count = p.numel();
    const at::Tensor& s = steps[i];
    f.update.step_on_device = s.is_cuda();
    // As the update glue: a host step is read through its pointer, the increment
    // below is already counted in.
    if (s.is_cuda()) f.update.step = s.data_ptr<float>();
    else f.update.step_value = *s.const_data_ptr<float>() + (increment_steps ? 1.0f : 0.0f);
    f.residual = residuals.empty() ? nullptr : residuals[i].data_ptr<float>();
    f.index = i;
    table.push_back(f);
  }
  std::vector<uint8_t> extra(table.size() * sizeof(cuda::FusedTensor));
  if (!table.empty()) std::memcpy(extra.data(), table.data(), extra.size());

  cuda::UpdateOptions options{};
  options.grad_scale = grad_scale;
  options.has_first_moment = options.has_second_moment = true;
  options.lr_on_device = lr_tensor.has_value();
  options.lr_ptr = lr_tensor ? lr_tensor->data_ptr<float>() : nullptr;
  options.amp_scale = amp;
  options.found_inf = found ? found->data_ptr<float>() : nullptr;
  const cuda::AdamArgs args{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                            maximize};
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));

  // Every check has passed: from here on the call changes its arguments.
  if (increment_steps) count_step(steps, found);
  if (groups.empty()) return counts;
  const SelectPlan plan =
      plan_select(inputs, residuals.empty() ? ScoreKind::Abs : ScoreKind::Accumulated, groups,
                  group_k, approx, device, extra);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cuda::select_find(plan.launch, stream);
  cuda::fused_adam_apply(plan.launch, reinterpret_cast<const cuda::FusedTensor*>(plan.extra),
                         options, args,
                         reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
                         stream);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CUDA, m) {
  m.impl("adam_select_update_", &adam_select_update_cuda);
  cuda_select_update_kernel = &adam_select_update_cuda;  // for the one-call step
}

}  // namespace incrkern
