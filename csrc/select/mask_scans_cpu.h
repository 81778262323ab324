// The vector scans of select_mask (select_cpu.cpp): a byte per element, set where its
// order (scan_cpu.h: |x|'s, or x's with kSigned) is above a threshold; the "random"
// score's keys of a run of elements. AVX2 (+F16C) where the CPU has it, a portable
// loop otherwise.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "select/scan_cpu.h"
#include "select/select_keys.h"

namespace incrkern::select {

template <bool kSigned, typename T>
void mark_orders_portable(const T* x, int64_t n, int32_t gt, bool* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = order_at<kSigned>(x, j) > gt;
}

// The 8 bytes (0 or 1, lowest bit first) of each 8-bit mask.
inline constexpr std::array<uint64_t, 256> kMaskBytes = [] {
  std::array<uint64_t, 256> t{};
  for (int m = 0; m < 256; ++m)
    for (int b = 0; b < 8; ++b)
      if (m >> b & 1) t[size_t(m)] |= uint64_t(1) << (8 * b);
  return t;
}();

#if defined(__x86_64__) && defined(__GNUC__)
template <bool kSigned, typename T>
__attribute__((target("avx2,f16c"))) void mark_orders_avx2(const T* x, int64_t n, int32_t gt,
                                                           bool* out) {
  const __m256i t = _mm256_set1_epi32(gt);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i above = _mm256_cmpgt_epi32(order8_avx2<T, kSigned>(x + j), t);
    const uint64_t bytes = kMaskBytes[size_t(_mm256_movemask_ps(_mm256_castsi256_ps(above)))];
    std::memcpy(out + j, &bytes, 8);
  }
  mark_orders_portable<kSigned>(x + j, n - j, gt, out + j);
}
#endif

// out[j] = order(x[j]) > gt over [0, n): x's key >= at_least with
// gt = order_greater_than<kSigned>(at_least).
template <bool kSigned, typename T>
void mark_orders(const T* x, int64_t n, int32_t gt, bool* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return mark_orders_avx2<kSigned>(x, n, gt, out);
#endif
  mark_orders_portable<kSigned>(x, n, gt, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) inline __m256i fmix8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int32_t(0x85ebca6bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(int32_t(0xc2b2ae35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// random_keys by 8 lanes, whose indices share their upper 32 bits.
__attribute__((target("avx2"))) inline void random_keys_avx2(uint32_t kt, uint32_t kt2,
                                                             int64_t i, int64_t n,
                                                             uint32_t* keys) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const auto first = uint64_t(i + j);
    if (uint32_t(first) > 0xfffffff8u) break;  // the lanes would cross a multiple of 2^32
    const __m256i low = _mm256_add_epi32(_mm256_set1_epi32(int32_t(uint32_t(first))), lanes);
    const __m256i h = fmix8(_mm256_xor_si256(low, _mm256_set1_epi32(int32_t(kt))));
    const uint32_t add = uint32_t(first >> 32) * 0x9e3779b9u + kt2;
    const __m256i key = fmix8(_mm256_add_epi32(h, _mm256_set1_epi32(int32_t(add))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + j), key);
  }
  for (; j < n; ++j) keys[j] = random_key32(kt, kt2, i + j);
}
#endif

// Over keys[0, n): returns how many are > hi, and writes at out those in [lo, hi], in
// order; returns their end. out needs room for n + 8.
inline int64_t keys_in_band_portable(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi,
                                     uint32_t*& out) {
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) {
    above += keys[j] > hi;
    *out = keys[j];
    out += keys[j] - lo <= hi - lo;
  }
  return above;
}

#if defined(__x86_64__) && defined(__GNUC__)
// Bit j set where a's lane j > b's (signed).
__attribute__((target("avx2"))) inline uint32_t gt_mask8(__m256i a, __m256i b) {
  return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a, b))));
}

