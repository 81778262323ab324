// A loop over scattered positions whose lines are requested ahead of their use.
#pragma once

#include <algorithm>
#include <cstdint>

namespace incrkern {

// Scattered positions leave a loop waiting on memory (each touches its own lines of
// p, g and state): prefetch(j + kPrefetch) runs ahead to keep those lines in flight.
// The prefetches bring lines to L2 only (prefetcht2): at 4 lines a position, requests
// into L1 fill the core's few miss buffers and stall the loop, and a prefetch for
// write does too; 64 positions ahead keeps enough lines in flight. The first
// kPrefetch are requested up front: a small tensor's few positions would otherwise
// mostly run ahead of their prefetches.
constexpr int64_t kPrefetch = 64;

// A line requested to L2. GCC takes a function that only prefetches for a pure one
// and drops its calls once they are not inlined first (as a lambda handed down two
// levels is not): the empty volatile asm keeps the request.
inline void request_line(const void* address) {
  __builtin_prefetch(address, 0, 1);
  asm volatile("");
}

// visit(j) for every j in [begin, end), after prefetch(j) and ahead of it.
template <typename Visit, typename Prefetch>
inline void prefetched(int64_t begin, int64_t end, Visit&& visit, Prefetch&& prefetch) {
  for (int64_t j = begin; j < std::min(end, begin + kPrefetch); ++j) prefetch(j);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetch < end) prefetch(j + kPrefetch);
    visit(j);
  }
}

}  // namespace incrkern
