// The vector scans of the fused CPU select-and-update (fused_cpu.cpp) over a chunk
// of |x| keys (select_keys.h), each with an AVX2 (+F16C) form and a portable one:
//  - list_tiles: the 16-element tiles holding a key above the band (winners, with
//    their lanes) and those holding one inside it (the tile lists);
//  - band_keys: the count of keys above the band and the keys inside it (the
//    threshold stream's counting pass);
//  - add_residual: error feedback's r += g, tiles it leaves unchanged not stored.
//  - add_fisher: select="grad_sq"'s f = sq_decay * f + sq_alpha * g^2.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/rules.h"
#include "select/scan_cpu.h"

namespace incrkern::fused {

using namespace incrkern::select;

// The band scans over whole tiles of x (|x| keys, select_keys.h): a key is a winner
// when its order is > hi_gt (key > H), a candidate when > lo_gt but not a winner.

// Lists of the tiles of a chunk holding a winner (first element, winner lanes) and
// of those holding a candidate (first element, candidate lanes); w counts winners.
struct TileLists {
  int64_t* wstart;
  uint32_t* wmask;
  int64_t nw;
  int64_t* cstart;
  uint32_t* cmask;
  int64_t nc;
  int64_t w;
};

// Appends the tiles of x[0, 16 * tiles) (x's first element at position base) to the
// lists, without a branch that depends on the data; few_hits: with a branch per
// tile that holds no key >= L, cheaper when nearly none does (a template parameter:
// tested per tile, gcc branched on the mask first). masks(e) gives the lanes above L
// and above H (16 bits each) of the tile at x + e. The cursors are locals: through
// the struct, every store would reload them.
template <bool kFewHits, typename Masks>
[[gnu::always_inline]] inline void list_tiles_by(int64_t tiles, int64_t base, TileLists& l,
                                                 Masks&& masks) {
  int64_t* const wstart = l.wstart;
  uint32_t* const wmask = l.wmask;
  int64_t* const cstart = l.cstart;
  uint32_t* const cmask = l.cmask;
  int64_t nw = l.nw, nc = l.nc, w = l.w;
  for (int64_t t = 0; t < tiles; ++t) {
    const auto [ml, mh] = masks(t * kTile);
    if (kFewHits && !ml) continue;
    const uint32_t mc = ml & ~mh;
    wstart[nw] = cstart[nc] = base + t * kTile;
    wmask[nw] = mh;
    cmask[nc] = mc;
    nw += mh != 0;
    nc += mc != 0;
    w += __builtin_popcount(mh);
  }
  l.nw = nw, l.nc = nc, l.w = w;
}

struct LaneMasks {
  uint32_t above_lo, above_hi;
};

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,f16c,popcnt"))) void list_tiles_avx2(const T* x, int64_t tiles,
                                                                 int32_t lo_gt, int32_t hi_gt,
                                                                 int64_t base, TileLists& l,
                                                                 bool few_hits) {
  const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
  auto masks = [&](int64_t e) __attribute__((target("avx2,f16c"))) {
    request_ahead(x + e);
    const __m256i a = order8_avx2<T, false>(x + e), b = order8_avx2<T, false>(x + e + 8);
    return LaneMasks{gt_mask16(a, b, lo), gt_mask16(a, b, hi)};
  };
  if (few_hits) list_tiles_by<true>(tiles, base, l, masks);
  else list_tiles_by<false>(tiles, base, l, masks);
}

#endif

template <typename T>
void list_tiles(const T* x, int64_t tiles, int32_t lo_gt, int32_t hi_gt, int64_t base,
                TileLists& l, bool few_hits) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return list_tiles_avx2<T>(x, tiles, lo_gt, hi_gt, base, l, few_hits);
#endif
  (void)few_hits;  // the portable loop lists every tile
  list_tiles_by<false>(tiles, base, l, [&](int64_t e) {
    LaneMasks m{0, 0};
    for (int j = 0; j < kTile; ++j) {
      const int32_t order = order_at<false>(x, e + j);
      m.above_lo |= uint32_t(order > lo_gt) << j;
      m.above_hi |= uint32_t(order > hi_gt) << j;
    }
    return m;
  });
}

// Over x[0, n): returns the count of orders > hi_gt, and writes at out the keys of
// those > lo_gt but not > hi_gt, in order; returns their end. out needs room for n + 8.
// kSigned: x's own order (select_mask's "grad_sq"), not |x|'s.
template <typename T, bool kSigned = false>
int64_t band_keys_portable(const T* x, int64_t n, int32_t lo_gt, int32_t hi_gt, uint32_t*& out) {
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t order = order_at<kSigned>(x, j);
    above += order > hi_gt;
    *out = key_of_order<kSigned>(order);
    out += order > lo_gt && order <= hi_gt;
  }
  return above;
}

