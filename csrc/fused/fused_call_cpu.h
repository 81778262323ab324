// What one call of the fused CPU select-and-update (fused_cpu.cpp) shares across its
// tensors: their resolved addresses, the call's constants, and the ways a tensor's
// score source and AdamTensor are made from them.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/amp_checks.h"
#include "common/rules.h"
#include "fused/adam_tensor_cpu.h"
#include "select/scan_cpu.h"

namespace incrkern::fused {

// A param's addresses, size and update count, read for every param at once while the
// checks have just brought the tensors' TensorImpls into cache. Read when the param's
// turn comes, after other params' passes have streamed through the cache, each
// address is a chain of waits on memory (TensorImpl, then StorageImpl).
struct Resolved {
  void *p, *g, *m, *v, *r;  // r: null without error feedback
  const void* s;            // the given scores (score="grad_sq"), else null
  int64_t numel;
  float step;
  at::ScalarType dtype;  // the param's and its gradient's
};

// What a call shares: its tensors (for the positional fallback) and its constants.
struct Call {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, steps, residuals;
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
  bool decoupled_weight_decay, maximize, approx;
  // Mixed precision: the scale tensor and its value. Without residuals the update
  // reads g times grad_scale / scale; with them the residual adds g / scale.
  std::optional<at::Tensor> amp_scale;
  std::optional<float> amp;
  std::vector<Resolved> res;  // per param, filled once the checks pass
  // Where the keys come from: |g| (or |r + g|), |p| read before the update
  // (score="weight"), the given scores (score="grad_sq": the Fisher), or the hash of
  // (seed, tensor number, index) (score="random").
  KeyFrom key_from = KeyFrom::Grad;
  int64_t seed = 0;
  // select="grad_sq" whose Fisher this call accumulates (the one-call step's): the
  // scores hold the Fisher before it, f = fisher_beta * f + (1 - fisher_beta) * g^2.
  std::optional<double> fisher_beta;
};

// The Fisher's EMA factor of g^2, (1 - fisher_beta) with the mixed-precision unscale,
// as accumulate_'s sq_alpha (the call's fisher_beta set).
template <typename M>
M fisher_alpha(const Call& c) {
  return amp_sq_factor<M>(1.0 - *c.fisher_beta, c.amp);
}

// Tensor i's score source for the Selector (its sample, and select's positions).
inline select::Source source_of(const Call& c, size_t i) {
  using select::Source;
  const Resolved& t = c.res[i];
  const at::ScalarType math = t.dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (c.key_from == KeyFrom::Param)
    return Source{ScoreKind::Abs, t.dtype, t.p, at::kFloat, nullptr, {}, t.numel, 0};
  if (c.key_from == KeyFrom::Scores && c.fisher_beta)  // the Fisher's EMA not yet formed
    return Source{ScoreKind::Fisher, t.dtype, t.g, math, t.s, {}, t.numel, 0,
                  float(*c.fisher_beta), fisher_alpha<float>(c)};
  if (c.key_from == KeyFrom::Scores)
    return Source{ScoreKind::Abs, math, t.s, math, nullptr, {}, t.numel, 0};
  if (c.key_from == KeyFrom::Random)
    return Source{ScoreKind::Random, t.dtype, nullptr, at::kFloat, nullptr,
                  select::random_keys(c.seed, int64_t(i)), t.numel, 0};
  const bool ef = t.r != nullptr;
  return Source{ef ? ScoreKind::Accumulated : ScoreKind::Abs, t.dtype, t.g, ef ? math : at::kFloat,
                t.r, {}, t.numel, 0};
}

// The residual, or the Fisher, alone as the score source once the step's gradient has
// been accumulated into it.
template <typename T>
select::Source accumulated_source(const AdamTensor<T>& t, int64_t n) {
  const at::ScalarType d = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  return select::Source{ScoreKind::Abs, d, t.r ? t.r : t.fisher, d, nullptr, {}, n, 0};
}

// adam_bias of the call's constants at `step`, kept for the last step seen on this
// thread: a model's params share their update count, and each param's AdamTensor is
// made more than once, two pow calls each time.
inline AdamBias call_adam_bias(const Call& c, float step) {
  thread_local struct {
    double lr = std::numeric_limits<double>::quiet_NaN(), beta1 = 0, beta2 = 0;  // none yet
    float step = 0;
    AdamBias bias{};
  } last;
  if (step != last.step || c.lr != last.lr || c.beta1 != last.beta1 || c.beta2 != last.beta2)
    last = {c.lr, c.beta1, c.beta2, step, adam_bias(c.lr, c.beta1, c.beta2, double(step))};
  return last.bias;
}

template <typename T>
AdamTensor<T> adam_tensor(const Call& c, size_t i) {
  using M = at::opmath_type<T>;
  const Resolved& r = c.res[i];
  const AdamBias bias = call_adam_bias(c, r.step);
  AdamTensor<T> t{
      static_cast<T*>(r.p),
      static_cast<const T*>(r.g),
      static_cast<M*>(r.m),
      static_cast<M*>(r.v),
      static_cast<M*>(r.r),
      make_adam_hyper<M>(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled_weight_decay,
                         c.maximize),
      M(bias.step_size),
      M(bias.bc2_sqrt),
      c.residuals.empty() ? amp_factor<M>(c.grad_scale, c.amp) : M(c.grad_scale),
      c.residuals.empty() ? M(1) : amp_factor<M>(1.0, c.amp),
      c.key_from,
      static_cast<const M*>(r.s)};
  if (c.fisher_beta) {
    t.fisher = static_cast<M*>(const_cast<void*>(r.s));
    t.fisher_decay = M(*c.fisher_beta);
    t.fisher_alpha = fisher_alpha<M>(c);
  }
  return t;
}

template <typename Fn>
void with_param_type(at::ScalarType d, Fn&& fn) {
  switch (d) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    case at::kDouble: return fn(double{});
    default: TORCH_CHECK(false, "incrkern: a fused select-and-update has no kernel for ", d);
  }
}

}  // namespace incrkern::fused
