// The update kernels' tables: what one param of a call holds and what the call
// shares, as plain structs. CUDA-free, so that the host run of the fused
// select-and-update (fused/fused_on_host_cpu.cpp) fills the same ones.
#pragma once

#include <cstdint>

#include "common/cuda_dtype.h"

namespace incrkern::cuda {

// One param's share of an update call. Positions j in [0, count) address the
// element indices[j] (or j without indices); its state lives at slot j when
// compact, else at the element. A pointer whose list the call lacks (see the
// has_* flags of UpdateOptions) is unused.
struct UpdateTensor {
  void* param;
  void* grad;
  float* first_moment;   // Adam's exp_avg, or SGD's momentum buffer
  float* second_moment;  // Adam's exp_avg_sq
  float* max_second_moment;  // AMSGrad's max_exp_avg_sq
  const float* step;     // the device scalar, when step_on_device
  const int64_t* indices;
  const bool* mask;
  int32_t* age;          // per-slot update count
  int64_t count;
  float step_value;      // the step count, when it lives on the host
  bool step_on_device;
  bool first;            // SGD: the momentum buffer is new
};

// What one launch group shares. Which lists the call has is passed explicitly,
// never inferred from a data pointer: an empty tensor's pointer is null, so one
// tensor's pointer says nothing about the call.
struct UpdateOptions {
  DType param_dtype;
  bool grad_is_fp32;    // grads in fp32 (accumulators, residuals) rather than the param dtype
  double grad_scale;
  bool consume_grad;
  bool compact_state;
  bool has_first_moment, has_second_moment, has_indices, has_mask, has_age;
  bool has_max_second_moment;  // AMSGrad
  bool lr_on_device;
  const float* lr_ptr;  // device scalar overriding lr, when lr_on_device
  // Mixed precision, device scalars or null: grads are read times
  // grad_scale * (1 / *amp_scale); a nonzero *found_inf skips the launch's work.
  const float* amp_scale;
  const float* found_inf;
};

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, maximize;
};

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

}  // namespace incrkern::cuda
