// CPU kernels of the select family: indices (ascending) of the k largest scores of
// one tensor, of each tensor of a list, or of the concatenation of a list.
//
// The element chosen last, e* = the k-th under (key descending, position ascending),
// defines the answer: an element is chosen iff key > T or (key == T and pos <= I),
// with (T, I) = (key, position) of e*. The kernels find it in one of these ways:
//
//  0. Inputs of up to one block (2^18 elements: a model's many small tensors), one
//     thread each. Up to about 3% density: the largest key of every 16-element
//     group, then the groups whose maximum reaches the k-th largest maximum, which
//     hold every chosen key (exact, one read from memory). Denser: a sample's lower
//     bound on the k-th key and one read keeping the keys above it. Both end with
//     the k-th of a few candidates.
//  1. Sampled band (larger inputs, one read): the keys of a 64K constant-stride
//     sample bound the k-th key from above (H) and below (L) with a margin of four
//     standard deviations. One pass keeps, per block, the positions with key > H
//     (winners) and the (key, position) pairs with L <= key <= H (candidates).
//     When #winners < k <= #winners + #candidates, e* is the (k - #winners)-th
//     candidate (radix rounds over the few candidates' keys) and every block merges its
//     winners with its chosen candidates into the output. Else the band missed.
//     When the sample shows a tie mass in the band instead (few distinct values),
//     its k-th key is tried as the answer: one counting pass confirms it.
//  2. Radix select (exact fallback, any input): per-thread histograms of 11-bit
//     digits of the keys, most significant first, each pass restricted to the
//     keys that share the digits found so far. It stops as soon as the bucket of
//     the k-th is wholly chosen, or holds few enough elements to finish with the
//     band pass of 1, whose band is then the bucket itself. A bucket holding one
//     key only (ties) settles the k-th key at once; ties at the k-th key are
//     taken lowest positions first by counting them per block.
//
// Positions are int64 everywhere (tensors beyond 2^31 elements). The scores are
// computed from the inputs on the fly; no score tensor is ever materialised.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <exception>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "select/select_common.h"
#include "select/select_keys.h"

namespace incrkern {
namespace {

using namespace incrkern::select;

constexpr int64_t kBlock = int64_t(1) << 18;     // elements per block of work
constexpr int64_t kSerialMax = int64_t(1) << 15;  // below: one thread, nth_element
constexpr int64_t kSample = int64_t(1) << 16;
constexpr int64_t kMinSample = int64_t(1) << 12;
constexpr int kDigitBits = 11;

// setup.py builds with -fopenmp, so at::parallel_for (an OpenMP pragma in a header)
// spreads the blocks over at::get_num_threads() threads.
using at::parallel_for;

// ---------------------------------------------------------------------------------
// Readers: key(i) of element i of one tensor, for each score and dtype.

template <typename K, typename T>
inline K abs_key(T v) {
  if constexpr (sizeof(K) == 4) return abs_key32(static_cast<float>(v));
  else return abs_key64(static_cast<double>(v));
}

template <typename K, typename T>
inline K signed_key(T v) {
  if constexpr (sizeof(K) == 4) return signed_key32(static_cast<float>(v));
  else return signed_key64(static_cast<double>(v));
}

template <typename K, typename T>
struct AbsReader {
  const T* p;
  K operator()(int64_t i) const { return abs_key<K>(p[i]); }
};

template <typename K, typename T>
struct SignedReader {
  const T* p;
  K operator()(int64_t i) const { return signed_key<K>(p[i]); }
};

// |residual + grad|, added in the residual's dtype (the math dtype).
template <typename K, typename T, typename R>
struct AccumReader {
  const T* g;
  const R* r;
  K operator()(int64_t i) const { return abs_key<K>(r[i] + static_cast<R>(g[i])); }
};

template <typename K>
struct RandomReader {
  uint32_t kt, kt2;
  K operator()(int64_t i) const { return K(random_key32(kt, kt2, i)); }
};

// One tensor's share of a selection: how to read its keys, its length and the
// position of its first element in the concatenation.
struct Source {
  ScoreKind score;
  at::ScalarType dtype;
  const void* data;
  at::ScalarType res_dtype;
  const void* res;
  RandomKeys rk;
  int64_t n;
  int64_t pos0;
};

template <typename K, typename Fn>
void with_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    case at::kDouble:
      if constexpr (sizeof(K) == 8) return fn(double{});
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "incrkern.select: unsupported dtype ", dtype);
  }
}

// Calls fn(reader) with the typed reader of source s.
template <typename K, typename Fn>
void with_reader(const Source& s, Fn&& fn) {
  switch (s.score) {
    case ScoreKind::Random:
      return fn(RandomReader<K>{s.rk.kt, s.rk.kt2});
    case ScoreKind::Abs:
      return with_dtype<K>(s.dtype, [&](auto t) {
        using T = decltype(t);
        fn(AbsReader<K, T>{static_cast<const T*>(s.data)});
      });
    case ScoreKind::Signed:
      return with_dtype<K>(s.dtype, [&](auto t) {
        using T = decltype(t);
        fn(SignedReader<K, T>{static_cast<const T*>(s.data)});
      });
    case ScoreKind::Accumulated:
      return with_dtype<K>(s.dtype, [&](auto t) {
        using T = decltype(t);
        if (s.res_dtype == at::kDouble) {
          if constexpr (sizeof(K) == 8)
            return fn(AccumReader<K, T, double>{static_cast<const T*>(s.data),
                                                static_cast<const double*>(s.res)});
          TORCH_CHECK(false, "incrkern.select: float64 residuals need float64 keys");
        } else {
          fn(AccumReader<K, T, float>{static_cast<const T*>(s.data),
                                      static_cast<const float*>(s.res)});
        }
      });
  }
}

struct Block {
  int src;
  int64_t begin, end;  // element range inside the source
};

// Vectorised hot loops. The band pass reads keys in groups of kGroup and looks at
// a group element by element only when one of its keys reaches the band. GCC/Clang
// vector extensions compile to SSE2 on any x86-64 (and to NEON on arm64); the
// scalar readers' branches and conversions would keep the compiler from it.
constexpr int kGroup = 16;
typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v4u16 __attribute__((vector_size(8)));

inline v4i splat(int32_t v) { return v4i{v, v, v, v}; }

inline v4i abs_keys4(v4i bits) {
  v4i v = bits & splat(0x7fffffff);
  v = v > splat(0x7f800001) ? splat(0x7f800001) : v;
  return v << 1;
}

inline v4i signed_keys4(v4f x) {
  const v4i nan = x != x;
  x = x + v4f{0.f, 0.f, 0.f, 0.f};
  v4i u;
  std::memcpy(&u, &x, 16);
  const v4i flip = (u >> 31) | splat(INT32_MIN);  // negative: all bits; else the sign bit
  return (u ^ flip) | nan;
}

inline v4f load4f(const float* p) {
  v4f v;
  std::memcpy(&v, p, 16);
  return v;
}

inline v4f load4f(const c10::BFloat16* p) {
  v4u16 h;
  std::memcpy(&h, p, 8);
  const v4i bits = __builtin_convertvector(h, v4i) << 16;
  v4f v;
  std::memcpy(&v, &bits, 16);
  return v;
}

template <typename T>
constexpr bool kVecDtype = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

// keys[0..kGroup) = rd(i .. i + kGroup).
template <typename K, typename Reader>
inline void group_keys(const Reader& rd, int64_t i, K (&keys)[kGroup]) {
  if constexpr (sizeof(K) == 4) {
    if constexpr (requires { rd.p; }) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(rd.p)>>;
      if constexpr (kVecDtype<T>) {
        constexpr bool is_abs = std::is_same_v<Reader, AbsReader<K, T>>;
        for (int j = 0; j < kGroup; j += 4) {
          const v4f x = load4f(rd.p + i + j);
          v4i key;
          if constexpr (is_abs) {
            v4i bits;
            std::memcpy(&bits, &x, 16);
            key = abs_keys4(bits);
          } else {
            key = signed_keys4(x);
          }
          std::memcpy(keys + j, &key, 16);
        }
        return;
      }
    } else if constexpr (requires { rd.r; }) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(rd.g)>>;
      using R = std::remove_cv_t<std::remove_pointer_t<decltype(rd.r)>>;
      if constexpr (kVecDtype<T> && std::is_same_v<R, float>) {
        for (int j = 0; j < kGroup; j += 4) {
          const v4f x = load4f(rd.r + i + j) + load4f(rd.g + i + j);
          v4i bits;
          std::memcpy(&bits, &x, 16);
          const v4i key = abs_keys4(bits);
          std::memcpy(keys + j, &key, 16);
        }
        return;
      }
    }
  }
  for (int j = 0; j < kGroup; ++j) keys[j] = rd(i + j);
}

