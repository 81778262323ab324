// Registers the CUDA update kernels: checks the arguments (the same checks as the
// CPU path), groups the tensors by dtype and hands raw pointers to update_cuda.cu.
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_glue.h"
#include "update/update_checks.h"
#include "update/update_cuda.h"

namespace incrkern {
namespace {

cuda::DType cuda_dtype(const at::Tensor& t, const char* op) {
  const std::optional<cuda::DType> d = cuda_dtype_of(t.scalar_type());
  TORCH_CHECK(d, op, ": CUDA params must be float32, bfloat16 or float16, got ",
              t.scalar_type());
  return *d;
}

struct Prepared {
  std::vector<cuda::UpdateTensor> tensors;
  cuda::UpdateOptions options;
};

// Splits the call into groups of one (param dtype, grad dtype), the unit of a launch.
// `increment_steps`: the kernels are to see each step count plus one.
std::vector<Prepared> prepare(const char* op, const UpdateLists& a, const c10::List<bool>* first,
                              double grad_scale, bool consume_grad,
                              const std::optional<at::Tensor>& lr_tensor,
                              const std::optional<at::Tensor>& amp_scale,
                              const std::optional<at::Tensor>& found_inf,
                              bool increment_steps = false) {
  std::vector<Prepared> groups;
  for (size_t i = 0; i < a.params.size(); ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.is_cuda(), op, ": params[", i, "] is on ", p.device(), ", expected CUDA");
    TORCH_CHECK(p.device() == a.params[0].device(), op, ": all params must be on one device");
    cuda::UpdateOptions opt{};
    opt.param_dtype = cuda_dtype(p, op);
    opt.grad_is_fp32 = a.grads[i].scalar_type() != p.scalar_type();
    opt.grad_scale = grad_scale;
    opt.consume_grad = consume_grad;
    opt.compact_state = a.compact_state;
    // Which lists the call has, from the lists themselves (see UpdateOptions).
    opt.has_first_moment = !a.first_moments.empty();
    opt.has_second_moment = !a.second_moments.empty();
    opt.has_indices = !a.indices.empty();
    opt.has_mask = !a.masks.empty();
    opt.has_age = !a.ages.empty();
    opt.has_max_second_moment = !a.max_second_moments.empty();
    opt.lr_on_device = lr_tensor.has_value();
    opt.lr_ptr = lr_tensor ? lr_tensor->data_ptr<float>() : nullptr;
    opt.amp_scale = amp_scale ? amp_scale->data_ptr<float>() : nullptr;
    opt.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
    cuda::UpdateTensor t{};
    t.param = p.data_ptr();
    t.grad = a.grads[i].data_ptr();
    if (opt.has_first_moment) t.first_moment = a.first_moments[i].data_ptr<float>();
    if (opt.has_second_moment) t.second_moment = a.second_moments[i].data_ptr<float>();
    if (opt.has_max_second_moment)
      t.max_second_moment = a.max_second_moments[i].data_ptr<float>();
    t.count = p.numel();
    if (!a.steps.empty()) {
      const at::Tensor& s = a.steps[i];
      t.step_on_device = s.is_cuda();
      // A host step is read through its pointer: item() would go through the
      // dispatcher (a scalar tensor's full op call) once per param per step.
      if (t.step_on_device) t.step = s.data_ptr<float>();
      else t.step_value = *s.const_data_ptr<float>() + (increment_steps ? 1.0f : 0.0f);
    }
    if (opt.has_indices) {
      t.indices = a.indices[i].data_ptr<int64_t>();
      t.count = a.indices[i].numel();
    }
    if (opt.has_mask) t.mask = a.masks[i].data_ptr<bool>();
    if (opt.has_age) t.age = a.ages[i].data_ptr<int32_t>();
    t.first = first && first->size() ? bool(first->get(i)) : false;
    auto same = [&](const Prepared& g) {
      return g.options.param_dtype == opt.param_dtype && g.options.grad_is_fp32 == opt.grad_is_fp32;
    };
    auto it = std::find_if(groups.begin(), groups.end(), same);
    if (it == groups.end()) it = groups.insert(groups.end(), Prepared{{}, opt});
    it->tensors.push_back(t);
  }
  return groups;
}

}  // namespace

