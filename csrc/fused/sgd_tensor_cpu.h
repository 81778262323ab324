// SgdTensor: one param's tensors and SGD constants, and the ways the fused SGD kernel
// (sgd_fused_cpu.cpp) applies the rule to them: one element, or a range by the
// streaming loop (dense, or where the key reaches a threshold: the threshold stream of
// fused/threshold_stream_cpu.h, whose tensor interface this is, as list_pass's).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/prefetched.h"
#include "common/rules.h"
#include "fused/scans_cpu.h"
#include "select/select_keys.h"
#include "update/sgd_stream_cpu.h"

namespace incrkern::fused {

template <typename T>
struct SgdTensor {
  using M = at::opmath_type<T>;
  T* p;
  const T* g;
  M* buf;  // the momentum buffer; null without momentum
  SgdHyper<M> h;
  bool first;  // the buffer is new: a chosen element's takes its gradient as it is
  M grad_scale;
  // Error feedback (null without): the rule reads u = r + residual_alpha * g (alpha: 1,
  // or the mixed-precision unscale), kept in r, and a chosen element's r becomes 0.
  M* r = nullptr;
  M residual_alpha = M(1);

  // The update of element e alone, as sgd_update_ updates a position (by its residual,
  // then zeroed, with error feedback).
  void one(int64_t e) const {
    M pm = M(p[e]), scratch = M(0), ge;
    if (r) {
      ge = r[e];
      r[e] = M(0);
    } else {
      ge = M(g[e]);
    }
    sgd_rule(pm, ge * grad_scale, buf ? buf[e] : scratch, h, first);
    p[e] = T(pm);
  }

  // r = r + residual_alpha * g over [b, e), as accumulate_ computes it.
  void add_residual(int64_t b, int64_t e) const {
    fused::add_residual(r + b, g + b, residual_alpha, e - b);
  }

  // What the keys of [b, e) accumulate before they are read (list_pass, count_pass).
  void accumulate_keys(int64_t b, int64_t e) const {
    if (r) add_residual(b, e);
  }

  // The keys where they are kept apart from g (the residual), else null.
  const M* stored_keys() const { return r; }

  // Where the keys are read without stored ones.
  const T* own_keys() const { return g; }

  // The p, gradient (or residual) and buffer lines of element e requested (to L2).
  void fetch(int64_t e) const {
    request_line(p + e);
    if (r) request_line(r + e);
    else request_line(g + e);
    if (buf) request_line(buf + e);
  }

  // Every element of [b, e) updated by the streaming loop; with a residual, g added to
  // it first unless `added`.
  void dense(int64_t b, int64_t e, bool added = false) const {
    if (r && !added) add_residual(b, e);
    stream_by(b, e, false, 0);
  }

  // The elements of [b, e) whose key is >= at_least updated by the streaming loop (fp32
  // and 16-bit types).
  void stream_at_least(int64_t b, int64_t e, uint64_t at_least) const {
    stream_by(b, e, true, select::order_greater_than<false>(at_least));
  }

  // With a residual the loop reads r (which holds r + g) and zeroes the chosen.
  void stream_by(int64_t b, int64_t e, bool above, int32_t above_gt) const {
    M* bb = buf ? buf + b : nullptr;
    if (r)
      sgd_stream_isa<T, M, M>(p + b, r + b, bb, nullptr, above, above_gt, true, 0, e - b, h,
                              first, grad_scale);
    else
      sgd_stream_isa<T, T, M>(p + b, const_cast<T*>(g) + b, bb, nullptr, above, above_gt,
                              false, 0, e - b, h, first, grad_scale);
  }

  // The keys of [b, b + len) above the band counted and those in it kept (band_keys):
  // the residual's (which holds r + g) or the gradient's.
  int64_t count_band(int64_t b, int64_t len, int32_t lo_gt, int32_t hi_gt,
                     uint32_t*& out) const {
    if (r) return band_keys(static_cast<const float*>(r + b), len, lo_gt, hi_gt, out);
    return band_keys(g + b, len, lo_gt, hi_gt, out);
  }

  // The key of element e (after add_residual, with a residual).
  uint32_t key(int64_t e) const { return select::abs_key32(float(r ? r[e] : M(g[e]))); }
};

}  // namespace incrkern::fused