#if defined(__SSE2__)
// Bit j set when keys[j] > t (unsigned), for 32-bit keys.
inline uint32_t mask_greater(const uint32_t (&keys)[kGroup], uint32_t t) {
  const __m128i flip = _mm_set1_epi32(INT32_MIN);
  const __m128i tt = _mm_set1_epi32(int32_t(t ^ 0x80000000u));
  uint32_t m = 0;
  for (int j = 0; j < kGroup; j += 4) {
    const __m128i k = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + j)), flip);
    m |= uint32_t(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(k, tt)))) << j;
  }
  return m;
}
#endif

// The scans of the usual cases, |x| (a gradient, a weight) or x itself (top-k, an
// EMA of g^2) of fp32, bf16 or fp16 (not a residual sum): per group of kGroup
// elements, the bit masks of its keys >= lo and > hi, from a load, a few bit
// operations and two compares per 8 elements, and the positions of the set bits
// written out by compress stores. AVX2 where the CPU has it (checked once), scalar
// otherwise: at SSE2 width the band pass ran at half the memory bandwidth of two
// cores.
//
// Each element's fp32 bits map to an int32 "order" that sorts as its key does
// (select_keys.h), so that key >= t is one signed compare with a threshold kept as
// "order greater than":
//  - |x| (kSigned false): the bits without the sign; the key is min(order, NaN) << 1,
//    every NaN above +inf.
//  - x (kSigned true): the bits of x + 0 (-0 as +0) with the magnitude bits flipped
//    for negatives (two's complement order), every NaN as INT32_MAX; the key is the
//    order with its top bit flipped.
template <bool kSigned>
inline int32_t order_greater_than(uint64_t at_least) {
  if constexpr (kSigned) {
    if (at_least == 0) return INT32_MIN;  // every key: no element's order is INT32_MIN
    if (at_least > 0xffffffffu) return INT32_MAX;  // no key
    return int32_t(uint32_t(at_least) ^ 0x80000000u) - 1;
  } else {
    const uint64_t half = (at_least + 1) >> 1;
    return half > 0x7f800001u ? INT32_MAX : int32_t(half) - 1;
  }
}

// The key of an order (of a group's largest).
template <bool kSigned>
inline uint32_t key_of_order(int32_t order) {
  if constexpr (kSigned) return uint32_t(order) ^ 0x80000000u;
  else return uint32_t(std::min(order, 0x7f800001)) << 1;
}

// The element types the vector scans read: their fp32 bits are the element's own
// (fp32), a shift of them (bf16 is the top half of its fp32) or F16C's conversion
// (fp16).
template <typename T>
constexpr bool kScanDtype = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                            std::is_same_v<T, c10::Half>;

// The order of x[i], for the portable loops.
template <bool kSigned, typename T>
inline int32_t order_at(const T* x, int64_t i) {
  int32_t b;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&b, x + i, 4);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    const float v = static_cast<float>(x[i]);
    std::memcpy(&b, &v, 4);
  } else {
    uint16_t h;
    std::memcpy(&h, x + i, 2);
    b = int32_t(uint32_t(h) << 16);
  }
  if constexpr (kSigned) {
    float v;
    std::memcpy(&v, &b, 4);
    v += 0.0f;  // -0 as +0
    if (v != v) return INT32_MAX;
    std::memcpy(&b, &v, 4);
    return b ^ ((b >> 31) & 0x7fffffff);
  } else {
    return b & 0x7fffffff;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The orders of 8 elements.
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) inline __m256i order8_avx2(const T* q) {
  __m256i bits;
  if constexpr (std::is_same_v<T, float>)
    bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  else if constexpr (std::is_same_v<T, c10::Half>)
    bits = _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  else
    bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), 16);
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  if constexpr (kSigned) {
    const __m256 x = _mm256_add_ps(_mm256_castsi256_ps(bits), _mm256_setzero_ps());
    const __m256i b = _mm256_castps_si256(x);
    const __m256i order = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), magnitude));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(order, magnitude, nan);
  } else {
    return _mm256_and_si256(bits, magnitude);
  }
}
#endif

// The positions of the set bits of an 8-bit mask, in order (the rest 0): a
// compress-store table, so that a group's chosen positions are written with two
// vector stores and no branch per element (a loop over the bits mispredicted
// about once per chosen element, the dominant cost of the band pass at k = 1%).
struct CompressTable {
  uint8_t pos[256][8];
  constexpr CompressTable() : pos{} {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int j = 0; j < 8; ++j)
        if ((m >> j) & 1) pos[m][c++] = uint8_t(j);
    }
  }
};
inline constexpr CompressTable kCompress{};

// Slack the compress stores may write past the last position kept.
constexpr int64_t kStoreSlack = 8;

#if defined(__x86_64__) && defined(__GNUC__)
// Writes base + j for every set bit j of mask16 at out; returns the new end.
__attribute__((target("avx2,f16c"))) inline int64_t* store_positions_avx2(int64_t* out,
                                                                           int64_t base,
                                                                           uint32_t mask16) {
  for (int h = 0; h < 2; ++h) {
    const uint32_t m = (mask16 >> (8 * h)) & 0xffu;
    const __m128i offs = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.pos[m]));
    const __m256i b = _mm256_set1_epi64x(base + 8 * h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_add_epi64(b, _mm256_cvtepu8_epi64(offs)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4),
                        _mm256_add_epi64(b, _mm256_cvtepu8_epi64(_mm_srli_si128(offs, 4))));
    out += __builtin_popcount(m);
  }
  return out;
}

// Bit j of 16 set when lane j of (a, b) is greater than t.
__attribute__((target("avx2,f16c"))) inline uint32_t gt_mask16(__m256i a, __m256i b, __m256i t) {
  return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, t)))) |
         (uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b, t)))) << 8);
}

// One chunk of groups: positions (base + offset) of the keys > hi to win, of the
// keys in [lo, hi] to cand; each needs room for 16 * groups + kStoreSlack.
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) void band_avx2(const T* x, int64_t groups, int32_t lo_gt,
                                                    int32_t hi_gt, int64_t base, int64_t*& win,
                                                    int64_t*& cand, bool few_hits) {
  if (few_hits) {
    // Few groups hold a key >= lo: a branch per group, rarely taken, costs least.
    const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const T* q = x + gi * kGroup;
      const __m256i a = order8_avx2<T, kSigned>(q), b = order8_avx2<T, kSigned>(q + 8);
      const uint32_t ml = gt_mask16(a, b, lo);
      if (!ml) continue;
      const uint32_t mh = gt_mask16(a, b, hi);
      win = store_positions_avx2(win, base + gi * kGroup, mh);
      cand = store_positions_avx2(cand, base + gi * kGroup, ml & ~mh);
    }
    return;
  }
  // Many do (k = 1% puts a candidate in about one group in six): two loops, neither
  // with a branch that depends on the data. The first lists the groups holding a
  // key >= lo (every group's masks are written, the list advances only past those),
  // the second writes their positions. A branch per such group mispredicted about
  // once per chosen element.
  constexpr int64_t kMaxGroups = 256;
  uint32_t hit_group[kMaxGroups + 1];
  uint32_t hit_masks[kMaxGroups + 1];  // mask >= lo in the low 16 bits, > hi in the high
  const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
  for (int64_t g0 = 0; g0 < groups; g0 += kMaxGroups) {
    const int64_t g1 = std::min(groups, g0 + kMaxGroups);
    int64_t nh = 0;
    for (int64_t gi = g0; gi < g1; ++gi) {
      const T* q = x + gi * kGroup;
      const __m256i a = order8_avx2<T, kSigned>(q), b = order8_avx2<T, kSigned>(q + 8);
      const uint32_t ml = gt_mask16(a, b, lo), mh = gt_mask16(a, b, hi);
      hit_group[nh] = uint32_t(gi);
      hit_masks[nh] = ml | (mh << 16);
      nh += ml != 0;
    }
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t start = base + int64_t(hit_group[h]) * kGroup;
      const uint32_t mh = hit_masks[h] >> 16, ml = hit_masks[h] & 0xffffu;
      win = store_positions_avx2(win, start, mh);
      cand = store_positions_avx2(cand, start, ml & ~mh);
    }
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) int64_t groups_at_least_avx2(const T* x,
                                                                  const int64_t* groups, int64_t n,
                                                                  int32_t lo_gt, int64_t* out) {
  const __m256i lo = _mm256_set1_epi32(lo_gt);
  int64_t* o = out;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t start = groups[j] * kGroup;
    o = store_positions_avx2(o, start,
                             gt_mask16(order8_avx2<T, kSigned>(x + start),
                                       order8_avx2<T, kSigned>(x + start + 8), lo));
  }
  return o - out;
}
#endif

