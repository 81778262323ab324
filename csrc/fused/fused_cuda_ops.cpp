// Registers the CUDA fused select-and-update, Adam's and SGD's: checks the call (as
// the CPU kernel does), plans one selection group per non-empty tensor
// (select/select_plan.h) with the tensors' update table beside it (fused_table.h),
// then launches select_find and the fused pass.
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

// Every param on one CUDA device, of a dtype the kernels take.
void check_one_cuda_device(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device() == params[0].device(), op,
                ": all params must be on one device, params[", i, "] is on ",
                params[i].device());
    TORCH_CHECK(cuda_dtype_of(params[i].scalar_type()), op, ": params[", i,
                "] must be float32, bfloat16 or float16 on CUDA, got ",
                params[i].scalar_type());
  }
}

// The selection's inputs: per param its gradient, and with error feedback its
// residual, which the scores read as r + g / amp_scale.
std::vector<SelectInput> select_inputs(at::TensorList params, at::TensorList grads,
                                       at::TensorList residuals, const float* amp) {
  std::vector<SelectInput> inputs;
  for (size_t i = 0; i < params.size(); ++i)
    inputs.push_back(SelectInput{grads[i], residuals.empty() ? at::Tensor() : residuals[i],
                                 params[i].numel(), {}, residuals.empty() ? nullptr : amp});
  return inputs;
}

// The selection planned with the table beside it, select_find, then `apply` (the
// rule's fused pass) over the same launch, on the current stream.
template <typename Apply>
void run_fused(const std::vector<SelectInput>& inputs, at::TensorList residuals,
               const cuda::SelectGroups& groups, bool approx, const at::Device& device,
               const std::vector<cuda::FusedTensor>& table, at::Tensor& counts, Apply apply) {
  if (groups.groups.empty()) return;
  std::vector<uint8_t> extra(table.size() * sizeof(cuda::FusedTensor));
  if (!table.empty()) std::memcpy(extra.data(), table.data(), extra.size());
  const SelectPlan plan =
      plan_select(inputs, residuals.empty() ? ScoreKind::Abs : ScoreKind::Accumulated,
                  groups.groups, groups.ks, approx, device, extra);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cuda::select_find(plan.launch, stream);
  apply(plan.launch, reinterpret_cast<const cuda::FusedTensor*>(plan.extra),
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), stream);
}

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
  check_select_update(c10::DeviceType::CUDA, params, grads, exp_avgs, exp_avg_sqs, steps, ks,
                      residuals, lr_tensor, amp_scale, found_inf);
  check_select_update_score(score, params, residuals, scores.value_or(at::TensorList()),
                            c10::DeviceType::CUDA);
  check_one_cuda_device("incrkern.adam_select_update_", params);
  const int64_t n = int64_t(params.size());
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::optional<at::Tensor> found = found_inf;
  if (!host_counts_may_skip(found, steps, increment_steps))
    return at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));
  const float* amp = amp_scale ? amp_scale->data_ptr<float>() : nullptr;

  const cuda::SelectGroups groups = fused_groups(params, ks);
  const std::vector<SelectInput> inputs = select_inputs(params, grads, residuals, amp);
  const std::vector<cuda::FusedTensor> table =
      fused_table(groups, params, grads, exp_avgs, exp_avg_sqs, steps, residuals,
                  increment_steps, [](const at::Tensor& s) { return s.is_cuda(); });
  const cuda::UpdateOptions options =
      fused_options(grad_scale, lr_tensor ? lr_tensor->data_ptr<float>() : nullptr, amp,
                    found ? found->data_ptr<float>() : nullptr);
  const cuda::AdamArgs args{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                            maximize};
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));

  // Every check has passed: from here on the call changes its arguments.
  if (increment_steps) count_step(steps, found);
  run_fused(inputs, residuals, groups, approx, device, table, counts,
            [&](const cuda::SelectLaunch& L, const cuda::FusedTensor* t,
                unsigned long long* c, cudaStream_t stream) {
              cuda::fused_adam_apply(L, t, options, args, c, stream);
            });
  return counts;
}

at::Tensor sgd_select_update_cuda(at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum_buffers, at::IntArrayRef ks,
                                  at::TensorList residuals, c10::List<bool> first_step,
                                  bool approx, double lr, double momentum, double dampening,
                                  double weight_decay, bool nesterov, bool maximize,
                                  double grad_scale, const std::optional<at::Tensor>& lr_tensor,
                                  const std::optional<at::Tensor>& amp_scale,
                                  const std::optional<at::Tensor>& found_inf) {
  check_sgd_select_update(c10::DeviceType::CUDA, params, grads, momentum_buffers, ks, residuals,
                          first_step, momentum, lr_tensor, amp_scale, found_inf);
  check_one_cuda_device("incrkern.sgd_select_update_", params);
  const int64_t n = int64_t(params.size());
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const float* amp = amp_scale ? amp_scale->data_ptr<float>() : nullptr;
  const cuda::SelectGroups groups = fused_groups(params, ks);
  const std::vector<SelectInput> inputs = select_inputs(params, grads, residuals, amp);
  const at::TensorList buffers = momentum != 0 ? momentum_buffers : at::TensorList();
  const std::vector<cuda::FusedTensor> table =
      sgd_fused_table(groups, params, grads, buffers, residuals, first_step);
  const cuda::UpdateOptions options =
      fused_options(grad_scale, lr_tensor ? lr_tensor->data_ptr<float>() : nullptr, amp,
                    found_inf ? found_inf->data_ptr<float>() : nullptr);
  const cuda::SgdArgs args{lr, momentum, dampening, weight_decay, nesterov, maximize};
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong).device(device));
  // Every check has passed: from here on the call changes its arguments.
  run_fused(inputs, residuals, groups, approx, device, table, counts,
            [&](const cuda::SelectLaunch& L, const cuda::FusedTensor* t,
                unsigned long long* c, cudaStream_t stream) {
              cuda::fused_sgd_apply(L, t, options, args, c, stream);
            });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CUDA, m) {
  m.impl("adam_select_update_", &adam_select_update_cuda);
  m.impl("sgd_select_update_", &sgd_select_update_cuda);
  cuda_select_update_kernel = &adam_select_update_cuda;  // for the one-call step
}

}  // namespace incrkern
