// SgdTensor: one param's tensors and SGD constants, and the ways the fused SGD kernel
// (sgd_fused_cpu.cpp) applies the rule to them: one element, or a range by the
// streaming loop (dense, or where |g| reaches a threshold: the threshold stream of
// fused/threshold_stream_cpu.h, whose tensor interface this is).
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
  static constexpr M* r = nullptr;  // no residual: the keys are |g|
  void add_residual(int64_t, int64_t) const {}

  // The update of element e alone, as sgd_update_ updates a position.
  void one(int64_t e) const {
    M pm = M(p[e]), scratch = M(0);
    sgd_rule(pm, M(g[e]) * grad_scale, buf ? buf[e] : scratch, h, first);
    p[e] = T(pm);
  }

  // The p, gradient and buffer lines of element e requested (to L2).
  void fetch(int64_t e) const {
    request_line(p + e);
    request_line(g + e);
    if (buf) request_line(buf + e);
  }

  // Every element of [b, e) updated by the streaming loop.
  void dense(int64_t b, int64_t e) const { stream_by(b, e, false, 0); }

  // The elements of [b, e) whose key is >= at_least updated by the streaming loop (fp32
  // and 16-bit types).
  void stream_at_least(int64_t b, int64_t e, uint64_t at_least) const {
    stream_by(b, e, true, select::order_greater_than<false>(at_least));
  }

  void stream_by(int64_t b, int64_t e, bool above, int32_t above_gt) const {
    sgd_stream_isa<T, T, M>(p + b, const_cast<T*>(g) + b, buf ? buf + b : nullptr, nullptr,
                            above, above_gt, false, 0, e - b, h, first, grad_scale);
  }

  // The keys of [b, b + len) above the band counted and those in it kept (band_keys).
  int64_t count_band(int64_t b, int64_t len, int32_t lo_gt, int32_t hi_gt,
                     uint32_t*& out) const {
    return band_keys(g + b, len, lo_gt, hi_gt, out);
  }

  uint32_t key(int64_t e) const { return select::abs_key32(float(g[e])); }
};

}  // namespace incrkern::fused