// Whether the vector scans run: AVX2 and F16C on the CPU, and INCRKERN_CPU_BASELINE not set
// (it takes the portable loops; the tests run both).
inline bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           !std::getenv("INCRKERN_CPU_BASELINE");
  return avx2;
#else
  return false;
#endif
}

template <bool kSigned, typename T>
inline void scan_band(const T* x, int64_t groups, int32_t lo_gt, int32_t hi_gt, int64_t base,
                      int64_t*& win, int64_t*& cand, bool few_hits) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return band_avx2<T, kSigned>(x, groups, lo_gt, hi_gt, base, win, cand, few_hits);
#endif
  for (int64_t e = 0; e < groups * kGroup; ++e) {
    const int32_t order = order_at<kSigned>(x, e);
    *win = base + e;
    win += order > hi_gt;
    *cand = base + e;
    cand += order > lo_gt && order <= hi_gt;
  }
}

// The positions (group * kGroup + offset) of the elements whose order is > lo_gt in
// the listed groups of x, in list order, written at out (room for 16 a group plus
// kStoreSlack); returns their count.
template <bool kSigned, typename T>
inline int64_t scan_groups_at_least(const T* x, const int64_t* groups, int64_t n, int32_t lo_gt,
                                    int64_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return groups_at_least_avx2<T, kSigned>(x, groups, n, lo_gt, out);
#endif
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t e = groups[j] * kGroup; e < (groups[j] + 1) * kGroup; ++e) {
      out[c] = e;
      c += order_at<kSigned>(x, e) > lo_gt;
    }
  return c;
}

// keys[g] = the largest key of group g of x, for `groups` whole groups.
#if defined(__x86_64__) && defined(__GNUC__)
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) void group_max_avx2(const T* x, int64_t groups, uint32_t* keys) {
  for (int64_t gi = 0; gi < groups; ++gi) {
    const T* q = x + gi * kGroup;
    const __m256i ab = _mm256_max_epi32(order8_avx2<T, kSigned>(q), order8_avx2<T, kSigned>(q + 8));
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    keys[gi] = key_of_order<kSigned>(_mm_cvtsi128_si32(m));
  }
}
#endif

template <bool kSigned, typename T>
inline void scan_group_max(const T* x, int64_t groups, uint32_t* keys) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return group_max_avx2<T, kSigned>(x, groups, keys);
#endif
  for (int64_t gi = 0; gi < groups; ++gi) {
    int32_t mx = INT32_MIN;
    for (int j = 0; j < kGroup; ++j) mx = std::max(mx, order_at<kSigned>(x, gi * kGroup + j));
    keys[gi] = key_of_order<kSigned>(mx);
  }
}

// Whether a reader is one the vector scans serve (|x| or x of fp32, bf16 or fp16, 32-bit
// keys), and whether its keys are signed.
template <typename K, typename Reader>
constexpr bool kScanReader = [] {
  if constexpr (sizeof(K) == 4 && requires(Reader r) { r.p; }) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(std::declval<Reader>().p)>>;
    return kScanDtype<T> && (std::is_same_v<Reader, AbsReader<K, T>> ||
                             std::is_same_v<Reader, SignedReader<K, T>>);
  } else {
    return false;
  }
}();

template <typename Reader>
constexpr bool kSignedReader = false;
template <typename K, typename T>
constexpr bool kSignedReader<SignedReader<K, T>> = true;

// When the reader is one the vector scans serve, calls win(pos, n) with runs of the positions in
// [begin, end) with key > hi and cand(i, key) for every one with lo <= key <= hi,
// each in ascending order, and returns true; else does nothing and returns false,
// and the caller runs its generic loop. frac_at_least_lo, the expected fraction of
// keys >= lo, picks the scan's loop.
template <typename K, typename Reader, typename Win, typename Cand>
bool for_band(const Reader& rd, int64_t begin, int64_t end, K lo, K hi, double frac_at_least_lo,
              Win&& win, Cand&& cand) {
  if constexpr (kScanReader<K, Reader>) {
    // Under about 3% of groups expected to hold a key >= lo: the branchy scan.
    const bool few_hits = frac_at_least_lo * kGroup < 0.03;
    constexpr bool kSigned = kSignedReader<Reader>;
    const int32_t lo_gt = order_greater_than<kSigned>(lo);
    const int32_t hi_gt = order_greater_than<kSigned>(uint64_t(hi) + 1);
    constexpr int64_t kChunkGroups = 256;  // 4K elements per scan call
    int64_t wbuf[kChunkGroups * kGroup + kStoreSlack], cbuf[kChunkGroups * kGroup + kStoreSlack];
    int64_t i = begin;
    while (end - i >= kGroup) {
      const int64_t groups = std::min<int64_t>(kChunkGroups, (end - i) / kGroup);
      int64_t *w = wbuf, *c = cbuf;
      scan_band<kSigned>(rd.p + i, groups, lo_gt, hi_gt, i, w, c, few_hits);
      if (w > wbuf) win(wbuf, w - wbuf);
      for (const int64_t* q = cbuf; q < c; ++q) cand(*q, rd(*q));
      i += groups * kGroup;
    }
    for (; i < end; ++i) {
      const K key = rd(i);
      if (key > hi) win(&i, 1);
      else if (key >= lo) cand(i, key);
    }
    return true;
  }
  return false;
}

// Whether any of the group's keys is >= lo.
template <typename K>
inline bool any_at_least(const K (&keys)[kGroup], K lo) {
  if constexpr (sizeof(K) == 4) {
    if (lo == 0) return true;
    const v4i s = splat(int32_t((lo - 1) ^ 0x80000000u));
    v4i acc = splat(0);
    for (int j = 0; j < kGroup; j += 4) {
      v4i k;
      std::memcpy(&k, keys + j, 16);
      acc |= (k ^ splat(INT32_MIN)) > s;
    }
    return (acc[0] | acc[1] | acc[2] | acc[3]) != 0;
  } else {
    K mx = 0;
    for (int j = 0; j < kGroup; ++j) mx = mx > keys[j] ? mx : keys[j];
    return mx >= lo;
  }
}

// The r-th largest (1-based) of keys, which it reorders. Radix rounds of up to 11
// bits over the keys' own range, each keeping only the bin of the r-th, then
// nth_element on the few left: on the tens of thousands of candidates of a band
// this is a few linear passes, where nth_element alone mispredicted a branch per
// key per partition round.
template <typename K>
K kth_largest(std::vector<K>& keys, int64_t r) {
  // Bins: about half as many as keys, at most 2^11. Four interleaved copies, so that
  // keys falling in one bin do not each wait on the previous increment of it.
  const int bits = std::clamp(int(std::bit_width(keys.size())) - 1, 4, 11);
  const size_t nbins = size_t(1) << bits;
  const auto [lo_it, hi_it] = std::minmax_element(keys.begin(), keys.end());
  K mn = *lo_it, mx = *hi_it;
  std::vector<uint32_t> hist(4 * nbins);
  while (int64_t(keys.size()) > 64 && mn != mx) {
    const int shift = std::max(0, int(std::bit_width(K(mx - mn))) - bits);
    std::fill(hist.begin(), hist.end(), 0u);
    size_t j = 0;
    for (; j + 4 <= keys.size(); j += 4)
      for (size_t c = 0; c < 4; ++c) ++hist[c * nbins + size_t((keys[j + c] - mn) >> shift)];
    for (; j < keys.size(); ++j) ++hist[size_t((keys[j] - mn) >> shift)];
    for (size_t b = 0; b < nbins; ++b)
      hist[b] += hist[nbins + b] + hist[2 * nbins + b] + hist[3 * nbins + b];
    size_t b = size_t((mx - mn) >> shift);
    for (; r > int64_t(hist[b]); --b) r -= hist[b];
    size_t w = 0;
    for (K key : keys)
      if (size_t((key - mn) >> shift) == b) keys[w++] = key;
    keys.resize(w);
    // The kept bin is [base, base + width], cut at mx: computed as a difference, since
    // base + width can pass the largest key (the top bin of keys near 2^32, +inf and
    // NaN as signed keys), where the sum wrapped and the loop never ended.
    const K base = K(mn + (K(b) << shift)), width = K((K(1) << shift) - 1);
    if (K(mx - base) > width) mx = K(base + width);
    mn = base;
  }
  if (mn == mx) return mn;
  std::nth_element(keys.begin(), keys.begin() + (r - 1), keys.end(), std::greater<K>());
  return keys[size_t(r - 1)];
}

