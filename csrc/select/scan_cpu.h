// CPU selection, part 1: how keys are read, and the vectorised scans over them.
//
// Readers (AbsReader, SignedReader, AccumReader, FisherReader, RandomReader) give key(i) of one
// tensor for each score; with_reader() picks the typed one for a Source. The scans
// work on tiles of kTile = 16 consecutive elements:
//  - scan_band: per tile, the positions of keys > hi ("winners") and of keys in
//    [lo, hi] ("candidates"), written by compress stores (AVX2) or a portable loop;
//    for_band() runs it over a range for any reader the vector scans serve.
//  - scan_tiles_at_least: the keys >= lo of a list of tiles.
//  - scan_keys_at_least: the indices of the 32-bit keys >= a bound (the tiles whose
//    maximum reaches it).
//  - scan_tile_max: the largest key of every tile.
// Each has an AVX2 (+F16C) form, used when the CPU has it and INCRKERN_CPU_BASELINE
// is unset (use_avx2()), and a portable form the tests compare it with.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "select/select_checks.h"
#include "select/select_keys.h"

namespace incrkern::select {

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

// |sq_decay * f + sq_alpha * g^2|: the Fisher f as accumulate_ would leave it, in
// fp32 (the fused step's Fisher is never fp64).
template <typename K, typename T>
struct FisherReader {
  const T* g;
  const float* f;
  float sq_decay, sq_alpha;
  K operator()(int64_t i) const {
    float s = f[i];
    accumulate_sq_rule(s, static_cast<float>(g[i]), sq_alpha, sq_decay);
    return abs_key<K>(s);
  }
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
  float sq_decay = 0, sq_alpha = 0;  // ScoreKind::Fisher: f's EMA (res holds f)
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
    case ScoreKind::Fisher:
      TORCH_CHECK(s.res_dtype == at::kFloat, "incrkern.select: the Fisher's EMA needs fp32");
      return with_dtype<K>(s.dtype, [&](auto t) {
        using T = decltype(t);
        fn(FisherReader<K, T>{static_cast<const T*>(s.data), static_cast<const float*>(s.res),
                              s.sq_decay, s.sq_alpha});
      });
  }
}

// Vectorised hot loops. The band pass reads keys in tiles of kTile and looks at
// a tile element by element only when one of its keys reaches the band. GCC/Clang
// vector extensions compile to SSE2 on any x86-64 (and to NEON on arm64); the
// scalar readers' branches and conversions would keep the compiler from it.
constexpr int kTile = 16;
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

// keys[0..kTile) = rd(i .. i + kTile).
template <typename K, typename Reader>
inline void tile_keys(const Reader& rd, int64_t i, K (&keys)[kTile]) {
  if constexpr (sizeof(K) == 4) {
    if constexpr (requires { rd.p; }) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(rd.p)>>;
      if constexpr (kVecDtype<T>) {
        constexpr bool is_abs = std::is_same_v<Reader, AbsReader<K, T>>;
        for (int j = 0; j < kTile; j += 4) {
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
        for (int j = 0; j < kTile; j += 4) {
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
  for (int j = 0; j < kTile; ++j) keys[j] = rd(i + j);
}

#if defined(__SSE2__)
// Bit j set when keys[j] > t (unsigned), for 32-bit keys.
inline uint32_t mask_greater(const uint32_t (&keys)[kTile], uint32_t t) {
  const __m128i flip = _mm_set1_epi32(INT32_MIN);
  const __m128i tt = _mm_set1_epi32(int32_t(t ^ 0x80000000u));
  uint32_t m = 0;
  for (int j = 0; j < kTile; j += 4) {
    const __m128i k = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + j)), flip);
    m |= uint32_t(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(k, tt)))) << j;
  }
  return m;
}
#endif

// The scans of the usual cases, |x| (a gradient, a weight) or x itself (top-k, an
// EMA of g^2) of fp32, bf16 or fp16 (not a residual sum): per tile of kTile
// elements, the bit masks of its keys >= lo and > hi, from a load, a few bit
// operations and two compares per 8 elements, and the positions of the set bits
// written out by compress stores. AVX2 where the CPU has it (checked once), scalar
// otherwise: at SSE2 width the band pass falls short of the memory bandwidth of
// two cores.
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

// The key of an order (of a tile's largest).
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

