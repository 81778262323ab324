// The CPU's Adam streaming loop, shared by the update kernels (update_cpu.cpp) and
// the fused select-and-update (fused/fused_cpu.cpp): one compiled form of the rule
// over a range, dense or by a byte mask.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/rules.h"
#include "select/select_keys.h"

namespace incrkern {

// `fresh` where `chosen` is all ones, `old` where it is 0, bit for bit. For the kAbove
// loop: a select whose condition gcc can compute before the rule it turns into a
// branch around the rule, and the loop then stays scalar.
template <typename X>
[[gnu::always_inline]] inline X blend_bits(int32_t chosen, X fresh, X old) {
  using U = std::conditional_t<sizeof(X) == 2, uint16_t,
                               std::conditional_t<sizeof(X) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(X) == sizeof(U), "a 2-, 4- or 8-byte type");
  const auto c = U(int64_t(chosen));
  const U bits = U((__builtin_bit_cast(U, fresh) & c) | (__builtin_bit_cast(U, old) & ~c));
  return __builtin_bit_cast(X, bits);
}

// How the loops read and write an element type: the 16-bit types as their uint16_t
// bits, converted as c10 converts them but in operations that gcc vectorises (it
// does not vectorise loads of the structs): bf16 widened by a shift and narrowed to
// nearest even, every NaN as 0x7fc0; fp16 by c10's own branch-free conversions. Every
// other type as itself.
template <typename T>
struct Lanes {
  using Bits = T;
  template <typename M>
  static M widen(T x) { return M(x); }
  template <typename M>
  static T narrow(M x) { return T(x); }
};
template <>
struct Lanes<c10::BFloat16> {
  using Bits = uint16_t;
  template <typename M>
  static M widen(uint16_t b) { return M(__builtin_bit_cast(float, uint32_t(b) << 16)); }
  template <typename M>
  static uint16_t narrow(M x) {
    const auto f = float(x);
    const auto u = __builtin_bit_cast(uint32_t, f);
    const auto rounded = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return f != f ? uint16_t(0x7fc0) : rounded;
  }
};
template <>
struct Lanes<c10::Half> {
  using Bits = uint16_t;
  template <typename M>
  static M widen(uint16_t b) { return M(c10::detail::fp16_ieee_to_fp32_value(b)); }
  template <typename M>
  static uint16_t narrow(M x) { return c10::detail::fp16_ieee_from_fp32_value(float(x)); }
};

// The streaming loops: every element of [begin, end), in order, kept vectorisable
// (see Note [branch-free loops vectorise] in common/hd.h). kMasked: the dense-mask
// form -- every element is computed and the mask selects new or old value, so
// unchosen elements are written back bit-identical. kAbove: the same, an element
// chosen where the order of |g| (select/scan_cpu.h) is > above_gt, decided as the
// loop reads g: a mask written first cost a pass of its own over the gradient
// (docs/design.md, "The threshold stream"); by kKeyFrom, the order of |p| as the
// loop reads p (select="weight"), before its update, or of given scores `keys` (the
// Fisher of select="grad_sq"). kConsume: zero the gradient
// entries used. kAmsgrad: AMSGrad, with its running maximum `vmax` (unused without).
// kDecay, kDecoupled: the weight-decay kind, fixed per loop. gcc unswitched the plain
// fp32 loop on it, but not the larger ones (AMSGrad, bf16's conversions: --param
// max-unswitch-insns), and the select left in them kept them scalar.
// ivdep: the AMSGrad loop's sixth array took gcc over its limit of run-time alias
// checks (--param vect-max-version-for-alias-checks), and the masked loop stayed
// scalar; the arrays are distinct (__restrict) anyway.
template <typename T, typename G, typename M, bool kMasked, bool kConsume, bool kAmsgrad,
          bool kDecay, bool kDecoupled, bool kAbove = false, KeyFrom kKeyFrom = KeyFrom::Grad>