// Counts of keys by their top 13 bits (1/32 of an octave for |float| keys), for a
// lower bound on the r-th largest key at most one bin under it. Keys are added while
// a scan waits on memory, where a count costs nothing; kth_largest's rounds over a
// small tensor's few hundred group maxima afterwards cost about 2 us, as much as
// reading the tensor. One table per thread, left zeroed for the next use.
template <typename K>
class TopBitsHistogram {
 public:
  static constexpr int kShift = int(8 * sizeof(K)) - 13;
  TopBitsHistogram() : hist_(table()) {
    TORCH_INTERNAL_ASSERT(!in_use(), "incrkern: one TopBitsHistogram per thread at a time");
    in_use() = true;
  }
  TopBitsHistogram(const TopBitsHistogram&) = delete;
  ~TopBitsHistogram() {
    if (lo_ <= hi_) std::fill(hist_.begin() + bin(lo_), hist_.begin() + bin(hi_) + 1, 0u);
    in_use() = false;
  }
  void add(K key) {
    ++hist_[bin(key)];
    lo_ = std::min(lo_, key);
    hi_ = std::max(hi_, key);
  }
  // The bin holding the r-th largest key added (1 <= r <= count): its least key, and
  // the rank of that key among the bin's keys.
  std::pair<K, int64_t> locate(int64_t r) const {
    size_t b = bin(hi_);
    for (; r > int64_t(hist_[b]); --b) r -= hist_[b];
    return {K(K(b) << kShift), r};
  }
  static size_t bin(K key) { return size_t(key >> kShift); }

 private:
  static std::vector<uint32_t>& table() {
    thread_local std::vector<uint32_t> t(size_t(1) << 13);
    return t;
  }
  static bool& in_use() {
    thread_local bool used = false;
    return used;
  }
  std::vector<uint32_t>& hist_;
  K lo_ = std::numeric_limits<K>::max(), hi_ = 0;
};

// The m largest of keys (m <= keys.size()), the least of them at front(). A min-heap
// when m is small against the count (nearly every key then costs one compare with
// the heap's top), nth_element otherwise.
template <typename K>
std::vector<K> largest(const std::vector<K>& keys, int64_t m) {
  if (m * 32 > int64_t(keys.size())) {  // many: a heap would do log(m) work per key
    std::vector<K> all(keys);
    std::nth_element(all.begin(), all.begin() + (m - 1), all.end(), std::greater<K>());
    all.resize(size_t(m));
    std::swap(all.front(), all.back());  // the least of them first, as the heap has it
    return all;
  }
  std::vector<K> heap(keys.begin(), keys.begin() + m);
  std::make_heap(heap.begin(), heap.end(), std::greater<K>());
  for (size_t i = size_t(m); i < keys.size(); ++i)
    if (keys[i] > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<K>());
      heap.back() = keys[i];
      std::push_heap(heap.begin(), heap.end(), std::greater<K>());
    }
  return heap;
}

// The r-th largest of keys (1-based): the top-bits bin that holds it, then
// nth_element over that bin's keys only. For the few hundred candidates of a small
// tensor, where kth_largest's minmax and counting rounds cost more than this.
template <typename K>
K kth_of_few(const std::vector<K>& keys, int64_t r) {
  std::pair<K, int64_t> at;
  {
    TopBitsHistogram<K> hist;
    for (K key : keys) hist.add(key);
    at = hist.locate(r);
  }
  std::vector<K> in_bin(keys.size());
  const size_t b = TopBitsHistogram<K>::bin(at.first);
  size_t w = 0;
  for (K key : keys) {  // without a branch: whether a key is in the bin is as good as random
    in_bin[w] = key;
    w += TopBitsHistogram<K>::bin(key) == b;
  }
  std::nth_element(in_bin.begin(), in_bin.begin() + (at.second - 1), in_bin.begin() + w,
                   std::greater<K>());
  return in_bin[size_t(at.second - 1)];
}

template <typename K>
struct Cand {
  K key;
  int64_t pos;  // position in the concatenation
};

template <typename K>
inline bool before(const Cand<K>& a, const Cand<K>& b) {
  return a.key > b.key || (a.key == b.key && a.pos < b.pos);
}

// Per block results of a band pass.
template <typename K>
struct BandOut {
  std::vector<int64_t> win;   // local positions with key > H, ascending
  std::vector<K> ckey;        // candidates L <= key <= H, ascending positions
  std::vector<int64_t> cidx;
};

template <typename K>
class Selector {
 public:
  Selector(std::vector<Source> srcs, int64_t k, bool approx) : srcs_(std::move(srcs)), k_(k), approx_(approx) {
    for (const Source& s : srcs_) n_ += s.n;
    for (int i = 0; i < int(srcs_.size()); ++i)
      for (int64_t b = 0; b < srcs_[i].n; b += kBlock)
        blocks_.push_back(Block{i, b, std::min(srcs_[i].n, b + kBlock)});
    budget_ = std::clamp<int64_t>(n_ / 16, int64_t(1) << 16, int64_t(1) << 23);
  }

  // One int64 tensor of ascending local positions per source.
  std::vector<at::Tensor> run() {
    tie_guess_.reset();
    if (k_ == 0) return finish_empty();
    if (k_ == n_) return finish_all();
    if (n_ <= kBlock) {
      if (auto out = run_group_max()) return std::move(*out);
      if (auto out = run_filter()) return std::move(*out);
    }
    if (n_ <= kSerialMax) return run_serial();
    if (auto band = sample_band()) {
      std::vector<BandOut<K>> out;
      if (band_pass(band->first, band->second, 2 * budget_, out)) {
        int64_t w = 0, c = 0;
        for (const auto& b : out) w += int64_t(b.win.size()), c += int64_t(b.cidx.size());
        if (w < k_ && k_ <= w + c) return resolve_and_merge(out, k_ - w);
        if (approx_) {
          const int64_t tol = tolerance(k_);
          if (w >= k_ && w - k_ <= tol) return merge_all(out, false);
          if (w + c < k_ && k_ - (w + c) <= tol) return merge_all(out, true);
        }
      }
    }
    if (tie_guess_) {  // one counting pass checks whether the guess is the k-th key
      const FinalCounts c = final_counts(*tie_guess_);
      int64_t gt = 0, eq = 0;
      for (size_t b = 0; b < c.greater.size(); ++b) gt += c.greater[b], eq += c.equal[b];
      if (gt < k_ && k_ <= gt + eq) return final_write(*tie_guess_, k_ - gt, c);
    }
    return run_radix();
  }

  // The approximate mode's accepted miss: 1% of k, at least 1.
  static int64_t tolerance(int64_t k) { return std::max<int64_t>(1, k / 100); }

 private:
  std::vector<Source> srcs_;
  int64_t k_, n_ = 0, budget_;
  bool approx_;
  std::vector<Block> blocks_;
  std::optional<K> tie_guess_;  // set by sample_band when the band is too wide

  int64_t gpos(const Block& b, int64_t i) const { return srcs_[b.src].pos0 + i; }

  std::vector<at::Tensor> alloc(const std::vector<int64_t>& per_src) const {
    std::vector<at::Tensor> outs;
    for (int64_t c : per_src) outs.push_back(at::empty({c}, at::TensorOptions().dtype(at::kLong)));
    return outs;
  }

  std::vector<at::Tensor> finish_empty() const {
    return alloc(std::vector<int64_t>(srcs_.size(), 0));
  }

