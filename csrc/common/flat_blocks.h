// Several tensors' blocks as one flat list, as a selection over their concatenation
// (scope="global") walks them over every thread: tensor i holds the flat blocks
// [first[i], first[i + 1]), each of `block` elements but its last.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace incrkern {

// first[i] for count tensors of numel(i) elements, and first[count], the blocks in all.
template <typename Numel>
std::vector<int64_t> flat_block_starts(size_t count, int64_t block, Numel&& numel) {
  std::vector<int64_t> first(count + 1, 0);
  for (size_t i = 0; i < count; ++i) first[i + 1] = first[i] + (numel(i) + block - 1) / block;
  return first;
}

// fn(i, begin, bi) on the flat blocks bi in [b0, b1): tensor i's block that starts at its
// element `begin`.
template <typename Fn>
void each_flat_block(const std::vector<int64_t>& first, int64_t block, int64_t b0, int64_t b1,
                     Fn&& fn) {
  size_t i = size_t(std::upper_bound(first.begin(), first.end(), b0) - first.begin()) - 1;
  for (int64_t bi = b0; bi < b1; ++bi) {
    while (bi >= first[i + 1]) ++i;
    fn(i, (bi - first[i]) * block, bi);
  }
}

}  // namespace incrkern
