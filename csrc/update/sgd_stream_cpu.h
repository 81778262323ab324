// The CPU's SGD streaming loop, shared by the update kernel (update_cpu.cpp) and the
// fused select-and-update (fused/sgd_fused_cpu.cpp): one compiled form of the rule
// over a range, dense, by a byte mask or by the order of |g| (the threshold stream).
#pragma once

#include <cstdint>

#include "common/rules.h"
#include "select/select_keys.h"
#include "update/adam_stream_cpu.h"  // Lanes, blend_bits, with_stream_flags, IK_CLONED_TYPES

namespace incrkern {

// SGD's flags that pick branches in sgd_rule (first step, nesterov, weight decay,
// momentum: kHasBuffer) are template parameters here: left as run-time values, gcc
// keeps the branches in the loop and does not vectorise it (it unswitched the fp32
// loop on some of them, not the larger 16-bit ones). See Note [branch-free loops
// vectorise] in common/hd.h. kAbove: an element is chosen where the order of |g| is
// > above_gt, decided as the loop reads g, as adam_stream's kAbove. kConsume: the
// chosen elements' g zeroed (error feedback's residual, read as g).
template <typename T, typename G, typename M, bool kMasked, bool kConsume, bool kHasBuffer,
          bool kFirst, bool kNesterov, bool kDecay, bool kAbove = false>
[[gnu::always_inline]] inline void sgd_stream(
    T* __restrict p, G* __restrict g, M* __restrict buf, const bool* __restrict mask,
    int64_t begin, int64_t end, const SgdHyper<M> h, const M grad_scale,
    int32_t above_gt = 0) {
  static_assert(!(kAbove && kMasked), "kAbove: a plain SGD loop");
  SgdHyper<M> hh = h;
  hh.nesterov = kNesterov;
  hh.decay = kDecay;
  hh.has_momentum = kHasBuffer;
  using PL = Lanes<T>;
  using GL = Lanes<G>;
  auto* __restrict pb = reinterpret_cast<typename PL::Bits*>(p);
  auto* __restrict gb = reinterpret_cast<typename GL::Bits*>(g);
  const auto g_zero = GL::narrow(M(0));
  for (int64_t e = begin; e < end; ++e) {
    M pm = PL::template widen<M>(pb[e]), bm = kHasBuffer ? buf[e] : M(0);
    const M ge = GL::template widen<M>(gb[e]);
    sgd_rule(pm, ge * grad_scale, bm, hh, kFirst);
    if constexpr (kAbove) {
      const auto order = int32_t(select::float_bits(float(ge)) & 0x7fffffffu);
      const int32_t chosen = -int32_t(order > above_gt);
      pb[e] = blend_bits(chosen, PL::narrow(pm), pb[e]);
      if (kHasBuffer) buf[e] = blend_bits(chosen, bm, buf[e]);
      if (kConsume) gb[e] = blend_bits(chosen, g_zero, gb[e]);
      continue;
    }
    const bool on = kMasked ? reinterpret_cast<const uint8_t*>(mask)[e] != 0 : true;
    pb[e] = on ? PL::narrow(pm) : pb[e];
    if (kHasBuffer) buf[e] = on ? bm : buf[e];
    if (kConsume) gb[e] = on ? g_zero : gb[e];
  }
}

// Calls fn.template operator()<kHasBuffer, kFirst, kNesterov, kDecay>() for the
// run-time flags. A buffer whose momentum rounds to 0 in the math type takes the loop
// without one: the rule leaves such a buffer as it is.
template <typename M, typename Fn>
[[gnu::always_inline]] inline void with_sgd_flags(const SgdHyper<M>& h, const M* buf,
                                                  bool first, Fn&& fn) {
  const auto decay = [&]<bool kHasBuffer, bool kFirst, bool kNesterov>() IK_INLINE_LAMBDA {
    if (h.decay) return fn.template operator()<kHasBuffer, kFirst, kNesterov, true>();
    fn.template operator()<kHasBuffer, kFirst, kNesterov, false>();
  };
  if (!(buf && h.has_momentum)) return decay.template operator()<false, false, false>();
  if (first && h.nesterov) return decay.template operator()<true, true, true>();
  if (first) return decay.template operator()<true, true, false>();
  if (h.nesterov) return decay.template operator()<true, false, true>();
  decay.template operator()<true, false, false>();
}

// sgd_stream for the run-time flags: by a byte mask (or every element), or where
// `above`, by the order of |g| above above_gt; `consume`: the chosen g zeroed.
template <typename T, typename G, typename M>
[[gnu::always_inline]] inline void sgd_stream_any(
    T* p, G* g, M* buf, const bool* mask, bool above, int32_t above_gt, bool consume,
    int64_t begin, int64_t end, const SgdHyper<M> h, const bool first, const M grad_scale) {
  if (above)
    return with_consume(consume, [&]<bool kConsume>() IK_INLINE_LAMBDA {
      with_sgd_flags(h, buf, first,
                     [&]<bool kHasBuffer, bool kFirst, bool kNesterov, bool kDecay>()
                         IK_INLINE_LAMBDA {
                           sgd_stream<T, G, M, false, kConsume, kHasBuffer, kFirst, kNesterov,
                                      kDecay, true>(p, g, buf, nullptr, begin, end, h,
                                                    grad_scale, above_gt);
                         });
    });
  with_stream_flags(mask != nullptr, consume, [&]<bool kMasked, bool kConsume>() IK_INLINE_LAMBDA {
    with_sgd_flags(h, buf, first,
                   [&]<bool kHasBuffer, bool kFirst, bool kNesterov, bool kDecay>()
                       IK_INLINE_LAMBDA {
                         sgd_stream<T, G, M, kMasked, kConsume, kHasBuffer, kFirst, kNesterov,
                                    kDecay>(p, g, buf, mask, begin, end, h, grad_scale);
                       });
  });
}

// The SGD loop for each ISA (update/sgd_clones_cpu.cpp), per param and gradient type.
#define IK_DECLARE_SGD_CLONED(T, G)                                                        \
  void sgd_stream_cloned(T* p, G* g, float* buf, const bool* mask, bool above,             \
                         int32_t above_gt, bool consume, int64_t begin, int64_t end,       \
                         const SgdHyper<float> h, const bool first, const float grad_scale);
IK_CLONED_TYPES(IK_DECLARE_SGD_CLONED)
#undef IK_DECLARE_SGD_CLONED

// sgd_stream_any, through the ISA-compiled loop where the types have one.
template <typename T, typename G, typename M>
inline void sgd_stream_isa(T* p, G* g, M* buf, const bool* mask, bool above, int32_t above_gt,
                           bool consume, int64_t begin, int64_t end, const SgdHyper<M> h,
                           const bool first, const M grad_scale) {
  if constexpr (kCloned<T, G>)
    sgd_stream_cloned(p, g, buf, mask, above, above_gt, consume, begin, end, h, first,
                      grad_scale);
  else
    sgd_stream_any<T, G, M>(p, g, buf, mask, above, above_gt, consume, begin, end, h, first,
                            grad_scale);
}

}  // namespace incrkern
