// The tables a CUDA selection runs on (its tensors, groups and chunks), built on the
// host: select_cuda_ops.cpp copies them to the device for the select and fused
// kernels, and select_on_host_cpu.cpp runs the kernels' passes over them on the
// host, so the CPU tests reach the grouping, the chunking, the candidate buffers and
// the tie search the GPU runs. Torch-free, as select_cuda.h.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/cuda_dtype.h"
#include "select/radix_digits.h"

namespace incrkern::cuda {

// Elements per block of the chunked passes. A pass keeps about one 16-byte load per
// warp in flight (its histogram atomics and warp votes sit between tiles), so the
// chunks must be small enough to give every SM several blocks: 64K-element chunks
// left an H200 with one block per SM on a 1e7 tensor.
constexpr int64_t kSelectChunk = 16384;

// One tensor of the call.
struct SelSeg {
  const void* data;      // the scored tensor (unused for Random)
  const float* res;      // residual (Accumulated), else null
  const float* amp_scale;  // Accumulated: the score is r + g / *amp_scale; null: r + g
  int64_t n;
  int64_t pos0;          // position of element 0 in its group's concatenation
  int64_t first_chunk;   // index of its first chunk in the chunk table
  int64_t nchunks;
  uint32_t kt, kt2;      // random score constants
  int32_t group;
  DType dtype;
};

struct SelChunk {
  int64_t begin, end;  // element range inside the tensor
  int32_t seg;
  int32_t pad;
};

// How a call splits into groups. Per tensor: one group for each tensor with
// 0 < k < n. In global scope: one group of the non-empty tensors when 0 < k <
// their total (ks[0]). Every other tensor is settled without a kernel.
enum class Settled : int8_t { No, Nothing, All };

struct SelectGroups {
  std::vector<std::vector<size_t>> groups;  // input numbers, in input order
  std::vector<int64_t> ks;                  // each group's k
  std::vector<Settled> settled;             // per input
};

inline SelectGroups select_groups(const std::vector<int64_t>& numels,
                                  const std::vector<int64_t>& ks, bool global_scope) {
  SelectGroups g;
  g.settled.assign(numels.size(), Settled::No);
  if (global_scope) {
    int64_t total = 0;
    for (int64_t n : numels) total += n;
    const int64_t k = ks.empty() ? 0 : ks[0];
    std::vector<size_t> members;
    for (size_t i = 0; i < numels.size(); ++i) {
      if (k == 0 || numels[i] == 0) g.settled[i] = Settled::Nothing;
      else if (k == total) g.settled[i] = Settled::All;
      else members.push_back(i);
    }
    if (!members.empty()) g.groups.push_back(members), g.ks.push_back(k);
  } else {
    for (size_t i = 0; i < numels.size(); ++i) {
      if (ks[i] == 0) g.settled[i] = Settled::Nothing;
      else if (ks[i] == numels[i]) g.settled[i] = Settled::All;
      else g.groups.push_back({i}), g.ks.push_back(ks[i]);
    }
  }
  return g;
}

// The host side of the tables: one segment per member input (group by group), its
// chunks of kSelectChunk elements, one state per group with its candidate slots.
struct SelectTables {
  std::vector<SelSeg> segs;
  std::vector<size_t> seg_input;  // the input of each segment
  std::vector<SelState> states;
  std::vector<SelChunk> chunks;
  int64_t cand_total = 0;  // candidate slots over all groups
};

// groups[g]: the input numbers of group g (none empty), ks[g] its k; numels[i] the
// size of input i. fill_seg(seg, i) sets the fields that point at input i's data.
template <typename FillSeg>
SelectTables select_tables(const std::vector<int64_t>& numels,
                           const std::vector<std::vector<size_t>>& groups,
                           const std::vector<int64_t>& ks, bool approx, FillSeg fill_seg) {
  SelectTables t;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int64_t first_chunk = int64_t(t.chunks.size());
    int64_t pos = 0;
    for (size_t i : groups[g]) {
      SelSeg s{};
      fill_seg(s, i);
      s.n = numels[i];
      s.pos0 = pos;
      s.first_chunk = int64_t(t.chunks.size());
      s.group = int32_t(g);
      for (int64_t b = 0; b < s.n; b += kSelectChunk)
        t.chunks.push_back(
            SelChunk{b, std::min(s.n, b + kSelectChunk), int32_t(t.segs.size()), 0});
      s.nchunks = int64_t(t.chunks.size()) - s.first_chunk;
      pos += s.n;
      t.segs.push_back(s);
      t.seg_input.push_back(i);
    }
    SelState st = start_state(ks[g], pos, approx);
    st.first_chunk = first_chunk;
    st.nchunks = int64_t(t.chunks.size()) - first_chunk;
    st.cand_base = t.cand_total;
    t.cand_total += st.cap;
    t.states.push_back(st);
  }
  return t;
}

}  // namespace incrkern::cuda
