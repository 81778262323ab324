// Registers the CUDA fused select-and-update: checks the call (as the CPU kernel
// does), plans one selection group per non-empty tensor (select/select_plan.h) with
// the tensors' update table beside it (fused_table.h), then launches select_find and
// the fused pass.
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
#include "fused/fused_table.h"
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
                                   const std::optional<at::Tensor>& found_inf,
                                   c10::string_view score,
                                   std::optional<at::TensorList> scores, int64_t /*seed*/) {
  const char* op = "incrkern.adam_select_update_";
  check_select_update(c10::DeviceType::CUDA, params, grads, exp_avgs, exp_avg_sqs, steps, ks,
                      residuals, lr_tensor, amp_scale, found_inf);
  check_select_update_score(score, params, residuals, scores.value_or(at::TensorList()),
                            c10::DeviceType::CUDA);
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

  const cuda::SelectGroups groups = fused_groups(params, ks);
  std::vector<SelectInput> inputs;
  for (int64_t i = 0; i < n; ++i)
    inputs.push_back(SelectInput{grads[i], residuals.empty() ? at::Tensor() : residuals[i],
                                 params[i].numel(), {}, residuals.empty() ? nullptr : amp});
  const std::vector<cuda::FusedTensor> table =
      fused_table(groups, params, grads, exp_avgs, exp_avg_sqs, steps, residuals,
                  increment_steps, [](const at::Tensor& s) { return s.is_cuda(); });
  std::vector<uint8_t> extra(table.size() * sizeof(cuda::FusedTensor));
  if (!table.empty()) std::memcpy(extra.data(), table.data(), extra.size());

  const cuda::UpdateOptions options =
      fused_options(grad_scale, lr_tensor ? lr_tensor->data_ptr<float>() : nullptr, amp,
                    found ? found->data_ptr<float>() : nullptr);
  const cuda::AdamArgs args{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                            maximize};
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));

  // Every check has passed: from here on the call changes its arguments.
  if (increment_steps) count_step(steps, found);
  if (groups.groups.empty()) return counts;
  const SelectPlan plan =
      plan_select(inputs, residuals.empty() ? ScoreKind::Abs : ScoreKind::Accumulated,
                  groups.groups, groups.ks, approx, device, extra);
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