// A step count kept on the host (a CPU `steps` tensor) must know whether the step
// was skipped before it is counted: with such counts to increment, a CUDA found_inf
// is read here, one synchronisation (device counts, as with capturable=True, need
// none). Returns false when the call is to change nothing; then or after the read,
// `found` is cleared.
bool host_counts_may_skip(std::optional<at::Tensor>& found, at::TensorList steps,
                          bool increment_steps) {
  if (!found || !found->is_cuda() || !increment_steps) return true;
  const bool host = std::any_of(steps.begin(), steps.end(),
                                [](const at::Tensor& s) { return !s.is_cuda(); });
  if (!host) return true;
  const bool skip = found->item<float>() != 0.0f;
  found.reset();
  return !skip;
}

// The steps' counts plus one (minus found_inf on the device: a skipped step is not
// counted), device counts on the current stream.
void count_step(at::TensorList steps, const std::optional<at::Tensor>& found) {
  std::vector<at::Tensor> on_device;
  for (const at::Tensor& s : steps) {
    if (s.is_cuda()) on_device.push_back(s);
    else *s.data_ptr<float>() += 1.0f;
  }
  if (on_device.empty()) return;
  at::_foreach_add_(on_device, 1.0);
  if (found) at::_foreach_sub_(on_device, std::vector<at::Tensor>(on_device.size(), *found));
}

namespace {

void adam_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList indices,
                      at::TensorList masks, at::TensorList ages,
                      at::TensorList max_exp_avg_sqs, double lr, double beta1, double beta2,
                      double eps, double weight_decay, bool decoupled_weight_decay,
                      bool maximize, double grad_scale, bool consume_grad, bool compact_state,
                      const std::optional<at::Tensor>& lr_tensor, bool increment_steps,
                      const std::optional<at::Tensor>& amp_scale,
                      const std::optional<at::Tensor>& found_inf) {
  const char* op = "incrkern.adam_update_";
  const UpdateLists a{params, grads, exp_avgs, exp_avg_sqs, steps, indices, masks, ages,
                      compact_state, true, max_exp_avg_sqs};
  check_update_lists(op, a);
  check_lr_tensor(op, lr_tensor, params);
  check_amp(op, amp_scale, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::optional<at::Tensor> found = found_inf;
  if (!host_counts_may_skip(found, steps, increment_steps)) return;
  const cuda::AdamArgs args{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  const auto groups = prepare(op, a, nullptr, grad_scale, consume_grad, lr_tensor, amp_scale,
                              found, increment_steps);
  // Every check has passed: from here on the call changes its arguments.
  if (increment_steps) count_step(steps, found);
  for (const Prepared& g : groups)
    cuda::adam_update(g.tensors.data(), int64_t(g.tensors.size()), g.options, args,
                      c10::cuda::getCurrentCUDAStream());
}

void sgd_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList indices, at::TensorList masks, c10::List<bool> first_step,
                     double lr, double momentum, double dampening, double weight_decay,
                     bool nesterov, bool maximize, double grad_scale, bool consume_grad,
                     bool compact_state, const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& amp_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const char* op = "incrkern.sgd_update_";
  const UpdateLists a{params, grads, momentum_buffers, {}, {}, indices, masks, {},
                      compact_state, false};
  check_update_lists(op, a);
  check_lr_tensor(op, lr_tensor, params);
  check_sgd_args(op, momentum, momentum_buffers, first_step, params);
  check_amp(op, amp_scale, found_inf, params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cuda::SgdArgs args{lr, momentum, dampening, weight_decay, nesterov, maximize};
  // Without momentum the buffers (if given) are neither read nor written, as on the CPU.
  UpdateLists launch_lists = a;
  if (momentum == 0) launch_lists.first_moments = {};
  for (const Prepared& g :
       prepare(op, launch_lists, &first_step, grad_scale, consume_grad, lr_tensor, amp_scale,
               found_inf))
    cuda::sgd_update(g.tensors.data(), int64_t(g.tensors.size()), g.options, args,
                     c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CUDA, m) {
  m.impl("adam_update_", &adam_update_cuda);
  m.impl("sgd_update_", &sgd_update_cuda);
}

}  // namespace incrkern