[[gnu::always_inline]] inline void adam_stream(
    T* __restrict p, G* __restrict g, M* __restrict m, M* __restrict v, M* __restrict vmax,
    const bool* __restrict mask, int64_t begin, int64_t end, const AdamHyper<M> h,
    const M step_size, const M bc2_sqrt, const M grad_scale, int32_t above_gt = 0,
    const M* __restrict keys = nullptr) {
  static_assert(!(kAbove && (kMasked || kAmsgrad)), "kAbove: a plain Adam loop");
  static_assert(kAbove || kKeyFrom == KeyFrom::Grad, "kKeyFrom: the key of kAbove");
  AdamHyper<M> hh = h;
  hh.decay = kDecay;
  hh.decoupled_weight_decay = kDecoupled;
  using PL = Lanes<T>;
  using GL = Lanes<G>;
  auto* __restrict pb = reinterpret_cast<typename PL::Bits*>(p);
  auto* __restrict gb = reinterpret_cast<typename GL::Bits*>(g);
  const auto g_zero = GL::narrow(M(0));
#pragma GCC ivdep
  for (int64_t e = begin; e < end; ++e) {
    M pm = PL::template widen<M>(pb[e]), mm = m[e], vv = v[e];
    M vm = kAmsgrad ? vmax[e] : M(0);
    const M ge = GL::template widen<M>(gb[e]);
    // p's before the rule moves pm
    const M key_of = kKeyFrom == KeyFrom::Param ? pm : kKeyFrom == KeyFrom::Scores ? keys[e] : ge;
    adam_rule<kAmsgrad>(pm, ge * grad_scale, mm, vv, vm, hh, step_size, bc2_sqrt);
    if constexpr (kAbove) {
      const auto order = int32_t(select::float_bits(float(key_of)) & 0x7fffffffu);
      const int32_t chosen = -int32_t(order > above_gt);
      pb[e] = blend_bits(chosen, PL::narrow(pm), pb[e]);
      m[e] = blend_bits(chosen, mm, m[e]);
      v[e] = blend_bits(chosen, vv, v[e]);
      if (kConsume) gb[e] = blend_bits(chosen, g_zero, gb[e]);
      continue;
    }
    const bool on = kMasked ? reinterpret_cast<const uint8_t*>(mask)[e] != 0 : true;
    pb[e] = on ? PL::narrow(pm) : pb[e];
    m[e] = on ? mm : m[e];
    v[e] = on ? vv : v[e];
    if (kAmsgrad) vmax[e] = on ? vm : vmax[e];
    if (kConsume) gb[e] = on ? g_zero : gb[e];
  }
}

// Calls fn.template operator()<kMasked, kConsume>() for the run-time flags. The
// callers' lambdas are always_inline: one left out of line is compiled once, for the
// baseline ISA, and the AVX2 and AVX-512 clones of its caller (IK_ISA_CLONES below)
// would call that scalar loop.
#define IK_INLINE_LAMBDA __attribute__((always_inline))
template <typename Fn>
[[gnu::always_inline]] inline void with_stream_flags(bool masked, bool consume, Fn&& fn) {
  if (masked) {
    if (consume) return fn.template operator()<true, true>();
    return fn.template operator()<true, false>();
  }
  if (consume) return fn.template operator()<false, true>();
  fn.template operator()<false, false>();
}

// Calls fn.template operator()<kConsume>() for the run-time flag: the loops that
// never take a mask.
template <typename Fn>
[[gnu::always_inline]] inline void with_consume(bool consume, Fn&& fn) {
  if (consume) return fn.template operator()<true>();
  fn.template operator()<false>();
}

// Calls fn.template operator()<kDecay, kDecoupled>() for h's weight-decay kind.
template <typename M, typename Fn>
[[gnu::always_inline]] inline void with_decay_kind(const AdamHyper<M>& h, Fn&& fn) {
  if (!h.decay) return fn.template operator()<false, false>();
  if (h.decoupled_weight_decay) return fn.template operator()<true, true>();
  fn.template operator()<true, false>();
}

// Picks the instantiation for the run-time flags.
template <typename T, typename G, typename M>
[[gnu::always_inline]] inline void adam_stream_any(
    T* p, G* g, M* m, M* v, const bool* mask, bool consume, int64_t begin, int64_t end,
    const AdamHyper<M> h, const M step_size, const M bc2_sqrt, const M grad_scale) {
  with_stream_flags(mask != nullptr, consume, [&]<bool kMasked, bool kConsume>() IK_INLINE_LAMBDA {
    with_decay_kind(h, [&]<bool kDecay, bool kDecoupled>() IK_INLINE_LAMBDA {
      adam_stream<T, G, M, kMasked, kConsume, false, kDecay, kDecoupled>(
          p, g, m, v, nullptr, mask, begin, end, h, step_size, bc2_sqrt, grad_scale);
    });
  });
}