// How far ahead of itself a scan over every key requests lines (32 of them). A scan
// that works on every key fills the core's out-of-order window with that work and
// keeps few loads in flight; where the hardware prefetcher does not make up for it
// (Intel's restarts at every 4 KB page), the scan reads well below a plain read's
// speed. Measured in docs/measurements-intel.md, "Reading on the Intel machine".
constexpr int64_t kScanAheadBytes = 2048;

// Whether the scans make those requests (request_ahead): not on AMD CPUs, whose
// prefetcher kept them faster alone, except the counting pass's band_keys, which does
// the most work a line and gained from them there too (docs/measurements-amd.md, "Scans
// without requests on AMD"). INCRKERN_SCAN_AHEAD=1 or 0 decides instead.
inline bool scan_requests() {
  static const bool on = [] {
    if (const char* env = std::getenv("INCRKERN_SCAN_AHEAD")) return std::strcmp(env, "0") != 0;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return !__builtin_cpu_is("amd");
#else
    return true;
#endif
  }();
  return on;
}

[[gnu::always_inline]] inline void always_request_ahead(const void* q) {
  __builtin_prefetch(static_cast<const char*>(q) + kScanAheadBytes);
}

[[gnu::always_inline]] inline void request_ahead(const void* q) {
  if (scan_requests()) always_request_ahead(q);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The fp32 bits of 8 elements.
template <typename T>
__attribute__((target("avx2,f16c"))) inline __m256i bits8_avx2(const T* q) {
  if constexpr (std::is_same_v<T, float>)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  else if constexpr (std::is_same_v<T, c10::Half>)
    return _mm256_castps_si256(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  else
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), 16);
}

// The orders of 8 elements.
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) inline __m256i order8_avx2(const T* q) {
  const __m256i bits = bits8_avx2(q);
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
// compress-store table, so that a tile's chosen positions are written with two
// vector stores and no branch per element (a loop over the bits mispredicts
// about once per chosen element, which would dominate the band pass at k = 1%).
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

// One chunk of tiles: positions (base + offset) of the keys > hi to win, of the
// keys in [lo, hi] to cand; each needs room for 16 * tiles + kStoreSlack.
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) void band_avx2(const T* x, int64_t tiles, int32_t lo_gt,
                                                    int32_t hi_gt, int64_t base, int64_t*& win,
                                                    int64_t*& cand, bool few_hits) {
  if (few_hits) {
    // Few tiles hold a key >= lo: a branch per tile, rarely taken, costs least.
    const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
    for (int64_t gi = 0; gi < tiles; ++gi) {
      const T* q = x + gi * kTile;
      request_ahead(q);
      const __m256i a = order8_avx2<T, kSigned>(q), b = order8_avx2<T, kSigned>(q + 8);
      const uint32_t ml = gt_mask16(a, b, lo);
      if (!ml) continue;
      const uint32_t mh = gt_mask16(a, b, hi);
      win = store_positions_avx2(win, base + gi * kTile, mh);
      cand = store_positions_avx2(cand, base + gi * kTile, ml & ~mh);
    }
    return;
  }
  // Many do (k = 1% puts a candidate in about one tile in six): two loops, neither
  // with a branch that depends on the data. The first lists the tiles holding a
  // key >= lo (every tile's masks are written, the list advances only past those),
  // the second writes their positions. A branch per such tile mispredicts about
  // once per chosen element.
  constexpr int64_t kMaxTiles = 256;
  uint32_t hit_tile[kMaxTiles + 1];
  uint32_t hit_masks[kMaxTiles + 1];  // mask >= lo in the low 16 bits, > hi in the high
  const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
  for (int64_t g0 = 0; g0 < tiles; g0 += kMaxTiles) {
    const int64_t g1 = std::min(tiles, g0 + kMaxTiles);
    int64_t nh = 0;
    for (int64_t gi = g0; gi < g1; ++gi) {
      const T* q = x + gi * kTile;
      request_ahead(q);
      const __m256i a = order8_avx2<T, kSigned>(q), b = order8_avx2<T, kSigned>(q + 8);
      const uint32_t ml = gt_mask16(a, b, lo), mh = gt_mask16(a, b, hi);
      hit_tile[nh] = uint32_t(gi);
      hit_masks[nh] = ml | (mh << 16);
      nh += ml != 0;
    }
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t start = base + int64_t(hit_tile[h]) * kTile;
      const uint32_t mh = hit_masks[h] >> 16, ml = hit_masks[h] & 0xffffu;
      win = store_positions_avx2(win, start, mh);
      cand = store_positions_avx2(cand, start, ml & ~mh);
    }
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
constexpr int64_t kTilesAhead = 16;  // tiles requested ahead by tiles_at_least_avx2

template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) int64_t tiles_at_least_avx2(const T* x,
                                                                  const int64_t* tiles, int64_t n,
                                                                  int32_t lo_gt, int64_t* out) {
  const __m256i lo = _mm256_set1_epi32(lo_gt);
  int64_t* o = out;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t start = tiles[j] * kTile;
    // The listed tiles lie apart, past the hardware prefetcher's reach: each waited
    // on the cache (L3 for a tensor past L2) until requested ahead.
    if (j + kTilesAhead < n) __builtin_prefetch(x + tiles[j + kTilesAhead] * kTile);
    o = store_positions_avx2(o, start,
                             gt_mask16(order8_avx2<T, kSigned>(x + start),
                                       order8_avx2<T, kSigned>(x + start + 8), lo));
  }
  return o - out;
}

