// The fused select-and-update pass, as the CUDA kernel (fused_cuda.cu) runs it and
// its host run (fused_on_host_cpu.cpp) replays it: the tensor table, how a select
// chunk is split over blocks, the factors the gradient is read with, the step over a
// few elements that chooses, updates and keeps the residual, and the rule's update of
// one element (Adam's or SGD's). Host-device and CUDA-free, so that the CPU tests run
// this very code.
#pragma once

#include <cstdint>

#include "common/hd.h"
#include "common/rules.h"
#include "select/radix_digits.h"
#include "select/select_keys.h"
#include "update/update_args.h"

namespace incrkern::cuda {

// One tensor of the call, in the order of the launch's segments. `update.grad`
// is the gradient (the param's dtype); `residual`, when not null, the fp32
// error-feedback residual, which the scores read as r + g.
struct FusedTensor {
  UpdateTensor update;
  float* residual;
  int64_t index;  // the tensor's place in the call: its slot of `counts`
};

// Blocks per select chunk: the pass needs no order between blocks (no compaction),
// and twice the blocks keep twice the loads in flight.
constexpr int kFusedSplit = 2;
constexpr int kFusedThreads = 256;

// Block y's share [begin, end) of the chunk [chunk_begin, chunk_end): whole groups
// of `width` elements, so that every share starts where one of the chunk's packs
// would; empty (begin >= end) when the chunk is too short to reach block y.
IK_HD void fused_share(int64_t chunk_begin, int64_t chunk_end, int y, int width,
                       int64_t& begin, int64_t& end) {
  const int64_t step = int64_t(kFusedSplit) * width;
  const int64_t share = (chunk_end - chunk_begin + step - 1) / step * width;
  begin = chunk_begin + y * share;
  end = begin + share < chunk_end ? begin + share : chunk_end;
}

// What the gradient is read with. Without a residual the update takes g times the
// whole factor (grad_scale, and the mixed-precision unscale); with one, the residual
// adds g unscaled as accumulate_ would (res_alpha), and the update takes the sum
// times grad_scale alone.
struct FusedScales {
  float scale, res_alpha;
};

IK_HD FusedScales fused_scales(bool residual, const UpdateOptions& opt,
                               const float* residual_amp_scale) {
  return residual ? FusedScales{float(opt.grad_scale), amp_fold(1.f, residual_amp_scale)}
                  : FusedScales{amp_fold(float(opt.grad_scale), opt.amp_scale), 1.f};
}

// Elements pos .. pos + W - 1 of a group, the first `valid` of them real, holding
// gradients u (and, with a residual, residuals r): with a residual, r and u become
// r + res_alpha * u, the score. Where the settled state chooses an element,
// update(j, u[j] * scale) applies the rule and r[j] becomes 0, so r holds what each
// element keeps. Returns how many were chosen.
template <int W, typename Update>
IK_HD int fused_elements(const SelState& st, int64_t pos, int valid, bool residual,
                         const FusedScales& f, float (&u)[W], float (&r)[W],
                         Update&& update) {
  int taken = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < W; ++j) {
    if (residual) {
      accumulate_rule(r[j], u[j], f.res_alpha);
      u[j] = r[j];
    }
    if (j >= valid || !chosen(st, select::abs_key32(u[j]), pos + j)) continue;
    update(j, u[j] * f.scale);
    r[j] = 0.f;
    ++taken;
  }
  return taken;
}

// Element e of f updated by the rule (Op: update_ops.h's AdamOp, or SgdOp, whose
// momentum buffer is first_moment, null without momentum, and which has no
// second_moment) with the gradient `scaled`; p read and written through `to_math` and
// `from_math` (the device's conversions, or c10's on the host, which round alike).
template <typename Op, typename T, typename ToMath, typename FromMath>
IK_HD void fused_update(const FusedTensor& f, T* p, const Op& op, const typename Op::Coeff& c,
                        int64_t e, float scaled, ToMath to_math, FromMath from_math) {
  float* m1 = f.update.first_moment;
  float* m2 = f.update.second_moment;
  float pm = to_math(p[e]), m = m1 ? m1[e] : 0.f, v = m2 ? m2[e] : 0.f, unused = 0.f;
  op.apply(pm, scaled, m, v, unused, c);
  p[e] = from_math(pm);
  if (m1) m1[e] = m;
  if (m2) m2[e] = v;
}

}  // namespace incrkern::cuda