  std::vector<at::Tensor> finish_all() const {
    std::vector<int64_t> sizes;
    for (const Source& s : srcs_) sizes.push_back(s.n);
    std::vector<at::Tensor> outs = alloc(sizes);
    for (size_t i = 0; i < outs.size(); ++i) {
      int64_t* o = outs[i].data_ptr<int64_t>();
      parallel_for(0, srcs_[i].n, kBlock, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) o[j] = j;
      });
    }
    return outs;
  }

  // Small inputs: every key in a vector, the k-th by nth_element on the bare keys
  // (4 or 8 bytes each, not key-and-position pairs), then one ascending scan that
  // takes the keys above it and the first ties at it. Many small tensors (a model's
  // biases and norms) each take this path, so it is kept lean.
  std::vector<at::Tensor> run_serial() const {
    std::vector<K> keys(n_);
    for (const Source& s : srcs_)
      with_reader<K>(s, [&](auto rd) {
        for (int64_t i = 0; i < s.n; ++i) keys[s.pos0 + i] = rd(i);
      });
    // The k-th key: an 11-bit histogram of the top bits finds its bin, nth_element
    // then runs over that bin's keys alone (all of them only when every key shares
    // the bin).
    constexpr int kShift = int(sizeof(K) * 8) - kDigitBits;
    std::vector<int64_t> hist(size_t(1) << kDigitBits, 0);
    for (K key : keys) ++hist[size_t(key >> kShift)];
    int64_t bin = int64_t(hist.size()) - 1, above = 0;
    while (above + hist[size_t(bin)] < k_) above += hist[size_t(bin--)];
    std::vector<K> work;
    work.reserve(size_t(hist[size_t(bin)]));
    for (K key : keys)
      if (int64_t(key >> kShift) == bin) work.push_back(key);
    const int64_t rank = k_ - above - 1;  // 0-based rank from the top inside the bin
    std::nth_element(work.begin(), work.begin() + rank, work.end(), std::greater<K>());
    const K kth = work[size_t(rank)];
    int64_t ties = k_;  // ties at the k-th key still to take: k minus the keys above it
    for (K key : keys) ties -= key > kth;
    std::vector<int64_t> sizes(srcs_.size(), 0);
    int64_t left = ties;
    for (size_t i = 0; i < srcs_.size(); ++i)
      for (int64_t j = 0; j < srcs_[i].n; ++j) {
        const K key = keys[srcs_[i].pos0 + j];
        const bool take = key > kth || (key == kth && left > 0);
        left -= key == kth && left > 0;
        sizes[i] += take;
      }
    std::vector<at::Tensor> outs = alloc(sizes);
    left = ties;
    for (size_t i = 0; i < srcs_.size(); ++i) {
      int64_t* o = outs[i].data_ptr<int64_t>();
      for (int64_t j = 0; j < srcs_[i].n; ++j) {
        const K key = keys[srcs_[i].pos0 + j];
        if (key > kth || (key == kth && left > 0)) {
          left -= key == kth;
          *o++ = j;
        }
      }
    }
    return outs;
  }

  // Keys of s elements at a constant odd stride from a hashed start. A constant
  // stride lets the hardware prefetcher run ahead of the reads: with a random
  // offset in each stride, every read waited on memory, and the 64K-element sample
  // of a 1e7 tensor cost as much as three full reads. An odd stride walks through
  // every column of a matrix whose rows are a power of two (or any even) long.
  // The positions are computed first and then read in a tight loop per source.
  std::vector<K> sample_keys(int64_t s) const {
    uint64_t stride = std::max<uint64_t>(1, uint64_t(n_ / s));
    if (stride % 2 == 0) --stride;
    const uint64_t start = fmix32(uint32_t(n_) ^ 0x9e3779b9u) % stride;
    std::vector<int64_t> pos(s);
    for (int64_t j = 0; j < s; ++j) pos[j] = int64_t(start + uint64_t(j) * stride);
    std::vector<K> keys(s);
    parallel_for(0, s, 4096, [&](int64_t b, int64_t e) {
      for (const Source& src : srcs_) {
        const int64_t* first = std::lower_bound(pos.data() + b, pos.data() + e, src.pos0);
        const int64_t* last = std::lower_bound(first, static_cast<const int64_t*>(pos.data() + e), src.pos0 + src.n);
        if (first == last) continue;
        with_reader<K>(src, [&](auto rd) {
          // Reads kAhead samples ahead are requested early, to L2 (as the indexed
          // update does): each sample is its own line, and without this only a few
          // are waited on at once.
          constexpr int64_t kAhead = 64;
          const char* base = static_cast<const char*>(src.data);
          const int64_t size = src.data ? int64_t(c10::elementSize(src.dtype)) : 0;
          for (const int64_t* q = first; q < last; ++q) {
            if (base && last - q > kAhead) __builtin_prefetch(base + (q[kAhead] - src.pos0) * size, 0, 1);
            keys[q - pos.data()] = rd(*q - src.pos0);
          }
        });
      }
    });
    return keys;
  }

  // The answer from candidates (key, position in the concatenation, ascending) that
  // hold every key >= the k-th, at least k of them: the k-th of the candidates is
  // the k-th, and its ties are taken lowest positions first.
  std::vector<at::Tensor> finish_candidates(const std::vector<K>& ckey,
                                            const std::vector<int64_t>& cpos) const {
    TORCH_INTERNAL_ASSERT(int64_t(ckey.size()) >= k_, "incrkern.select: ", ckey.size(),
                          " candidates for k = ", k_);
    const K kth = kth_of_few(ckey, k_);
    int64_t ties = k_;  // keys equal to the k-th still to take, lowest positions first
    for (K key : ckey) ties -= key > kth;
    std::vector<int64_t> sizes(srcs_.size(), 0);
    std::vector<int64_t> chosen;
    chosen.reserve(size_t(k_));
    for (size_t j = 0; j < ckey.size(); ++j) {
      const bool tie = ckey[j] == kth && ties > 0;
      if (ckey[j] > kth || tie) chosen.push_back(cpos[j]);
      ties -= tie;
    }
    std::vector<int64_t> starts;
    for (const Source& src : srcs_) starts.push_back(src.pos0);
    for (int64_t q : chosen)
      ++sizes[std::upper_bound(starts.begin(), starts.end(), q) - starts.begin() - 1];
    std::vector<at::Tensor> outs = alloc(sizes);
    size_t j = 0;
    for (size_t i = 0; i < srcs_.size(); ++i) {
      int64_t* o = outs[i].data_ptr<int64_t>();
      for (int64_t c = 0; c < sizes[i]; ++c) o[c] = chosen[j++] - srcs_[i].pos0;
    }
    return outs;
  }

  // Fills gmax with the largest key of every kGroup-element group (the last may be
  // short) and returns a key at most one top-bits bin under T, the k-th largest of
  // them: still at most the k-th key, at the cost of the few more candidates of
  // that bin.
  K group_max_floor(std::vector<K>& gmax) const {
    TopBitsHistogram<K> hist;
    size_t gi = 0;
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        int64_t i = 0;
        if constexpr (kScanReader<K, decltype(rd)>) {
          // In chunks of 4 KB, each counted while the next streams in.
          constexpr int64_t kChunkGroups = 64;
          const int64_t whole = src.n / kGroup;
          for (int64_t g = 0; g < whole; g += kChunkGroups) {
            const int64_t m = std::min(kChunkGroups, whole - g);
            scan_group_max<kSignedReader<decltype(rd)>>(rd.p + g * kGroup, m, gmax.data() + gi);
            for (int64_t j = 0; j < m; ++j) hist.add(gmax[gi++]);
          }
          i = whole * kGroup;
        }
        for (; i + kGroup <= src.n; i += kGroup) {
          K keys[kGroup];
          group_keys(rd, i, keys);
          K mx = keys[0];
          for (int j = 1; j < kGroup; ++j) mx = keys[j] > mx ? keys[j] : mx;
          hist.add(mx);
          gmax[gi++] = mx;
        }
        if (i < src.n) {
          K mx = 0;
          for (; i < src.n; ++i) mx = std::max(mx, rd(i));
          hist.add(mx);
          gmax[gi++] = mx;
        }
      });
    return hist.locate(k_).first;
  }

  // Inputs of up to one block with k at most half the number of kGroup-element
  // groups (density up to about 3%), exact and without a sample: one streaming read
  // takes the largest key of every group; T, the k-th largest of those maxima, is
  // at most the k-th key (k groups each hold a key >= T), so every key >= the k-th
  // lies in a group whose maximum is >= T: about k groups, read again from the cache
  // for their keys >= T (T is taken from a histogram counted during the read, up to
  // one bin low: a few more candidates). A model's many small tensors take this path; it reads each
  // once from memory and branches once per chosen group, where a sampled threshold
  // read the tensor twice (the sample's reads each waiting on memory) and branched
  // on every group holding a candidate of a looser bound.
  std::optional<std::vector<at::Tensor>> run_group_max() const {
    int64_t groups = 0;
    for (const Source& src : srcs_) groups += (src.n + kGroup - 1) / kGroup;
    if (k_ * 2 > groups) return std::nullopt;
    std::vector<K> gmax(static_cast<size_t>(groups));
    const K t = group_max_floor(gmax);
    std::vector<K> ckey;
    std::vector<int64_t> cpos;
    ckey.reserve(size_t(2 * k_ + kGroup));
    cpos.reserve(ckey.capacity());
    size_t gi = 0;
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        int64_t i = 0;
        if constexpr (kScanReader<K, decltype(rd)>) {
          // The vector scans: the chosen groups listed without a branch, then their
          // keys >= t written by compress stores, in one call.
          const int64_t whole = src.n / kGroup;
          std::vector<int64_t> chosen(size_t(whole) + 1);
          int64_t nchosen = 0;
          for (int64_t g = 0; g < whole; ++g) {
            chosen[size_t(nchosen)] = g;
            nchosen += gmax[gi + size_t(g)] >= t;
          }
          std::vector<int64_t> pos(size_t(nchosen * kGroup + kStoreSlack));
          constexpr bool kSigned = kSignedReader<decltype(rd)>;
          const int64_t* c =
              pos.data() + scan_groups_at_least<kSigned>(rd.p, chosen.data(), nchosen,
                                                         order_greater_than<kSigned>(t), pos.data());
          for (const int64_t* q = pos.data(); q < c; ++q)
            ckey.push_back(rd(*q)), cpos.push_back(src.pos0 + *q);
          gi += size_t(whole);
          i = whole * kGroup;
        }
        for (; i < src.n; i += kGroup, ++gi) {
          if (gmax[gi] < t) continue;
          const int64_t stop = std::min(src.n, i + kGroup);
          for (int64_t e = i; e < stop; ++e) {
            const K key = rd(e);
            if (key >= t) ckey.push_back(key), cpos.push_back(src.pos0 + e);
          }
        }
      });
    return finish_candidates(ckey, cpos);
  }

  // Inputs of up to one block too dense for run_group_max, k still small against n
  // (up to about 20%): a sample bounds the k-th key from below (L, four standard
  // deviations under it), one vectorised read keeps the (key, position) pairs with
  // key >= L, and the k-th key is found among them. nullopt when not sparse enough or
  // when the sample's bound missed (fewer than k keys >= L): run_serial or the band
  // then answers.
  std::optional<std::vector<at::Tensor>> run_filter() const {
    const int64_t s = std::min(n_, std::clamp<int64_t>(n_ / 64, 256, 4096));
    const double p = double(k_) / double(n_);
    const double mean = p * double(s), sd = std::sqrt(double(s) * p * (1 - p));
    const int64_t rank_lo = int64_t(std::ceil(mean + 4 * sd + 4));
    if (rank_lo >= s / 4) return std::nullopt;  // not sparse enough to pay off
    // The rank_lo-th largest sample key: the least of the rank_lo + 1 largest.
    const K lo = largest(sample_keys(s), rank_lo + 1).front();
    if (lo == 0) return std::nullopt;
    // Candidates written through a cursor into arrays grown only when a group
    // could overflow them (push_back per element was a call and a check each).
    std::vector<K> ckey(size_t(2 * (rank_lo + 1) * (n_ / s + 1)) + kGroup);
    std::vector<int64_t> cpos(ckey.size());  // position in the concatenation, ascending
    size_t nc = 0;
    auto room = [&] {
      if (nc + kGroup > ckey.size()) ckey.resize(2 * ckey.size()), cpos.resize(ckey.size());
    };
    for (const Source& src : srcs_)
      with_reader<K>(src, [&](auto rd) {
        auto take = [&](int64_t i, K key) {
          room();
          ckey[nc] = key;
          cpos[nc++] = src.pos0 + i;
        };
        if (for_band(rd, int64_t(0), src.n, lo, std::numeric_limits<K>::max(),
                     double(rank_lo + 1) / double(s), [&](const int64_t* pos, int64_t n) {
                       for (int64_t j = 0; j < n; ++j) take(pos[j], rd(pos[j]));
                     }, take))
          return;
        int64_t i = 0;
        for (; i + kGroup <= src.n; i += kGroup) {
          K group[kGroup];
          group_keys(rd, i, group);
#if defined(__SSE2__)
          if constexpr (sizeof(K) == 4) {
            uint32_t m = mask_greater(group, lo - 1);
            if (!m) continue;
            room();
            for (; m; m &= m - 1) {
              const int j = __builtin_ctz(m);
              ckey[nc] = group[j];
              cpos[nc++] = src.pos0 + i + j;
            }
            continue;
          }
#endif
          if (!any_at_least(group, lo)) continue;
          room();
          for (int j = 0; j < kGroup; ++j)
            if (group[j] >= lo) ckey[nc] = group[j], cpos[nc++] = src.pos0 + i + j;
        }
        for (; i < src.n; ++i) {
          const K key = rd(i);
          room();
          if (key >= lo) ckey[nc] = key, cpos[nc++] = src.pos0 + i;
        }
      });
    ckey.resize(nc);
    cpos.resize(nc);
    if (int64_t(ckey.size()) < k_) return std::nullopt;
    return finish_candidates(ckey, cpos);
  }

  // The band [L, H] from a constant-stride sample (sample_keys), or nothing when the
  // sample predicts more candidates than the budget allows.
  std::optional<std::pair<K, K>> sample_band() {
    // A fixed 64K sample would cost mid-sized tensors (say 590K elements, a
    // transformer's projection) as much as their one read: scale it with n.
    const int64_t s = std::min({kSample, n_, std::max<int64_t>(kMinSample, n_ / 32)});
    std::vector<K> keys = sample_keys(s);
    const double p = double(k_) / double(n_);
    const double mean = p * double(s), sd = std::sqrt(double(s) * p * (1 - p));
    const double margin = 4 * sd + 4;
    const int64_t rank_hi = int64_t(std::floor(mean - margin));  // ranks from the top, 0-based
    const int64_t rank_lo = int64_t(std::ceil(mean + margin));
    // lo, the rank_lo-th largest sample key, is the least of the rank_lo + 1 largest,
    // kept in a min-heap: rank_lo is about 1% of the sample at k = 1%, so nearly
    // every key costs one compare with the heap's top (nth_element over the whole
    // sample mispredicted a branch per key per round). hi and the tie guess rank
    // above lo, so they are found among those few hundred keys.
    std::vector<K> top = largest(keys, std::min(rank_lo, s - 1) + 1);
    const K lo = rank_lo >= s ? K(0) : top.front();
    auto key_at = [&](int64_t rank) {  // the rank-th largest sample key, rank < top.size()
      std::nth_element(top.begin(), top.begin() + rank, top.end(), std::greater<K>());
      return top[size_t(rank)];
    };
    const K hi = rank_hi < 0 ? std::numeric_limits<K>::max() : key_at(rank_hi);
    int64_t in_band = 0;
    for (K key : keys) in_band += key >= lo && key <= hi;
    const double predicted = double(in_band) * double(n_) / double(s);
    if (predicted > double(budget_) / 2) {
      // Too wide, usually because many keys tie inside the band: the sample's
      // k-th key is then a good guess of the true one.
      tie_guess_ = key_at(std::clamp<int64_t>(int64_t(mean), 0, int64_t(top.size()) - 1));
      return std::nullopt;
    }
    return std::make_pair(lo, hi);
  }

  // One read: per block, positions with key > hi and candidates lo <= key <= hi.
  // Returns false when the candidates overflow `cap` (the pass then stops early).
  bool band_pass(K lo, K hi, int64_t cap, std::vector<BandOut<K>>& out) const {
    out.assign(blocks_.size(), BandOut<K>{});
    std::atomic<int64_t> total{0};
    std::atomic<bool> overflow{false};
    const double expect_w = double(k_) / double(n_);
    parallel_for(0, int64_t(blocks_.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        if (overflow.load(std::memory_order_relaxed)) return;
        const Block& blk = blocks_[bi];
        BandOut<K>& o = out[bi];
        // Sized once to the expected count; wn counts the winners written.
        o.win.resize(size_t(double(blk.end - blk.begin) * expect_w * 1.1) + 64);
        size_t wn = 0;
        with_reader<K>(srcs_[blk.src], [&](auto rd) {
          auto one = [&](int64_t i, K key) {
            if (key >= lo) {
              if (key > hi) {
                o.win.push_back(i);
              } else {
                o.ckey.push_back(key);
                o.cidx.push_back(i);
              }
            }
          };
          // Winners written through a cursor into o.win, sized above for the
          // expected count and grown when full. About k/n of the keys are winners,
          // and a third as many candidates.
          const bool fast = for_band(rd, blk.begin, blk.end, lo, hi, 1.4 * expect_w,
                                     [&](const int64_t* pos, int64_t n) {
            if (wn + size_t(n) > o.win.size()) o.win.resize(2 * (wn + size_t(n)));
            std::copy(pos, pos + n, o.win.data() + wn);
            wn += size_t(n);
          }, [&](int64_t i, K key) {
            o.ckey.push_back(key);
            o.cidx.push_back(i);
          });
          if (fast) {
            o.win.resize(wn);
            return;
          }
          int64_t i = blk.begin;
          for (; i + kGroup <= blk.end; i += kGroup) {
            K keys[kGroup];
            group_keys(rd, i, keys);
            if (wn + kGroup > o.win.size()) o.win.resize(2 * o.win.size() + kGroup);
            int64_t* wp = o.win.data() + wn;
#if defined(__SSE2__)
            if constexpr (sizeof(K) == 4) {
              // Bit masks of the group's winners and candidates; only set bits are
              // visited (about one per group at k = 1%).
              const uint32_t ge_lo = lo == 0 ? 0xffffu : mask_greater(keys, lo - 1);
              if (!ge_lo) continue;
              const uint32_t gt_hi = hi == std::numeric_limits<K>::max() ? 0u : mask_greater(keys, hi);
              for (uint32_t m = gt_hi; m; m &= m - 1) *wp++ = i + __builtin_ctz(m);
              for (uint32_t m = ge_lo & ~gt_hi; m; m &= m - 1) {
                const int j = __builtin_ctz(m);
                o.ckey.push_back(keys[j]);
                o.cidx.push_back(i + j);
              }
              wn = size_t(wp - o.win.data());
              continue;
            }
#endif
            if (!any_at_least(keys, lo)) continue;
            // Winners written without a branch (k may be half the input).
            for (int j = 0; j < kGroup; ++j) {
              *wp = i + j;
              wp += keys[j] > hi;
              if (keys[j] >= lo && keys[j] <= hi) {
                o.ckey.push_back(keys[j]);
                o.cidx.push_back(i + j);
              }
            }
            wn = size_t(wp - o.win.data());
          }
          o.win.resize(wn);
          for (; i < blk.end; ++i) one(i, rd(i));
        });
        if (total.fetch_add(int64_t(o.cidx.size())) + int64_t(o.cidx.size()) > cap) {
          overflow.store(true);
          return;
        }
      }
    });
    return !overflow.load();
  }

  // e* is the r-th candidate under (key desc, position asc); each block then merges
  // its winners with its chosen candidates.
  std::vector<at::Tensor> resolve_and_merge(const std::vector<BandOut<K>>& out, int64_t r) const {
    std::vector<K> keys;
    for (const BandOut<K>& o : out) keys.insert(keys.end(), o.ckey.begin(), o.ckey.end());
    const K kth = kth_largest(keys, r);
    // The candidates keyed kth are taken lowest positions first: e* is the
    // (r - #greater)-th of them in position order (blocks are in position order).
    int64_t ties = r;
    for (const BandOut<K>& o : out)
      for (K key : o.ckey) ties -= key > kth;
    Cand<K> last{kth, -1};
    for (size_t bi = 0; bi < out.size() && last.pos < 0; ++bi)
      for (size_t j = 0; j < out[bi].cidx.size(); ++j)
        if (out[bi].ckey[j] == kth && --ties == 0) {
          last.pos = gpos(blocks_[bi], out[bi].cidx[j]);
          break;
        }
    return merge(out, [&](const Block& b, K key, int64_t i) {
      return !before(last, Cand<K>{key, gpos(b, i)});
    });
  }

  // Winners plus all candidates (take_cands) or the winners alone.
  std::vector<at::Tensor> merge_all(const std::vector<BandOut<K>>& out, bool take_cands) const {
    return merge(out, [&](const Block&, K, int64_t) { return take_cands; });
  }

  template <typename Chosen>
  std::vector<at::Tensor> merge(const std::vector<BandOut<K>>& out, Chosen&& chosen) const {
    const int64_t nb = int64_t(blocks_.size());
    std::vector<int64_t> count(nb), offset(nb);
    parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        int64_t c = int64_t(out[bi].win.size());
        for (size_t j = 0; j < out[bi].cidx.size(); ++j)
          c += chosen(blocks_[bi], out[bi].ckey[j], out[bi].cidx[j]);
        count[bi] = c;
      }
    });
    std::vector<at::Tensor> outs = offsets(count, offset);
    parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        const BandOut<K>& o = out[bi];
        int64_t* dst = outs[blocks_[bi].src].data_ptr<int64_t>() + offset[bi];
        size_t w = 0;
        for (size_t j = 0; j < o.cidx.size(); ++j) {
          if (!chosen(blocks_[bi], o.ckey[j], o.cidx[j])) continue;
          while (w < o.win.size() && o.win[w] < o.cidx[j]) *dst++ = o.win[w++];
          *dst++ = o.cidx[j];
        }
        while (w < o.win.size()) *dst++ = o.win[w++];
      }
    });
    return outs;
  }

  // Output tensors sized from per-block counts; offset[b] = block b's first slot.
  std::vector<at::Tensor> offsets(const std::vector<int64_t>& count, std::vector<int64_t>& offset) const {
    std::vector<int64_t> sizes(srcs_.size(), 0);
    for (size_t bi = 0; bi < blocks_.size(); ++bi) {
      offset[bi] = sizes[blocks_[bi].src];
      sizes[blocks_[bi].src] += count[bi];
    }
    return alloc(sizes);
  }

  // Histogram of one digit, with the smallest and largest key of each bin.
  struct Hist {
    std::vector<int64_t> count;
    std::vector<K> min, max;
  };

  // Histogram of the digit of width `bits` above bit `shift`, over the keys whose
  // higher bits equal those of `prefix` (all keys when `top`). Per-thread
  // histograms, four interleaved copies each (repeated bins would otherwise
  // serialise on one counter).
  Hist histogram(K prefix, int shift, int bits, bool top) const {
    const int nbins = 1 << bits;
    const int high = shift + bits;  // bits at and above are fixed by the prefix
    const K mask = K(nbins - 1);
    Hist total{std::vector<int64_t>(nbins, 0), std::vector<K>(nbins, std::numeric_limits<K>::max()),
               std::vector<K>(nbins, K(0))};
    std::mutex mu;
    struct Bin {
      uint32_t n;
      K min, max;
    };
    // Copies kept apart by a few bins, so that equal bins of two copies do not
    // share their low 12 address bits (4K aliasing stalls the store forwarding).
    const size_t stride = size_t(nbins) + 5;
    parallel_for(0, int64_t(blocks_.size()), 1, [&](int64_t b0, int64_t b1) {
      const Bin empty{0, std::numeric_limits<K>::max(), K(0)};
      std::vector<Bin> bins(4 * stride, empty);
      std::vector<int64_t> local(nbins, 0);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const Block& blk = blocks_[bi];
        with_reader<K>(srcs_[blk.src], [&](auto rd) {
          auto add = [&](size_t copy, K key) {
            Bin& x = bins[copy * stride + size_t((key >> shift) & mask)];
            ++x.n;
            x.min = std::min(x.min, key);
            x.max = std::max(x.max, key);
          };
          int64_t i = blk.begin;
          if (top) {
            for (; i + kGroup <= blk.end; i += kGroup) {
              K keys[kGroup];
              group_keys(rd, i, keys);
              for (int j = 0; j < kGroup; ++j) add(size_t(j & 3), keys[j]);
            }
            for (; i < blk.end; ++i) add(0, rd(i));
          } else {
            const K want = prefix >> high;
            for (; i + kGroup <= blk.end; i += kGroup) {
              K keys[kGroup];
              group_keys(rd, i, keys);
              for (int j = 0; j < kGroup; ++j)
                if ((keys[j] >> high) == want) add(size_t(j & 3), keys[j]);
            }
            for (; i < blk.end; ++i) {
              const K key = rd(i);
              if ((key >> high) == want) add(0, key);
            }
          }
        });
        // 32-bit counts flushed per block (a block has < 2^32 elements)
        for (size_t c = 0; c < 4; ++c)
          for (int d = 0; d < nbins; ++d) {
            local[d] += bins[c * stride + d].n;
            bins[c * stride + d].n = 0;
          }
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int d = 0; d < nbins; ++d) {
        total.count[d] += local[d];
        for (size_t c = 0; c < 4; ++c) {
          total.min[d] = std::min(total.min[d], bins[c * stride + d].min);
          total.max[d] = std::max(total.max[d], bins[c * stride + d].max);
        }
      }
    });
    return total;
  }

  // The exact path: radix select over the digits, then a band pass over the
  // bucket of the k-th, or a count and a write pass once its key is known.
  std::vector<at::Tensor> run_radix() const {
    constexpr int kBits = int(sizeof(K) * 8);
    K prefix = 0;
    int shift = kBits;
    int64_t r = k_;  // rank of e* among the keys that share the prefix
    while (true) {
      const int bits = std::min(kDigitBits, shift);
      const int low = shift - bits;
      const Hist hist = histogram(prefix, low, bits, shift == kBits);
      int b = (1 << bits) - 1;
      int64_t above = 0;
      for (; b > 0; --b) {
        if (above + hist.count[b] >= r) break;
        above += hist.count[b];
      }
      r -= above;
      const int64_t count = hist.count[b];
      prefix |= K(b) << low;
      shift = low;
      const K lo = prefix;
      const K hi = prefix | (shift == 0 ? K(0) : (K(~K(0)) >> (kBits - shift)));
      if (count == r) return final_pass(lo, -1);  // the whole bucket is chosen
      // One key fills the bucket (ties, all-equal inputs): the k-th key is known.
      if (hist.min[b] == hist.max[b]) return final_pass(hist.min[b], r);
      if (count <= budget_) {
        std::vector<BandOut<K>> out;
        band_pass(lo, hi, std::numeric_limits<int64_t>::max(), out);
        int64_t w = 0;
        for (const auto& o : out) w += int64_t(o.win.size());
        TORCH_CHECK(w + r == k_, "incrkern.select: internal error in the radix select");
        return resolve_and_merge(out, r);
      }
      TORCH_CHECK(shift > 0, "incrkern.select: internal error in the radix select");
    }
  }

  // Two reads: per block, the keys > t and == t are counted; block b then takes
  // its keys > t and its first q_b keys == t, where the q_b add up to `ties`, lowest
  // positions first (ties < 0: every key >= t).
  struct FinalCounts {
    std::vector<int64_t> greater, equal;  // per block: keys > t, keys == t
  };

  FinalCounts final_counts(K t) const {
    const int64_t nb = int64_t(blocks_.size());
    FinalCounts c{std::vector<int64_t>(nb), std::vector<int64_t>(nb)};
    parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        const Block& blk = blocks_[bi];
        with_reader<K>(srcs_[blk.src], [&](auto rd) {
          int64_t gt = 0, eq = 0;
          int64_t i = blk.begin;
          for (; i + kGroup <= blk.end; i += kGroup) {
            K keys[kGroup];
            group_keys(rd, i, keys);
            for (int j = 0; j < kGroup; ++j) gt += keys[j] > t, eq += keys[j] == t;
          }
          for (; i < blk.end; ++i) {
            const K key = rd(i);
            gt += key > t, eq += key == t;
          }
          c.greater[bi] = gt;
          c.equal[bi] = eq;
        });
      }
    });
    return c;
  }

  std::vector<at::Tensor> final_pass(K t, int64_t ties) const {
    return final_write(t, ties, final_counts(t));
  }

  std::vector<at::Tensor> final_write(K t, int64_t ties, const FinalCounts& c) const {
    const int64_t nb = int64_t(blocks_.size());
    const std::vector<int64_t>& greater = c.greater;
    const std::vector<int64_t>& equal = c.equal;
    std::vector<int64_t> quota(nb), count(nb), offset(nb);
    int64_t left = ties < 0 ? std::numeric_limits<int64_t>::max() : ties;
    for (int64_t bi = 0; bi < nb; ++bi) {
      quota[bi] = std::min(left, equal[bi]);
      left -= quota[bi];
      count[bi] = greater[bi] + quota[bi];
    }
    std::vector<at::Tensor> outs = offsets(count, offset);
    parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        const Block& blk = blocks_[bi];
        int64_t* dst = outs[blk.src].data_ptr<int64_t>() + offset[bi];
        int64_t q = quota[bi];
        with_reader<K>(srcs_[blk.src], [&](auto rd) {
          auto one = [&](int64_t i, K key) {
            if (key > t) {
              *dst++ = i;
            } else if (key == t && q > 0) {
              *dst++ = i;
              --q;
            }
          };
          int64_t i = blk.begin;
          for (; i + kGroup <= blk.end; i += kGroup) {
            K keys[kGroup];
            group_keys(rd, i, keys);
#if defined(__SSE2__)
            if constexpr (sizeof(K) == 4) {
              // Masks: the keys > t, then the first ties while the quota lasts.
              uint32_t take = t == std::numeric_limits<K>::max() ? 0u : mask_greater(keys, t);
              if (q > 0) {
                uint32_t eq = (t == 0 ? 0xffffu : mask_greater(keys, t - 1)) & ~take;
                for (; eq && q > 0; eq &= eq - 1, --q) take |= eq & (~eq + 1);
              }
              for (; take; take &= take - 1) *dst++ = i + __builtin_ctz(take);
              continue;
            }
#endif
            if (!any_at_least(keys, t)) continue;
            for (int j = 0; j < kGroup; ++j) one(i + j, keys[j]);
          }
          for (; i < blk.end; ++i) one(i, rd(i));
        });
      }
    });
    return outs;
  }
};