__attribute__((target("avx2,f16c"))) inline int64_t keys_at_least_avx2(const uint32_t* keys,
                                                                       int64_t n,
                                                                       uint32_t at_least,
                                                                       int64_t* out) {
  // Unsigned keys compared as signed ones, their top bits flipped.
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i gt = _mm256_set1_epi32(int32_t((at_least - 1) ^ 0x80000000u));
  const auto* k8 = reinterpret_cast<const __m256i*>(keys);
  int64_t* o = out;
  int64_t g = 0;
  for (; g + 16 <= n; g += 16, k8 += 2)
    o = store_positions_avx2(o, g,
                             gt_mask16(_mm256_xor_si256(_mm256_loadu_si256(k8), flip),
                                       _mm256_xor_si256(_mm256_loadu_si256(k8 + 1), flip), gt));
  for (; g < n; ++g) {
    *o = g;
    o += keys[g] >= at_least;
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
inline void scan_band(const T* x, int64_t tiles, int32_t lo_gt, int32_t hi_gt, int64_t base,
                      int64_t*& win, int64_t*& cand, bool few_hits) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return band_avx2<T, kSigned>(x, tiles, lo_gt, hi_gt, base, win, cand, few_hits);
#endif
  for (int64_t e = 0; e < tiles * kTile; ++e) {
    const int32_t order = order_at<kSigned>(x, e);
    *win = base + e;
    win += order > hi_gt;
    *cand = base + e;
    cand += order > lo_gt && order <= hi_gt;
  }
}

// The positions (tile * kTile + offset) of the elements whose order is > lo_gt in
// the listed tiles of x, in list order, written at out (room for 16 a tile plus
// kStoreSlack); returns their count.
template <bool kSigned, typename T>
inline int64_t scan_tiles_at_least(const T* x, const int64_t* tiles, int64_t n, int32_t lo_gt,
                                    int64_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return tiles_at_least_avx2<T, kSigned>(x, tiles, n, lo_gt, out);
#endif
  int64_t c = 0;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t e = tiles[j] * kTile; e < (tiles[j] + 1) * kTile; ++e) {
      out[c] = e;
      c += order_at<kSigned>(x, e) > lo_gt;
    }
  return c;
}

// The indices g of keys[g] >= at_least (at least 1), ascending, written at out (room
// for n plus kStoreSlack); returns their count. At 1% about one tile in six reaches
// the tile-maxima floor, a branch on each as good as random, and listed one index at a
// time the tiles took a noticeable part of a small tensor's selection.
inline int64_t scan_keys_at_least(const uint32_t* keys, int64_t n, uint32_t at_least,
                                  int64_t* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return keys_at_least_avx2(keys, n, at_least, out);
#endif
  int64_t c = 0;
  for (int64_t g = 0; g < n; ++g) {
    out[c] = g;
    c += keys[g] >= at_least;
  }
  return c;
}

// keys[g] = the largest key of tile g of x, for `tiles` whole tiles.
#if defined(__x86_64__) && defined(__GNUC__)
// The largest order of each of four tiles, whose halves' maxima are a, b, c and d:
// two rounds of interleaving and max, then the two 128-bit halves.
__attribute__((target("avx2,f16c"))) inline __m128i max_of_four(__m256i a, __m256i b, __m256i c,
                                                                __m256i d) {
  const __m256i ab = _mm256_max_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
  const __m256i cd = _mm256_max_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
  const __m256i abcd =
      _mm256_max_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
  return _mm_max_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// The lane-wise maximum of a tile's two halves' orders.
template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) inline __m256i halves_max(const T* tile) {
  return _mm256_max_epi32(order8_avx2<T, kSigned>(tile), order8_avx2<T, kSigned>(tile + 8));
}