// adam_stream_any choosing by |g|, by |p| or by given scores `keys` (key_from), for
// fp32 math: a 16-bit value widens to fp32 exactly, so its order is the one the
// selection's scans compare. Only a gradient's key is consumed (a residual's).
template <typename T, typename G, typename M>
[[gnu::always_inline]] inline void adam_stream_above_any(
    T* p, G* g, M* m, M* v, int32_t above_gt, KeyFrom key_from, const M* keys, bool consume,
    int64_t begin, int64_t end, const AdamHyper<M> h, const M step_size, const M bc2_sqrt,
    const M grad_scale) {
  const auto run = [&]<KeyFrom kKeyFrom, bool kConsume>() IK_INLINE_LAMBDA {
    with_decay_kind(h, [&]<bool kDecay, bool kDecoupled>() IK_INLINE_LAMBDA {
      adam_stream<T, G, M, false, kConsume, false, kDecay, kDecoupled, true, kKeyFrom>(
          p, g, m, v, nullptr, nullptr, begin, end, h, step_size, bc2_sqrt, grad_scale,
          above_gt, keys);
    });
  };
  if (consume) return run.template operator()<KeyFrom::Grad, true>();
  if (key_from == KeyFrom::Param) return run.template operator()<KeyFrom::Param, false>();
  if (key_from == KeyFrom::Scores) return run.template operator()<KeyFrom::Scores, false>();
  run.template operator()<KeyFrom::Grad, false>();
}

// adam_stream_any with AMSGrad's max_exp_avg_sq `vmax`.
template <typename T, typename G, typename M>
[[gnu::always_inline]] inline void adam_stream_amsgrad_any(
    T* p, G* g, M* m, M* v, M* vmax, const bool* mask, bool consume, int64_t begin,
    int64_t end, const AdamHyper<M> h, const M step_size, const M bc2_sqrt,
    const M grad_scale) {
  with_stream_flags(mask != nullptr, consume, [&]<bool kMasked, bool kConsume>() IK_INLINE_LAMBDA {
    with_decay_kind(h, [&]<bool kDecay, bool kDecoupled>() IK_INLINE_LAMBDA {
      adam_stream<T, G, M, kMasked, kConsume, true, kDecay, kDecoupled>(
          p, g, m, v, vmax, mask, begin, end, h, step_size, bc2_sqrt, grad_scale);
    });
  });
}

// fp32 streaming loops compiled for several ISAs and picked when the library loads
// (GCC target_clones, an ifunc): AVX-512 or AVX2+FMA where the CPU has them,
// baseline x86-64 otherwise. The binary still runs on any x86-64 CPU: never
// -march=native. (At baseline SSE the AdamW step is compute-bound; with AVX2/AVX-512
// it reaches memory bandwidth: docs/design.md.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IK_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IK_ISA_CLONES
#endif

// Lanes of a tile: the 16 fp32 elements of one 64-byte line.
constexpr int32_t kTileLanes = 16;
// A tile with at most this many chosen lanes is updated lane by lane: the rule's
// square root and division cost about as much for one vector of 16 lanes as for a
// few lanes one at a time (docs/design.md, "The tile lists").
constexpr int kLaneByLane = 3;

// The lanes set in a tile's mask. __builtin_popcount is a library call where the
// target lacks POPCNT (the baseline x86-64 these files compile for), and the tile
// lists count lanes once a tile.
constexpr int lanes_set(uint32_t mask) {
  mask = mask - ((mask >> 1) & 0x55555555u);
  mask = (mask & 0x33333333u) + ((mask >> 2) & 0x33333333u);
  return int((((mask + (mask >> 4)) & 0x0f0f0f0fu) * 0x01010101u) >> 24);
}