// ---------------------------------------------------------------------------------
// Ops

bool needs_wide_keys(const std::vector<Source>& srcs) {
  for (const Source& s : srcs)
    if (s.score != ScoreKind::Random && (s.dtype == at::kDouble || s.res_dtype == at::kDouble))
      return true;
  return false;
}

std::vector<at::Tensor> run_group(std::vector<Source> srcs, int64_t k, bool approx) {
  if (needs_wide_keys(srcs)) return Selector<uint64_t>(std::move(srcs), k, approx).run();
  return Selector<uint32_t>(std::move(srcs), k, approx).run();
}

void check_cpu_dtype(const char* op, const char* name, size_t i, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble, op,
              ": ", name, "[", i, "] must be float32, bfloat16, float16 or float64, got ", d);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
              ", expected the CPU");
}

at::Tensor topk_cpu(const at::Tensor& x, int64_t k, bool approx) {
  check_cpu_dtype("incrkern.topk", "x", 0, x);
  TORCH_CHECK(k >= 0 && k <= x.numel(), "incrkern.topk: k must be in [0, ", x.numel(),
              "], got ", k);
  const at::Tensor xc = x.contiguous();
  Source s{ScoreKind::Signed, xc.scalar_type(), xc.data_ptr(), at::kFloat, nullptr, {}, xc.numel(), 0};
  return run_group({s}, k, approx)[0];
}

