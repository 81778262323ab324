// The per-element update rules: the one source of truth for the optimizer math.
//
// Every kernel, CPU and CUDA, dense and masked, calls these functions, so the CPU
// tests (which run everywhere) exercise exactly the arithmetic the GPU runs.
// `M` is the math type: float for fp32/bf16/fp16 params, double for fp64 params.
// The order of operations follows torch.optim's single-tensor implementations so
// that density=1.0 matches torch.optim to float rounding.
#pragma once

#include <cmath>

#include "common/hd.h"

namespace incrkern {

// torch.lerp's formula: which end it interpolates from depends on the weight,
// and Adam's exp_avg.lerp_(grad, 1 - beta1) is rounded this way in torch.
template <typename M>
IK_HD M lerp(M from, M to, M weight) {
  return weight < M(0.5) ? from + weight * (to - from)
                         : to - (to - from) * (M(1) - weight);
}

// The square root in the math type: sqrt(float) resolved to the double one here,
// whose conversions kept gcc from vectorising the CPU's dense-mask loop. (The float
// square root rounded through double is the float one: the same bits.)
IK_HD float root(float x) { return sqrtf(x); }
IK_HD double root(double x) { return sqrt(x); }

// Hyper-parameters of one Adam/AdamW call in the math type. Derived constants
// such as 1 - beta are computed in double on the host and rounded once, as
// torch's Python scalars are: 1 - 0.999f in float differs from it by 1e-5.
template <typename M>
struct AdamHyper {
  M lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  M decay_factor;               // AdamW: 1 - lr * weight_decay
  bool decoupled_weight_decay;  // AdamW: p *= 1 - lr * wd; Adam: g += wd * p
  bool maximize;
  bool decay;                   // weight_decay != 0 (a field, so a loop can fix it)
};

template <typename M>
IK_HD AdamHyper<M> make_adam_hyper(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, bool decoupled, bool maximize) {
  return AdamHyper<M>{M(lr), M(beta1), M(1.0 - beta1), M(beta2), M(1.0 - beta2), M(eps),
                      M(weight_decay), M(1.0 - lr * weight_decay), decoupled, maximize,
                      weight_decay != 0};
}

// Bias corrections of one update count, computed in double as torch does on the
// host (1 - beta^t loses digits in float for beta2 close to 1).
struct AdamBias {
  double step_size;       // lr / (1 - beta1^t)
  double bc2_sqrt;        // sqrt(1 - beta2^t)
};

IK_HD AdamBias adam_bias(double lr, double beta1, double beta2, double step) {
  AdamBias b;
  b.step_size = lr / (1.0 - pow(beta1, step));
  b.bc2_sqrt = sqrt(1.0 - pow(beta2, step));
  return b;
}

// AMSGrad's running maximum of the second moment, NaN-propagating as torch.maximum
// (torch's single-tensor and foreach Adam): a NaN on either side gives NaN. Two
// selects, so that a loop over it vectorises.
template <typename M>
IK_HD M nan_max(M a, M b) {
  const M larger = a > b ? a : b;  // b where either is NaN
  return a != a ? a : larger;
}

// kAmsgrad: AMSGrad, the denominator from max_exp_avg_sq, the largest exp_avg_sq so
// far (a template parameter: it picks code; see Note [branch-free loops vectorise]).
// Without it max_exp_avg_sq is neither read nor written.
template <bool kAmsgrad, typename M>
IK_HD void adam_rule(M& param, M grad, M& exp_avg, M& exp_avg_sq, M& max_exp_avg_sq,
                     const AdamHyper<M>& h, M step_size, M bc2_sqrt) {
  // Selects, a multiply and non-short-circuit flags, not branches, although they are
  // the same for every element: gcc unswitches the CPU's dense loop on them, but
  // not the dense-mask one, which a branch leaves scalar. See Note [branch-free
  // loops vectorise] in common/hd.h. grad * -1 is -grad for every value but a NaN's
  // sign.
  const bool decoupled = h.decay & h.decoupled_weight_decay;
  const bool coupled = h.decay & !h.decoupled_weight_decay;
  grad = grad * (h.maximize ? M(-1) : M(1));
  param = decoupled ? param * h.decay_factor : param;
  grad = coupled ? grad + h.weight_decay * param : grad;
  exp_avg = lerp(exp_avg, grad, h.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * h.beta2 + h.one_minus_beta2 * grad * grad;
  M second = exp_avg_sq;
  if constexpr (kAmsgrad) second = max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq);
  // Times the reciprocal rather than divided by bc2_sqrt (one rounding more, within
  // 1 ulp of torch's quotient): a division per element made the CPU loop compute-bound.
  const M denom = root(second) * (M(1) / bc2_sqrt) + h.eps;
  param = param - step_size * (exp_avg / denom);
}

// Adam without AMSGrad.
template <typename M>
IK_HD void adam_rule(M& param, M grad, M& exp_avg, M& exp_avg_sq, const AdamHyper<M>& h,
                     M step_size, M bc2_sqrt) {
  M unused = M(0);
  adam_rule<false>(param, grad, exp_avg, exp_avg_sq, unused, h, step_size, bc2_sqrt);
}

template <typename M>
struct SgdHyper {
  M lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize;
  bool decay, has_momentum;  // weight_decay != 0, momentum != 0 (fields, so a loop can fix them)
};

template <typename M>
IK_HD SgdHyper<M> make_sgd_hyper(double lr, double momentum, double dampening,
                                 double weight_decay, bool nesterov, bool maximize) {
  return SgdHyper<M>{M(lr),     M(momentum), M(1.0 - dampening), M(weight_decay),
                     nesterov,  maximize,    M(weight_decay) != M(0), M(momentum) != M(0)};
}

// `first`: the momentum buffer is new and takes the gradient as it is (torch
// clones d_p into a missing buffer); `momentum_buffer` is unused when momentum == 0.
template <typename M>
IK_HD void sgd_rule(M& param, M grad, M& momentum_buffer, const SgdHyper<M>& h,
                    bool first) {
  // A multiply, not a select, as adam_rule's: a select on maximize kept the larger
  // (fp16) loop scalar, where gcc did not unswitch it.
  M d_p = grad * (h.maximize ? M(-1) : M(1));
  if (h.decay) d_p = d_p + h.weight_decay * param;
  if (h.has_momentum) {
    momentum_buffer = first ? d_p
                            : momentum_buffer * h.momentum + h.one_minus_dampening * d_p;
    d_p = h.nesterov ? d_p + h.momentum * momentum_buffer : momentum_buffer;
  }
  param = param + (-h.lr) * d_p;
}

// acc += alpha * g; sq = sq_decay * sq + sq_alpha * g * g
template <typename M>
IK_HD void accumulate_rule(M& acc, M grad, M alpha) {
  acc = acc + alpha * grad;
}

template <typename M>
IK_HD void accumulate_sq_rule(M& sq, M grad, M sq_alpha, M sq_decay) {
  sq = sq * sq_decay + sq_alpha * grad * grad;
}

// Mixed precision, from scalars the kernels read (null: none): `factor` times
// 1 / *amp_scale (its square for the squared grad), in fp32 as amp_factor and
// amp_sq_factor (common/amp_checks.h) compute it on the host; and whether *found_inf
// skips a call.
IK_HD float amp_fold(float factor, const float* amp_scale) {
  return amp_scale ? factor * (1.f / *amp_scale) : factor;
}

IK_HD float amp_fold_sq(float factor, const float* amp_scale) {
  if (!amp_scale) return factor;
  const float inv = 1.f / *amp_scale;
  return factor * (inv * inv);
}

IK_HD bool amp_skips(const float* found_inf) { return found_inf && *found_inf != 0.f; }

}  // namespace incrkern