// The masked loop over a list of tiles (first element starts[j], chosen lanes the
// bits of masks[j]), the ISA picked once per list, not once per tile (at low density
// nearly every listed tile stands alone). The lane's bit is read in the loop, not
// from a byte mask: a byte in the loop sets gcc's vector factor by the byte type (64
// lanes for AVX-512), more than a tile's 16, and the loop then ran scalar. `lanes`
// (kTileLanes) is a run-time value on purpose: with a constant count gcc unrolls the
// 16 iterations completely before it vectorises, and the unrolled code stays scalar.
// `vals` (or null): the gradients of the tiles updated lane by lane, tile by tile,
// lanes ascending, which the fused listing pass keeps while their lines are in cache;
// such a tile then waits on no gradient line. A fuller tile reads its gradient line
// (the 16-lane loop reads it whole, and such tiles cluster, as a matrix gradient's hot
// rows do, where the lines stream). Returns vals past the last one used.
template <typename T, typename G, typename M, bool kConsume, bool kDecay, bool kDecoupled>
[[gnu::always_inline]] inline const M* adam_tiles(T* p, G* g, const M* vals, M* m, M* v,
                                                  const int64_t* starts,
                                                  const uint32_t* masks, int64_t n,
                                                  int32_t lanes, AdamHyper<M> h,
                                                  const M step_size, const M bc2_sqrt,
                                                  const M grad_scale) {
  h.decay = kDecay;
  h.decoupled_weight_decay = kDecoupled;
  using PL = Lanes<T>;
  using GL = Lanes<G>;
  const auto g_zero = GL::narrow(M(0));
  for (int64_t j = 0; j < n; ++j) {
    auto* __restrict tp = reinterpret_cast<typename PL::Bits*>(p + starts[j]);
    auto* __restrict tg = reinterpret_cast<typename GL::Bits*>(g + starts[j]);
    M* __restrict tm = m + starts[j];
    M* __restrict tv = v + starts[j];
    const uint32_t bits = masks[j];
    if (lanes_set(bits) <= kLaneByLane) {
      for (uint32_t b = bits; b; b &= b - 1) {
        const int e = __builtin_ctz(b);
        M pm = PL::template widen<M>(tp[e]), mm = tm[e], vv = tv[e];
        const M gm = vals ? *vals++ : GL::template widen<M>(tg[e]);
        adam_rule(pm, gm * grad_scale, mm, vv, h, step_size, bc2_sqrt);
        tp[e] = PL::narrow(pm);
        tm[e] = mm;
        tv[e] = vv;
        if (kConsume) tg[e] = g_zero;
      }
      continue;
    }
    for (int32_t e = 0; e < lanes; ++e) {
      M pm = PL::template widen<M>(tp[e]), mm = tm[e], vv = tv[e];
      adam_rule(pm, GL::template widen<M>(tg[e]) * grad_scale, mm, vv, h, step_size, bc2_sqrt);
      const int32_t chosen = -int32_t((bits >> e) & 1u);
      tp[e] = blend_bits(chosen, PL::narrow(pm), tp[e]);
      tm[e] = blend_bits(chosen, mm, tm[e]);
      tv[e] = blend_bits(chosen, vv, tv[e]);
      if (kConsume) tg[e] = blend_bits(chosen, g_zero, tg[e]);
    }
  }
  return vals;
}

// adam_tiles for the run-time flags (consume, the weight-decay kind).
template <typename T, typename G, typename M>
[[gnu::always_inline]] inline const M* adam_tiles_any(
    T* p, G* g, const M* vals, M* m, M* v, bool consume, const int64_t* starts,
    const uint32_t* masks, int64_t n, int32_t lanes, const AdamHyper<M> h, const M step_size,
    const M bc2_sqrt, const M grad_scale) {
  const M* left = vals;
  with_consume(consume, [&]<bool kConsume>() IK_INLINE_LAMBDA {
    with_decay_kind(h, [&]<bool kDecay, bool kDecoupled>() IK_INLINE_LAMBDA {
      left = adam_tiles<T, G, M, kConsume, kDecay, kDecoupled>(
          p, g, vals, m, v, starts, masks, n, lanes, h, step_size, bc2_sqrt, grad_scale);
    });
  });
  return left;
}

// The param and gradient types whose loops are compiled for each ISA
// (IK_ISA_CLONES, update_cpu.cpp): fp32, bf16 and fp16 params with gradients of
// their own type, and 16-bit params read with fp32 gradients (a residual, or fp32
// grads). A 16-bit type's conversions left the baseline loop bound by its
// instructions. Each loop is one overloaded name: adam_stream_cloned (by mask or
// every element), adam_stream_above_cloned, adam_tiles_cloned,
// adam_stream_amsgrad_cloned.
#define IK_CLONED_TYPES(X)         \
  X(float, float)                  \
  X(c10::BFloat16, c10::BFloat16)  \
  X(c10::BFloat16, float)          \
  X(c10::Half, c10::Half)          \
  X(c10::Half, float)