std::vector<at::Tensor> select_cpu(at::TensorList tensors, at::IntArrayRef ks, c10::string_view score,
                                   bool global_scope, bool approx, at::TensorList residuals,
                                   at::TensorList weights, int64_t seed) {
  const char* op = "incrkern.select";
  const SelectArgs a = check_select_args(op, tensors, ks, std::string(score), global_scope,
                                         residuals, weights);
  std::vector<at::Tensor> keep;  // contiguous inputs, alive until the end
  std::vector<Source> srcs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& data_t = a.score == "weight" ? weights[i] : tensors[i];
    check_cpu_dtype(op, a.score == "weight" ? "weights" : "tensors", i, data_t);
    Source s{a.kind, data_t.scalar_type(), nullptr, at::kFloat, nullptr, {}, tensors[i].numel(), 0};
    if (a.kind != ScoreKind::Random) {
      keep.push_back(data_t.contiguous());
      s.data = keep.back().data_ptr();
    }
    if (a.kind == ScoreKind::Accumulated) {
      keep.push_back(residuals[i].contiguous());
      s.res = keep.back().data_ptr();
      s.res_dtype = residuals[i].scalar_type();
    }
    s.rk = random_keys(seed, int64_t(i));
    srcs.push_back(s);
  }
  if (global_scope) {
    int64_t pos = 0;
    for (Source& s : srcs) s.pos0 = pos, pos += s.n;
    return run_group(srcs, ks[0], approx);
  }
  std::vector<at::Tensor> outs(srcs.size());
  // Small tensors side by side, one thread each; large ones one after another,
  // each over every thread.
  std::vector<int64_t> small, large;
  for (size_t i = 0; i < srcs.size(); ++i)
    (srcs[i].n <= kBlock ? small : large).push_back(int64_t(i));
  parallel_for(0, int64_t(small.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t i = small[j];
      outs[i] = run_group({srcs[i]}, ks[i], approx)[0];
    }
  });
  for (int64_t i : large) outs[i] = run_group({srcs[i]}, ks[i], approx)[0];
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("select", &select_cpu);
}

}  // namespace incrkern
