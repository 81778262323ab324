// The CPU kernel of incrkern::adam_select_update_ after its argument checks
// (check_select_update, fused_checks.h), for callers inside the extension that have
// run them and skip the dispatcher (fused_step_py.cpp); and the op's kernels as the
// dispatcher calls them, for the one-call step's groups that take them. SGD's
// (sgd_select_update_) checks, shared by its CUDA glue, and CPU kernel after them, for
// sgd_step_py.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

#include "select/select_keys.h"  // KeyFrom

namespace incrkern {

// What a call does besides the update, as it reads every param's addresses.
struct Bookkeeping {
  bool increment_steps = false;  // each step count plus one before the update reads it
  // No two params share a step tensor (the caller knows): each count is incremented
  // and read as its param's addresses are, over the threads.
  bool steps_distinct = false;
  // The version counters of the tensors the call writes bumped, as the dispatcher's
  // ADInplaceOrView kernel bumps them for callers through it.
  bool bump_written = false;
};

// fisher_beta (score "grad_sq"): the scores are the Fisher before this step, and the
// call forms its EMA, f = fisher_beta * f + (1 - fisher_beta) * g^2, as accumulate_
// would before the call, where it reads the keys (the caller has checked the Fishers
// as accumulate_'s sq_accs). global_k (score "grad", CPU): the global_k largest
// keys over the concatenation of the params' (select(scope="global")), ks unread and
// the counts left 0: the one-call step, its only caller, reads none.
at::Tensor adam_select_update_checked(at::TensorList params, at::TensorList grads,
                                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                      at::TensorList steps, at::IntArrayRef ks,
                                      at::TensorList residuals, bool approx, double lr,
                                      double beta1, double beta2, double eps, double weight_decay,
                                      bool decoupled_weight_decay, bool maximize,
                                      double grad_scale,
                                      const std::optional<at::Tensor>& lr_tensor,
                                      Bookkeeping book,
                                      const std::optional<at::Tensor>& amp_scale,
                                      const std::optional<at::Tensor>& found_inf,
                                      KeyFrom key_from = KeyFrom::Grad,
                                      at::TensorList scores = {}, int64_t seed = 0,
                                      std::optional<double> fisher_beta = std::nullopt,
                                      std::optional<int64_t> global_k = std::nullopt);

// The op's CPU kernel (its checks, then the step), and the CUDA one, which
// fused_cuda_ops.cpp sets when the CUDA kernels are built (else null).
at::Tensor adam_select_update_cpu(at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList steps, at::IntArrayRef ks,
                                  at::TensorList residuals, bool approx, double lr, double beta1,
                                  double beta2, double eps, double weight_decay,
                                  bool decoupled_weight_decay, bool maximize, double grad_scale,
                                  const std::optional<at::Tensor>& lr_tensor,
                                  bool increment_steps,
                                  const std::optional<at::Tensor>& amp_scale,
                                  const std::optional<at::Tensor>& found_inf,
                                  c10::string_view score,
                                  std::optional<at::TensorList> scores, int64_t seed);
using SelectUpdateKernel = decltype(&adam_select_update_cpu);
extern SelectUpdateKernel cuda_select_update_kernel;

void check_sgd_select_update(c10::DeviceType device_type, at::TensorList params,
                             at::TensorList grads, at::TensorList momentum_buffers,
                             at::IntArrayRef ks, at::TensorList residuals,
                             const c10::List<bool>& first_step, double momentum,
                             const std::optional<at::Tensor>& lr_tensor,
                             const std::optional<at::Tensor>& amp_scale,
                             const std::optional<at::Tensor>& found_inf);
// global_k: as adam_select_update_checked's.
at::Tensor sgd_select_update_checked(at::TensorList params, at::TensorList grads,
                                     at::TensorList momentum_buffers, at::IntArrayRef ks,
                                     at::TensorList residuals, const c10::List<bool>& first_step,
                                     bool approx, double lr, double momentum, double dampening,
                                     double weight_decay, bool nesterov, bool maximize,
                                     double grad_scale, const std::optional<at::Tensor>& lr_tensor,
                                     const std::optional<at::Tensor>& amp_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     std::optional<int64_t> global_k = std::nullopt);

}  // namespace incrkern