#define IK_DECLARE_CLONED(T, G)                                                              \
  void adam_stream_cloned(T* p, G* g, float* m, float* v, const bool* mask, bool consume,    \
                          int64_t begin, int64_t end, const AdamHyper<float> h,              \
                          const float step_size, const float bc2_sqrt,                       \
                          const float grad_scale);                                           \
  void adam_stream_above_cloned(T* p, G* g, float* m, float* v, int32_t above_gt,            \
                                KeyFrom key_from, const float* keys, bool consume,           \
                                int64_t begin, int64_t end,                                  \
                                const AdamHyper<float> h, const float step_size,             \
                                const float bc2_sqrt, const float grad_scale);               \
  const float* adam_tiles_cloned(T* p, G* g, const float* vals, float* m, float* v,          \
                                 bool consume, const int64_t* starts, const uint32_t* masks, \
                                 int64_t n, int32_t lanes, const AdamHyper<float> h,         \
                                 const float step_size, const float bc2_sqrt,                \
                                 const float grad_scale);                                    \
  void adam_stream_amsgrad_cloned(T* p, G* g, float* m, float* v, float* vmax,               \
                                  const bool* mask, bool consume, int64_t begin, int64_t end, \
                                  const AdamHyper<float> h, const float step_size,           \
                                  const float bc2_sqrt, const float grad_scale);             \
  template <>                                                                                \
  inline constexpr bool kCloned<T, G> = true;

template <typename T, typename G>
inline constexpr bool kCloned = false;
IK_CLONED_TYPES(IK_DECLARE_CLONED)
#undef IK_DECLARE_CLONED

// adam_stream_any, or adam_stream_above_any where `above` (above_gt its threshold, on
// the keys key_from names), through the ISA-compiled loop where the types have one.
template <typename T, typename G, typename M>
inline void adam_stream_isa(T* p, G* g, M* m, M* v, const bool* mask, bool above,
                            int32_t above_gt, KeyFrom key_from, const M* keys, bool consume,
                            int64_t begin, int64_t end, const AdamHyper<M> h,
                            const M step_size, const M bc2_sqrt, const M grad_scale) {
  if constexpr (kCloned<T, G>) {
    if (above)
      return adam_stream_above_cloned(p, g, m, v, above_gt, key_from, keys, consume, begin,
                                      end, h, step_size, bc2_sqrt, grad_scale);
    adam_stream_cloned(p, g, m, v, mask, consume, begin, end, h, step_size, bc2_sqrt,
                       grad_scale);
  } else if (above) {
    adam_stream_above_any<T, G, M>(p, g, m, v, above_gt, key_from, keys, consume, begin, end,
                                   h, step_size, bc2_sqrt, grad_scale);
  } else {
    adam_stream_any<T, G, M>(p, g, m, v, mask, consume, begin, end, h, step_size, bc2_sqrt,
                             grad_scale);
  }
}

// adam_stream_amsgrad_any, through the ISA-compiled loop where the types have one.
template <typename T, typename G, typename M>
inline void adam_stream_amsgrad_isa(T* p, G* g, M* m, M* v, M* vmax, const bool* mask,
                                    bool consume, int64_t begin, int64_t end,
                                    const AdamHyper<M> h, const M step_size, const M bc2_sqrt,
                                    const M grad_scale) {
  if constexpr (kCloned<T, G>)
    adam_stream_amsgrad_cloned(p, g, m, v, vmax, mask, consume, begin, end, h, step_size,
                               bc2_sqrt, grad_scale);
  else
    adam_stream_amsgrad_any<T, G, M>(p, g, m, v, vmax, mask, consume, begin, end, h,
                                     step_size, bc2_sqrt, grad_scale);
}

// adam_tiles_any, through the ISA-compiled loop where the types have one.
template <typename T, typename G, typename M>
inline const M* adam_tiles_isa(T* p, G* g, const M* vals, M* m, M* v, bool consume,
                               const int64_t* starts, const uint32_t* masks, int64_t n,
                               int32_t lanes, const AdamHyper<M> h, const M step_size,
                               const M bc2_sqrt, const M grad_scale) {
  if constexpr (kCloned<T, G>)
    return adam_tiles_cloned(p, g, vals, m, v, consume, starts, masks, n, lanes, h, step_size,
                             bc2_sqrt, grad_scale);
  else
    return adam_tiles_any<T, G, M>(p, g, vals, m, v, consume, starts, masks, n, lanes, h,
                                   step_size, bc2_sqrt, grad_scale);
}

}  // namespace incrkern
