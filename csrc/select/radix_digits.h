// The digit logic of the CUDA radix select (select/select_cuda.cu) and of the fused
// select-and-update built on it: a group's selection state, how each 11-bit digit of
// the k-th key is found in a histogram and settles the state, and the predicate the
// settled state gives every element. The kernels run it on the device; the host runs
// the same functions over the same keys and tables (select_on_host_cpu.cpp), so the
// CPU tests hold this logic to the reference where no GPU is.
//
//  level 0  bits 31..21 of every key
//  level 1  bits 20..10 of the keys that share the k-th's bits 31..21
//  level 2  bits 9..0 of the keys that share its bits 31..10   -> the k-th key T
//  ties     when T is shared beyond the k-th: the position of the last tie taken
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/hd.h"

namespace incrkern::cuda {

constexpr int kSelectBins = 2048;  // 11-bit digits: bits 31..21, 20..10, 9..0
constexpr int64_t kNoPos = INT64_MAX;

// The selection state of one group (one tensor, or the whole list in global
// scope), kept in device memory and advanced by the kernels: the host never
// reads it, so nothing waits.
struct SelState {
  int64_t k, n;            // set by the host
  int64_t cap;             // candidate buffer capacity of the group: the level-1
                           // pass buffers its keys only when they fit
  int64_t cand_base;       // its first slot in the candidate buffers
  int64_t tol;             // approximate mode: accepted |count - k|; -1: exact
  int64_t first_chunk, nchunks;
  // advanced by the kernels
  int64_t r;               // rank of the k-th among the keys sharing `prefix`
  int64_t count;           // keys sharing `prefix`
  int64_t cand_count;      // keys buffered so far (blocks reserve slabs of it)
  int64_t last_pos;        // predicate: key > T or (key == T and position <= last_pos)
  uint32_t prefix;
  int32_t shift;           // low bits not yet fixed (32, 21, 10, 0)
  uint32_t threshold;      // T
  int32_t done;            // predicate final
  int32_t use_cands;       // the candidates of the last two passes are buffered
  int32_t pad;
};

// Digit layout of level 0, 1, 2: its low bit and its width.
IK_HD int level_low(int level) { return level == 0 ? 21 : level == 1 ? 10 : 0; }
IK_HD int level_bits(int level) { return level == 2 ? 10 : 11; }

// Whether `key` is counted by the histogram of `level`: it shares the digits above
// that level's with the state's prefix.
IK_HD bool in_level(uint32_t key, uint32_t prefix, int level) {
  const int high = level_low(level) + level_bits(level);
  return level == 0 || (key >> high) == (prefix >> high);
}

// The state of a group of n keys choosing k, before any histogram (the host's);
// tol >= 0 in approximate mode. k = 0 and k = n are settled at once.
inline SelState start_state(int64_t k, int64_t n, bool approx) {
  SelState st{};
  st.k = k;
  st.n = n;
  st.cap = std::min(n, std::max<int64_t>(n / 16, int64_t(1) << 16));
  st.tol = approx ? std::max<int64_t>(1, k / 100) : -1;
  st.r = k;
  st.count = n;
  st.shift = 32;
  if (k == 0) {  // nothing chosen
    st.done = 1;
    st.threshold = UINT32_MAX;
    st.last_pos = -1;
  } else if (k == n) {  // everything chosen
    st.done = 1;
    st.threshold = 0;
    st.last_pos = kNoPos;
  }
  return st;
}

// Walks bins top, top - 1, ..., top - count + 1 of a histogram, `before` keys
// counted above them, to the bin holding the r-th key from the top (1-based):
// returns it, with `before` raised by the keys of the bins above it. Returns the
// last bin walked when the r-th lies further down.
IK_HD int walk_bins(const unsigned long long* hist, int top, int count, unsigned long long r,
                    unsigned long long& before) {
  int b = top;
  for (int j = 0; j < count; ++j, --b) {
    if (before + hist[b] >= r) return b;
    before += hist[b];
  }
  return b + 1;
}

// Settles a group after the histogram of `level`: `bin` holds its k-th, `above`
// keys of its prefix lie in higher bins and `in_bin` in that one. The bucket is
// chosen whole when the k-th is its last key; at level 2 the k-th key is known (its
// ties are located by position next). In approximate mode the selection stops at
// the bucket's boundary when taking the bucket whole, or leaving it out, misses k by
// at most tol. Taking it whole chooses keys up to a bucket's width below the k-th:
// after level 1 (22 bits) 2^-14 of the value, within the value tolerance ops.py
// promises; after level 0 (11 bits) an eighth, so there only leaving it out (every
// key chosen above the k-th) qualifies.
IK_HD void settle_digit(SelState& st, uint32_t bin, int64_t above, int64_t in_bin, int level) {
  const int low = level_low(level);
  st.r -= above;
  st.count = in_bin;
  st.prefix |= bin << low;
  st.shift = low;
  if (level == 0) st.use_cands = st.count <= st.cap;
  if (st.count == st.r) {  // the whole bucket is chosen
    st.done = 1;
    st.threshold = st.prefix;
    st.last_pos = kNoPos;
  } else if (low == 0) {  // the k-th key; ties resolved by position next
    st.threshold = st.prefix;
  } else if (st.tol >= 0) {
    const int64_t without = st.k - st.r, with = without + st.count;
    const int64_t miss_with = with - st.k, miss_without = st.k - without;
    if (level > 0 && miss_with <= st.tol && miss_with <= miss_without) {
      st.done = 1;
      st.threshold = st.prefix;
      st.last_pos = kNoPos;
    } else if (miss_without <= st.tol && without > 0) {
      st.done = 1;
      st.threshold = st.prefix | ((1u << low) - 1u);
      st.last_pos = -1;
    }
  }
}

// Whether a settled state chooses the element of `key` at position `pos`.
IK_HD bool chosen(const SelState& st, uint32_t key, int64_t pos) {
  return key > st.threshold || (key == st.threshold && pos <= st.last_pos);
}

}  // namespace incrkern::cuda