#if defined(__x86_64__) && defined(__GNUC__)
// band_keys_portable by 8 lanes: the keys compressed by a permute from kCompress.
template <typename T, bool kSigned = false>
__attribute__((target("avx2,f16c,popcnt"))) int64_t band_keys_avx2(const T* x, int64_t n,
                                                                  int32_t lo_gt, int32_t hi_gt,
                                                                  uint32_t*& out) {
  const __m256i lo = _mm256_set1_epi32(lo_gt), hi = _mm256_set1_epi32(hi_gt);
  const __m256i nan = _mm256_set1_epi32(0x7f800001);
  int64_t above = 0, j = 0;
  uint32_t* o = out;
  for (; j + 8 <= n; j += 8) {
    always_request_ahead(x + j);
    const __m256i order = order8_avx2<T, kSigned>(x + j);
    const uint32_t mh = uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(order, hi))));
    const uint32_t ml = uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(order, lo))));
    const uint32_t mc = ml & ~mh;
    const __m256i keys =
        kSigned ? _mm256_xor_si256(order, _mm256_set1_epi32(INT32_MIN))
                : _mm256_slli_epi32(_mm256_min_epi32(order, nan), 1);
    const __m256i lanes = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.pos[mc])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permutevar8x32_epi32(keys, lanes));
    o += __builtin_popcount(mc);
    above += __builtin_popcount(mh);
  }
  out = o;
  return above + band_keys_portable<T, kSigned>(x + j, n - j, lo_gt, hi_gt, out);
}
#endif

// r = r + alpha * g over [0, n), as accumulate_ computes it. The vector form (fp32
// residuals) leaves a 16-element tile unstored where the sum equals r bit for bit (g
// zero there, as in an embedding's rows that the batch did not use): a line not
// written is not written back to memory.
template <typename T, typename M>
void add_residual_portable(M* r, const T* g, M alpha, int64_t n) {
  for (int64_t j = 0; j < n; ++j) accumulate_rule(r[j], M(g[j]), alpha);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,f16c"))) void add_residual_avx2(float* r, const T* g, float alpha,
                                                           int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + kTile <= n; j += kTile) {
    const __m256 r0 = _mm256_loadu_ps(r + j), r1 = _mm256_loadu_ps(r + j + 8);
    __m256 u0 = r0, u1 = r1;
    accumulate_rule(u0, _mm256_castsi256_ps(bits8_avx2(g + j)), a);
    accumulate_rule(u1, _mm256_castsi256_ps(bits8_avx2(g + j + 8)), a);
    const __m256i changed =
        _mm256_or_si256(_mm256_xor_si256(_mm256_castps_si256(u0), _mm256_castps_si256(r0)),
                        _mm256_xor_si256(_mm256_castps_si256(u1), _mm256_castps_si256(r1)));
    if (_mm256_testz_si256(changed, changed)) continue;
    _mm256_storeu_ps(r + j, u0);
    _mm256_storeu_ps(r + j + 8, u1);
  }
  add_residual_portable(r + j, g + j, alpha, n - j);
}
#endif

template <typename T, typename M>
void add_residual(M* r, const T* g, M alpha, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<M, float>)
    if (use_avx2()) return add_residual_avx2(r, g, alpha, n);
#endif
  add_residual_portable(r, g, alpha, n);
}

// f = sq_decay * f + sq_alpha * g^2 over [0, n), as accumulate_ computes it.
template <typename T, typename M>
void add_fisher_portable(M* f, const T* g, M sq_alpha, M sq_decay, int64_t n) {
  for (int64_t j = 0; j < n; ++j) accumulate_sq_rule(f[j], M(g[j]), sq_alpha, sq_decay);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2,f16c"))) void add_fisher_avx2(float* f, const T* g, float sq_alpha,
                                                         float sq_decay, int64_t n) {
  const __m256 a = _mm256_set1_ps(sq_alpha), d = _mm256_set1_ps(sq_decay);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 s = _mm256_loadu_ps(f + j);
    accumulate_sq_rule(s, _mm256_castsi256_ps(bits8_avx2(g + j)), a, d);
    _mm256_storeu_ps(f + j, s);
  }
  add_fisher_portable(f + j, g + j, sq_alpha, sq_decay, n - j);
}
#endif

template <typename T, typename M>
void add_fisher(M* f, const T* g, M sq_alpha, M sq_decay, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<M, float>)
    if (use_avx2()) return add_fisher_avx2(f, g, sq_alpha, sq_decay, n);
#endif
  add_fisher_portable(f, g, sq_alpha, sq_decay, n);
}

template <typename T, bool kSigned = false>
int64_t band_keys(const T* x, int64_t n, int32_t lo_gt, int32_t hi_gt, uint32_t*& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return band_keys_avx2<T, kSigned>(x, n, lo_gt, hi_gt, out);
#endif
  return band_keys_portable<T, kSigned>(x, n, lo_gt, hi_gt, out);
}

}  // namespace incrkern::fused
