// CPU kernels of the accumulate family: acc += alpha * g and
// sq = sq_decay * sq + sq_alpha * g * g, one parallel loop over the elements of
// every tensor of a call (common/parallel_ranges.h). The math is csrc/common/rules.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "accumulate/accumulate_checks.h"
#include "accumulate/accumulate_cpu.h"
#include "common/amp_checks.h"
#include "common/parallel_ranges.h"
#include "common/rules.h"

namespace incrkern {
namespace {

constexpr int64_t kGrain = 1 << 16;  // elements per task

// Grad element -> math type. fp16 is widened with integer and float operations and
// bit masks instead of a branch (the method of c10's fp16_ieee_to_fp32_value, equal
// to it for all 65536 inputs), which gcc vectorises with the baseline x86-64 ISA;
// c10::Half's own conversion leaves the loop scalar, slower than the memory (see
// Note [branch-free loops vectorise] in common/hd.h). Used where the CPU lacks F16C
// (below).
template <typename M, typename G>
inline M to_math(G x) {
  return M(x);
}

template <>
inline float to_math<float, c10::Half>(c10::Half x) {
  const uint32_t w = uint32_t(x.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers, inf and NaN: exponent and mantissa moved into place, the
  // exponent rebiased by a multiplication.
  const float normal = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Zero and subnormals: the mantissa as the low bits of 0.5's mantissa, minus 0.5.
  const float subnormal = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t take_subnormal = uint32_t(-int32_t(int32_t(two_w >> 1) < int32_t(1u << 26)));
  return std::bit_cast<float>(sign | (std::bit_cast<uint32_t>(subnormal) & take_subnormal) |
                              (std::bit_cast<uint32_t>(normal) & ~take_subnormal));
}

// Elements [0, n) of one tensor. One loop per combination of accumulators, with
// unaliased pointers, so that gcc vectorises each: see Note [branch-free loops
// vectorise] in common/hd.h.
template <typename G, typename M>
void accumulate_range(M* __restrict__ a, M* __restrict__ s, const G* __restrict__ x,
                      int64_t n, M alpha, M sq_alpha, M sq_decay) {
  if (a && s) {
    for (int64_t e = 0; e < n; ++e) {
      const M gm = to_math<M>(x[e]);
      accumulate_rule(a[e], gm, alpha);
      accumulate_sq_rule(s[e], gm, sq_alpha, sq_decay);
    }
  } else if (a) {
    for (int64_t e = 0; e < n; ++e) accumulate_rule(a[e], to_math<M>(x[e]), alpha);
  } else if (s) {
    for (int64_t e = 0; e < n; ++e) accumulate_sq_rule(s[e], to_math<M>(x[e]), sq_alpha, sq_decay);
  }
}

// fp16 -> fp32 of n elements. Where the CPU has F16C (every x86-64 CPU since 2013)
// the hardware converts 8 at a time, which keeps the fp16 accumulate at memory
// speed; the portable path is the vectorised bit manipulation above.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx,f16c"))) void widen_half_f16c(const c10::Half* x, float* out,
                                                           int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + e));
    _mm256_storeu_ps(out + e, _mm256_cvtph_ps(h));
  }
  for (; e < n; ++e) out[e] = to_math<float>(x[e]);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#else
void widen_half_f16c(const c10::Half*, float*, int64_t) {}
bool cpu_has_f16c() { return false; }
#endif

void widen_half(const c10::Half* __restrict__ x, float* __restrict__ out, int64_t n) {
  if (cpu_has_f16c()) return widen_half_f16c(x, out, n);
  for (int64_t e = 0; e < n; ++e) out[e] = to_math<float>(x[e]);
}

// The work on elements [begin, end) of one tensor.
template <typename G, typename M>
RangeFn accumulate_ranges(M* acc, M* sq, const G* g, M alpha, M sq_alpha, M sq_decay) {
  return [=](int64_t begin, int64_t end) {
    M* a = acc ? acc + begin : nullptr;
    M* s = sq ? sq + begin : nullptr;
    if constexpr (std::is_same_v<G, c10::Half>) {
      // Widened a block at a time into a buffer that stays in L1.
      constexpr int64_t kBlock = 1024;
      float buf[kBlock];
      for (int64_t b = 0; b < end - begin; b += kBlock) {
        const int64_t len = std::min(kBlock, end - begin - b);
        widen_half(g + begin + b, buf, len);
        accumulate_range<float, M>(a ? a + b : nullptr, s ? s + b : nullptr, buf, len, alpha,
                                   sq_alpha, sq_decay);
      }
    } else {
      accumulate_range<G, M>(a, s, g + begin, end - begin, alpha, sq_alpha, sq_decay);
    }
  };
}

}  // namespace

void accumulate_checked(at::TensorList accs, at::TensorList grads, double alpha,
                        at::TensorList sq_accs, double sq_alpha, double sq_decay,
                        const std::optional<at::Tensor>& amp_scale,
                        const std::optional<at::Tensor>& found_inf) {
  if ((accs.empty() && sq_accs.empty()) || amp_found_inf(found_inf)) return;
  const std::optional<float> amp = amp_value(amp_scale);
  std::vector<RangeFn> fns;
  std::vector<int64_t> counts;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "incrkern_accumulate", [&] {
      using M = at::opmath_type<scalar_t>;
      fns.push_back(accumulate_ranges<scalar_t, M>(
          accs.empty() ? nullptr : accs[i].data_ptr<M>(),
          sq_accs.empty() ? nullptr : sq_accs[i].data_ptr<M>(), g.const_data_ptr<scalar_t>(),
          amp_factor<M>(alpha, amp), amp_sq_factor<M>(sq_alpha, amp), M(sq_decay)));
    });
    counts.push_back(g.numel());
  }
  run_ranges(fns, counts, kGrain);
}

namespace {

void accumulate_cpu(at::TensorList accs, at::TensorList grads, double alpha,
                    at::TensorList sq_accs, double sq_alpha, double sq_decay,
                    const std::optional<at::Tensor>& amp_scale,
                    const std::optional<at::Tensor>& found_inf) {
  check_accumulate_lists("incrkern.accumulate_", accs, grads, sq_accs, /*allow_double=*/true);
  check_amp("incrkern.accumulate_", amp_scale, found_inf, grads);
  accumulate_checked(accs, grads, alpha, sq_accs, sq_alpha, sq_decay, amp_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) {
  m.impl("accumulate_", &accumulate_cpu);
}

}  // namespace incrkern
