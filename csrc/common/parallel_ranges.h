// One parallel loop over the elements of every tensor of a call, for the CPU
// kernels that walk a list of tensors (update, accumulate): a list of many small
// tensors costs one fork/join, not one per tensor, and its tensors share the
// threads instead of each running alone under the grain.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "common/claims.h"

namespace incrkern {

// Work on positions [begin, end) of one tensor.
using RangeFn = std::function<void(int64_t, int64_t)>;

// Runs fns[i] over [0, counts[i]) for every i, as one parallel loop over the
// concatenated positions, claimed in runs of `grain` (common/claims.h). A run that
// spans several tensors calls each of their functions on its share.
inline void run_ranges(const std::vector<RangeFn>& fns, const std::vector<int64_t>& counts,
                       int64_t grain) {
  std::vector<int64_t> start(counts.size() + 1, 0);
  for (size_t i = 0; i < counts.size(); ++i) start[i + 1] = start[i] + counts[i];
  parallel_for_claimed(0, start.back(), grain, [&](int64_t begin, int64_t end) {
    // the last tensor starting at or before `begin` (empty tensors share starts)
    size_t i = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; begin < end; ++i) {
      const int64_t stop = std::min(end, start[i + 1]);
      if (stop > begin) fns[i](begin - start[i], stop - start[i]);
      begin = stop;
    }
  });
}

}  // namespace incrkern