// keys_in_band_portable by 8 lanes: unsigned compares as signed ones of the keys with
// their top bit flipped, the kept keys compressed by a permute from kCompress.
__attribute__((target("avx2,popcnt"))) inline int64_t keys_in_band_avx2(
    const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi, uint32_t*& out) {
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  // keys >= lo as keys > lo - 1: every key when lo is 0
  const __m256i below = _mm256_set1_epi32(int32_t((lo ^ 0x80000000u) - 1u));
  const __m256i top = _mm256_set1_epi32(int32_t(hi ^ 0x80000000u));
  int64_t above = 0, j = 0;
  uint32_t* o = out;
  for (; j + 8 <= n; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const __m256i ks = _mm256_xor_si256(k, flip);
    const uint32_t mh = gt_mask8(ks, top);
    const uint32_t mc = (lo == 0 ? 0xffu : gt_mask8(ks, below)) & ~mh;
    const __m256i lanes = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.pos[mc])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permutevar8x32_epi32(k, lanes));
    o += __builtin_popcount(mc);
    above += __builtin_popcount(mh);
  }
  out = o;
  return above + keys_in_band_portable(keys + j, n - j, lo, hi, out);
}
#endif

// keys_in_band_portable, 8 lanes at a time where the CPU has AVX2.
inline int64_t keys_in_band(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi,
                            uint32_t*& out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return keys_in_band_avx2(keys, n, lo, hi, out);
#endif
  return keys_in_band_portable(keys, n, lo, hi, out);
}

// Over keys[0, n) of elements first, first + 1, ...: appends to win the positions of
// those > hi, and to band and band_pos the keys in [lo, hi] and their positions, in
// order. Made for a narrow band at low density: a run of 8 keys that holds neither is
// passed over by one compare.
inline void list_band_portable(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi,
                               int64_t first, std::vector<int64_t>& win,
                               std::vector<uint32_t>& band, std::vector<int64_t>& band_pos) {
  for (int64_t j = 0; j < n; ++j) {
    if (keys[j] > hi) {
      win.push_back(first + j);
    } else if (keys[j] >= lo) {
      band.push_back(keys[j]);
      band_pos.push_back(first + j);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,bmi"))) inline void list_band_avx2(
    const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi, int64_t first,
    std::vector<int64_t>& win, std::vector<uint32_t>& band, std::vector<int64_t>& band_pos) {
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i below = _mm256_set1_epi32(int32_t((lo ^ 0x80000000u) - 1u));
  const __m256i top = _mm256_set1_epi32(int32_t(hi ^ 0x80000000u));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i ks = _mm256_xor_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)), flip);
    const uint32_t above = gt_mask8(ks, top);
    const uint32_t in_band = (lo == 0 ? 0xffu : gt_mask8(ks, below)) & ~above;
    if ((above | in_band) == 0) continue;
    for (uint32_t m = above; m; m &= m - 1) win.push_back(first + j + __builtin_ctz(m));
    for (uint32_t m = in_band; m; m &= m - 1) {
      const int64_t at = j + __builtin_ctz(m);
      band.push_back(keys[at]);
      band_pos.push_back(first + at);
    }
  }
  list_band_portable(keys + j, n - j, lo, hi, first + j, win, band, band_pos);
}
#endif

inline void list_band(const uint32_t* keys, int64_t n, uint32_t lo, uint32_t hi, int64_t first,
                      std::vector<int64_t>& win, std::vector<uint32_t>& band,
                      std::vector<int64_t>& band_pos) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return list_band_avx2(keys, n, lo, hi, first, win, band, band_pos);
#endif
  list_band_portable(keys, n, lo, hi, first, win, band, band_pos);
}

// out[j] = keys[j] > gt over [0, n), 8 lanes at a time where the CPU has AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) inline void mark_keys_avx2(const uint32_t* keys, int64_t n,
                                                           uint32_t gt, bool* out) {
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  const __m256i t = _mm256_set1_epi32(int32_t(gt ^ 0x80000000u));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i k = _mm256_xor_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j)), flip);
    std::memcpy(out + j, &kMaskBytes[gt_mask8(k, t)], 8);
  }
  for (; j < n; ++j) out[j] = keys[j] > gt;
}
#endif

inline void mark_keys(const uint32_t* keys, int64_t n, uint32_t gt, bool* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return mark_keys_avx2(keys, n, gt, out);
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = keys[j] > gt;
}

// keys[j] = random_key32(kt, kt2, i + j) for j in [0, n).
inline void random_keys(uint32_t kt, uint32_t kt2, int64_t i, int64_t n, uint32_t* keys) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return random_keys_avx2(kt, kt2, i, n, keys);
#endif
  for (int64_t j = 0; j < n; ++j) keys[j] = random_key32(kt, kt2, i + j);
}

}  // namespace incrkern::select
