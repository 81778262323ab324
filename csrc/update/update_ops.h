// The update rules as the CUDA kernels apply them: the per-tensor coefficients
// (learning rate and step read from device memory when they live there) and the
// rules of common/rules.h. Shared by the update kernels (update_cuda.cu) and the
// fused select-and-update kernel (fused/fused_cuda.cu), which must update an
// element bit for bit as the update kernel would; host-device and CUDA-free, so that
// the fused kernel's host run (fused/fused_on_host_cpu.cpp) applies them too.
#pragma once

#include <cstdint>

#include "common/hd.h"
#include "common/rules.h"
#include "update/update_args.h"

namespace incrkern::cuda {

// The factor a gradient is read with, from grad_scale and the mixed-precision scale
// (amp_factor in common/amp_checks.h computes the same on the host).
IK_HD float grad_factor(const UpdateOptions& opt) {
  return amp_fold(float(opt.grad_scale), opt.amp_scale);
}

// Whether a mixed-precision step found an inf: the launch then changes nothing.
IK_HD bool skipped(const UpdateOptions& opt) {
  return amp_skips(opt.found_inf);
}

// Reads the learning rate and step count from device memory when given there, so
// a captured CUDA graph replays with the current values.
IK_HD double read_lr(double lr, const UpdateOptions& opt) {
  return opt.lr_on_device ? double(*opt.lr_ptr) : lr;
}

// `vmax`: AMSGrad's max_exp_avg_sq, read and written only with AMSGrad.
struct AdamOp {
  AdamArgs a;
  struct Coeff {
    AdamHyper<float> h;
    float step_size, bc2_sqrt;
    double lr;
    bool amsgrad;
  };
  IK_HD Coeff prepare(const UpdateTensor& t, const UpdateOptions& opt) const {
    const double lr = read_lr(a.lr, opt);
    const double step = t.step_on_device ? double(*t.step) : double(t.step_value);
    const AdamBias b = adam_bias(lr, a.beta1, a.beta2, step);
    return Coeff{make_adam_hyper<float>(lr, a.beta1, a.beta2, a.eps, a.weight_decay,
                                        a.decoupled_weight_decay, a.maximize),
                 float(b.step_size), float(b.bc2_sqrt), lr, opt.has_max_second_moment};
  }
  IK_HD void apply(float& p, float g, float& m, float& v, float& vmax,
                        const Coeff& c) const {
    rule(p, g, m, v, vmax, c, c.step_size, c.bc2_sqrt);
  }
  // With per-element ages the bias correction is the element's own update count.
  IK_HD void apply_aged(float& p, float g, float& m, float& v, float& vmax, int32_t* age,
                             const Coeff& c) const {
    const AdamBias b = adam_bias(c.lr, a.beta1, a.beta2, double(++*age));
    rule(p, g, m, v, vmax, c, float(b.step_size), float(b.bc2_sqrt));
  }
  IK_HD void rule(float& p, float g, float& m, float& v, float& vmax, const Coeff& c,
                       float step_size, float bc2_sqrt) const {
    if (c.amsgrad) adam_rule<true>(p, g, m, v, vmax, c.h, step_size, bc2_sqrt);
    else adam_rule(p, g, m, v, c.h, step_size, bc2_sqrt);
  }
};

struct SgdOp {
  SgdArgs a;
  struct Coeff {
    SgdHyper<float> h;
    bool first;
  };
  IK_HD Coeff prepare(const UpdateTensor& t, const UpdateOptions& opt) const {
    return Coeff{make_sgd_hyper<float>(read_lr(a.lr, opt), a.momentum, a.dampening,
                                       a.weight_decay, a.nesterov, a.maximize),
                 t.first};
  }
  IK_HD void apply(float& p, float g, float& buf, float&, float&, const Coeff& c) const {
    sgd_rule(p, g, buf, c.h, c.first);
  }
  // SGD keeps no ages (the glue passes none).
  IK_HD void apply_aged(float& p, float g, float& buf, float& unused, float& unused_max,
                             int32_t*, const Coeff& c) const {
    apply(p, g, buf, unused, unused_max, c);
  }
};

}  // namespace incrkern::cuda
