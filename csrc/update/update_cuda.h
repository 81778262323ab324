// The CUDA update kernels' plain interface: raw pointers and a stream, so that the
// .cu file needs no torch headers (it compiles in seconds, not minutes).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace incrkern::cuda {

enum class DType : int { Float32, BFloat16, Float16 };

// One param's share of an update call. Positions j in [0, count) address the
// element indices[j] (or j when indices is null); its state lives at slot j when
// compact, else at the element.
struct UpdateTensor {
  void* param;
  void* grad;
  float* state0;        // exp_avg or momentum buffer (may be null for SGD)
  float* state1;        // exp_avg_sq (Adam)
  const float* step;    // device scalar, or null: use step_value
  const int64_t* indices;
  const bool* mask;
  int32_t* age;         // per-slot update count, or null
  int64_t count;
  float step_value;
  bool first;           // SGD: the momentum buffer is new
};

struct UpdateOptions {
  DType param_dtype;
  bool grad_is_fp32;    // grads in fp32 (accumulators, residuals) rather than the param dtype
  double grad_scale;
  bool consume_grad;
  bool compact_state;
  const float* lr_ptr;  // device scalar overriding lr, or null
};

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, maximize;
};

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// Both throw std::runtime_error on a launch failure.
void adam_update(const UpdateTensor* tensors, int64_t n, const UpdateOptions& options,
                 const AdamArgs& args, cudaStream_t stream);
void sgd_update(const UpdateTensor* tensors, int64_t n, const UpdateOptions& options,
                const SgdArgs& args, cudaStream_t stream);

}  // namespace incrkern::cuda