// key_of_order of four orders.
template <bool kSigned>
__attribute__((target("avx2,f16c"))) inline __m128i keys_of_orders(__m128i order) {
  if constexpr (kSigned) return _mm_xor_si128(order, _mm_set1_epi32(INT32_MIN));
  else return _mm_slli_epi32(_mm_min_epi32(order, _mm_set1_epi32(0x7f800001)), 1);
}

template <typename T, bool kSigned>
__attribute__((target("avx2,f16c"))) void tile_max_avx2(const T* x, int64_t tiles, uint32_t* keys) {
  // Four tiles at a time: a tile's own reduction across its lanes cost as much as
  // its loads, and left fewer of the read's lines in flight.
  int64_t gi = 0;
  for (; gi + 4 <= tiles; gi += 4) {
    const T* q = x + gi * kTile;
    for (int t = 0; t < 4; ++t) request_ahead(q + t * kTile);
    const __m128i orders =
        max_of_four(halves_max<T, kSigned>(q), halves_max<T, kSigned>(q + kTile),
                    halves_max<T, kSigned>(q + 2 * kTile), halves_max<T, kSigned>(q + 3 * kTile));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(keys + gi), keys_of_orders<kSigned>(orders));
  }
  for (; gi < tiles; ++gi) {
    const T* q = x + gi * kTile;
    request_ahead(q);
    const __m256i ab = _mm256_max_epi32(order8_avx2<T, kSigned>(q), order8_avx2<T, kSigned>(q + 8));
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    keys[gi] = key_of_order<kSigned>(_mm_cvtsi128_si32(m));
  }
}
#endif

template <bool kSigned, typename T>
inline void scan_tile_max(const T* x, int64_t tiles, uint32_t* keys) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return tile_max_avx2<T, kSigned>(x, tiles, keys);
#endif
  for (int64_t gi = 0; gi < tiles; ++gi) {
    int32_t mx = INT32_MIN;
    for (int j = 0; j < kTile; ++j) mx = std::max(mx, order_at<kSigned>(x, gi * kTile + j));
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
    // Under about 3% of tiles expected to hold a key >= lo: the branchy scan.
    const bool few_hits = frac_at_least_lo * kTile < 0.03;
    constexpr bool kSigned = kSignedReader<Reader>;
    const int32_t lo_gt = order_greater_than<kSigned>(lo);
    const int32_t hi_gt = order_greater_than<kSigned>(uint64_t(hi) + 1);
    constexpr int64_t kChunkTiles = 256;  // 4K elements per scan call
    int64_t wbuf[kChunkTiles * kTile + kStoreSlack], cbuf[kChunkTiles * kTile + kStoreSlack];
    int64_t i = begin;
    while (end - i >= kTile) {
      const int64_t tiles = std::min<int64_t>(kChunkTiles, (end - i) / kTile);
      int64_t *w = wbuf, *c = cbuf;
      scan_band<kSigned>(rd.p + i, tiles, lo_gt, hi_gt, i, w, c, few_hits);
      if (w > wbuf) win(wbuf, w - wbuf);
      for (const int64_t* q = cbuf; q < c; ++q) cand(*q, rd(*q));
      i += tiles * kTile;
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

// Whether any of the tile's keys is >= lo.
template <typename K>
inline bool any_at_least(const K (&keys)[kTile], K lo) {
  if constexpr (sizeof(K) == 4) {
    if (lo == 0) return true;
    const v4i s = splat(int32_t((lo - 1) ^ 0x80000000u));
    v4i acc = splat(0);
    for (int j = 0; j < kTile; j += 4) {
      v4i k;
      std::memcpy(&k, keys + j, 16);
      acc |= (k ^ splat(INT32_MIN)) > s;
    }
    return (acc[0] | acc[1] | acc[2] | acc[3]) != 0;
  } else {
    K mx = 0;
    for (int j = 0; j < kTile; ++j) mx = mx > keys[j] ? mx : keys[j];
    return mx >= lo;
  }
}

}  // namespace incrkern::select
