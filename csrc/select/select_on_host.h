// The host run of the CUDA select's passes (select_on_host_cpu.cpp), which the host
// run of the fused select-and-update (fused/fused_on_host_cpu.cpp) settles its
// groups with: the launch's buffers on the host and the passes over them.
#pragma once

#include <Python.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "select/radix_digits.h"
#include "select/select_keys.h"
#include "select/select_tables.h"

namespace incrkern::host_run {

// The device buffers of one launch, on the host.
struct HostLaunch {
  cuda::SelectTables t;
  std::vector<std::vector<uint32_t>> keys;  // per input
  std::vector<unsigned long long> hist;     // per group, kSelectBins each
  std::vector<uint32_t> cand_key;           // cand_total
  std::vector<int64_t> chunk_ties, chunk_count, chunk_off;

  const cuda::SelSeg& seg(const cuda::SelChunk& c) const { return t.segs[size_t(c.seg)]; }
  uint32_t key(const cuda::SelChunk& c, int64_t i) const {
    return keys[t.seg_input[size_t(c.seg)]][size_t(i)];
  }
  cuda::SelState& state(const cuda::SelChunk& c) { return t.states[size_t(seg(c).group)]; }
  unsigned long long* group_hist(size_t g) { return hist.data() + g * cuda::kSelectBins; }
};

// The keys of n elements of gradient g (and residual r, Accumulated) as
// select_device.cuh's keys4 makes them: score_key32 (select_keys.h).
std::vector<uint32_t> keys_of(ScoreKind kind, const float* g, const float* r, float alpha,
                              size_t n);

// select_find over the tables in L.t and the keys in L.keys, its buffers sized here:
// the three levels' histograms and digits, then the ties. levels[g]:
// the digits group g took; ties[g]: whether it searched for its last tie. Throws
// where a kernel would go wrong (a walk missing its rank, candidates past their
// slots, a tie that is not there).
void settle(HostLaunch& L, std::vector<int>& levels, std::vector<bool>& ties);

// select_offsets then select_write: the chosen positions, in one flat output.
std::vector<int64_t> write_chosen(HostLaunch& L);

// The ints of the Python list `list`, the argument `name` of `op` (the host runs'
// ks). Throws when it is not a list of ints.
std::vector<int64_t> int_list_arg(PyObject* list, const char* op, const char* name);

}  // namespace incrkern::host_run
