// A selection's device tables and workspace, built on the host for the CUDA select
// kernels (select_cuda_ops.cpp) and shared with the fused select-and-update
// (fused/fused_cuda_ops.cpp), which runs select_find over the same plan.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "select/select_cuda.h"
#include "select/select_keys.h"

namespace incrkern {

struct SelectInput {
  at::Tensor data;  // undefined for the random score
  at::Tensor res;   // residual for the accumulated score
  int64_t n;
  select::RandomKeys rk;
  const float* amp_scale = nullptr;  // accumulated score: r + g / *amp_scale (device)
};

struct SelectPlan {
  at::Tensor tables, work;  // device memory the launch points into
  cuda::SelectLaunch launch;
  std::vector<cuda::SelSeg> segs;  // as in the device table, one per member input
  std::vector<size_t> seg_input;   // the input of each segment
  uint8_t* extra = nullptr;        // the device copy of `extra`, if any
};

// groups[g]: the input numbers of group g (none empty), ks[g] its k. A group with
// k = 0 or k = its numel is settled before any kernel runs. `extra`: bytes copied
// to the device with the tables (16-byte aligned), for the caller's own table.
SelectPlan plan_select(const std::vector<SelectInput>& inputs, ScoreKind kind,
                       const std::vector<std::vector<size_t>>& groups,
                       const std::vector<int64_t>& ks, bool approx, const at::Device& device,
                       const std::vector<uint8_t>& extra = {});

}  // namespace incrkern
