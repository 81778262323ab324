// Scores as order-preserving unsigned integer keys: the one definition the CPU and
// CUDA select kernels share, so both choose the same elements.
//
//  abs scores ("grad", "weight", "accumulated"): key = bits(|x|) << 1, every NaN
//    mapped to one key above +inf, so -0 and +0 are equal.
//  signed scores ("grad_sq", topk): the usual flip (negatives reversed below the
//    positives), -0 taken as +0, every NaN mapped to the largest key.
//  "random": a counter-based hash of (seed, tensor number, element index).
// Larger key = larger score. Ties are broken by the lowest position.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/hd.h"
#include "common/rules.h"

namespace incrkern {

// How a tensor's elements become keys: abs_key32 (Abs, Accumulated over residual +
// grad, and Fisher over the Fisher's next value, sq_decay * f + sq_alpha * g^2, as
// the fused CPU step forms it for select="grad_sq"), signed_key32 (Signed) or
// random_key32 (Random).
enum class ScoreKind : int32_t { Abs = 0, Signed = 1, Accumulated = 2, Random = 3, Fisher = 4 };

// Where the fused step (adam_select_update_) reads an element's key: its gradient (or
// residual), its param (score="weight"), given scores (score="grad_sq": the Fisher),
// or nowhere: the hash of its index (score="random").
enum class KeyFrom : int32_t { Grad = 0, Param = 1, Scores = 2, Random = 3 };

}  // namespace incrkern

namespace incrkern::select {

IK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

IK_HD uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, 8);
  return u;
#endif
}

// |x| as a key. All NaNs share 0x7f800001 << 1, one above +inf (0x7f800000 << 1).
IK_HD uint32_t abs_key32(float x) {
  // Kept in signed arithmetic so that the compiler can vectorise it with SSE2.
  int32_t v = static_cast<int32_t>(float_bits(x) & 0x7fffffffu);
  v = v < 0x7f800001 ? v : 0x7f800001;
  return static_cast<uint32_t>(v) << 1;
}

IK_HD uint32_t signed_key32(float x) {
  if (x != x) return 0xffffffffu;
  const uint32_t u = float_bits(x + 0.0f);  // -0 + 0 = +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The key the CUDA select gives an element of gradient g (and residual r) for a
// score kind other than Random; its host runs make theirs with it too. Accumulated:
// of r + alpha * g, as accumulate_ forms it.
IK_HD uint32_t score_key32(ScoreKind kind, float g, float r, float alpha) {
  if (kind == ScoreKind::Accumulated) {
    accumulate_rule(r, g, alpha);
    g = r;
  }
  return kind == ScoreKind::Signed ? signed_key32(g) : abs_key32(g);
}

IK_HD uint64_t abs_key64(double x) {
  uint64_t u = double_bits(x) & 0x7fffffffffffffffull;
  u = u < 0x7ff0000000000001ull ? u : 0x7ff0000000000001ull;
  return u << 1;
}

IK_HD uint64_t signed_key64(double x) {
  if (x != x) return ~0ull;
  const uint64_t u = double_bits(x + 0.0);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// murmur3's 32-bit finaliser.
IK_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Per-tensor constants of the random score, from the op's seed and the tensor's
// number in the list (computed once on the host).
struct RandomKeys {
  uint32_t kt, kt2;
};

inline RandomKeys random_keys(int64_t seed, int64_t tensor) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t lo = static_cast<uint32_t>(s), hi = static_cast<uint32_t>(s >> 32);
  const uint32_t kt = fmix32(lo ^ fmix32(hi + static_cast<uint32_t>(tensor) * 0x9e3779b9u));
  return RandomKeys{kt, fmix32(kt ^ 0x6a09e667u)};
}

// The random key of element i: uniform over uint32, reproducible anywhere.
IK_HD uint32_t random_key32(uint32_t kt, uint32_t kt2, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  const uint32_t h = fmix32(static_cast<uint32_t>(u) ^ kt);
  return fmix32(h + static_cast<uint32_t>(u >> 32) * 0x9e3779b9u + kt2);
}

}  // namespace incrkern::select
