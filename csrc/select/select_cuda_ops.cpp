// Registers the CUDA select kernels: checks the arguments (as the CPU path does),
// builds the tensor, group and chunk tables, allocates the workspace and hands raw
// pointers to select_cuda.cu. The host synchronises once, and only when an output
// size depends on the data (global scope, approximate mode): it then reads the
// per-chunk output offsets. The outputs are views of one flat int64 tensor: one
// allocation per call, and the kernel writes chunk c at its scan offset.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common/cuda_glue.h"
#include "select/select_checks.h"
#include "select/select_cuda.h"
#include "select/select_keys.h"
#include "select/select_plan.h"

namespace incrkern {
namespace {

using cuda::SelChunk;
using cuda::SelSeg;
using cuda::SelState;

using Input = SelectInput;

cuda::DType sel_dtype(const at::Tensor& t, const char* op, const char* name, size_t i) {
  const std::optional<cuda::DType> d = cuda_dtype_of(t.scalar_type());
  TORCH_CHECK(d, op, ": ", name, "[", i, "] must be float32, bfloat16 or float16 on CUDA, got ",
              t.scalar_type());
  return *d;
}

size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// Copies `bytes` of host data to a new device buffer without blocking the host
// (through pinned memory). Under CUDA graph capture the copy reads the pinned buffer
// at every replay, so it must outlive the graph, which this call cannot see: it is
// kept for the life of the process (a few KB per captured selection) rather than
// returned to the host allocator, which could hand it to other data.
at::Tensor to_device(const std::vector<uint8_t>& host, const at::Device& device) {
  at::Tensor pinned = at::empty({int64_t(host.size())},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(pinned.data_ptr(), host.data(), host.size());
  at::Tensor dev = at::empty({int64_t(host.size())}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(pinned, /*non_blocking=*/true);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    static std::mutex mutex;
    static std::vector<at::Tensor> kept_for_graphs;
    const std::lock_guard<std::mutex> lock(mutex);
    kept_for_graphs.push_back(pinned);
  }
  return dev;
}

}  // namespace

SelectPlan plan_select(const std::vector<SelectInput>& inputs, ScoreKind kind,
                       const std::vector<std::vector<size_t>>& groups,
                       const std::vector<int64_t>& ks, bool approx, const at::Device& device,
                       const std::vector<uint8_t>& extra) {
  std::vector<int64_t> numels;
  for (const Input& in : inputs) numels.push_back(in.n);
  cuda::SelectTables tables =
      cuda::select_tables(numels, groups, ks, approx, [&](SelSeg& s, size_t i) {
        const Input& in = inputs[i];
        s.data = in.data.defined() ? in.data.data_ptr() : nullptr;
        s.res = in.res.defined() ? in.res.data_ptr<float>() : nullptr;
        s.amp_scale = in.amp_scale;
        s.kt = in.rk.kt;
        s.kt2 = in.rk.kt2;
        s.dtype = in.data.defined() ? sel_dtype(in.data, "incrkern.select", "tensors", i)
                                    : cuda::DType::Float32;
      });
  SelectPlan plan;
  plan.segs = std::move(tables.segs);
  plan.seg_input = std::move(tables.seg_input);
  const std::vector<SelSeg>& segs = plan.segs;
  const std::vector<SelState>& states = tables.states;
  const std::vector<SelChunk>& chunks = tables.chunks;
  const int64_t cand_total = tables.cand_total;
  TORCH_CHECK(chunks.size() < (size_t(1) << 31), "incrkern.select: too many elements for one call");

  // Tables: [segs | states | chunks | extra], one host-to-device copy.
  const size_t seg_bytes = align16(segs.size() * sizeof(SelSeg));
  const size_t state_bytes = align16(states.size() * sizeof(SelState));
  const size_t chunk_bytes = align16(chunks.size() * sizeof(SelChunk));
  std::vector<uint8_t> host(seg_bytes + state_bytes + chunk_bytes + extra.size(), 0);
  std::memcpy(host.data(), segs.data(), segs.size() * sizeof(SelSeg));
  std::memcpy(host.data() + seg_bytes, states.data(), states.size() * sizeof(SelState));
  std::memcpy(host.data() + seg_bytes + state_bytes, chunks.data(), chunks.size() * sizeof(SelChunk));
  if (!extra.empty())
    std::memcpy(host.data() + seg_bytes + state_bytes + chunk_bytes, extra.data(), extra.size());
  plan.tables = to_device(host, device);
  uint8_t* t = plan.tables.data_ptr<uint8_t>();
  plan.extra = extra.empty() ? nullptr : t + seg_bytes + state_bytes + chunk_bytes;

  const int64_t nchunks = int64_t(chunks.size());
  const size_t scan_bytes = cuda::select_scan_temp_bytes(nchunks);
  const size_t hist_bytes = align16(sizeof(unsigned long long) * cuda::kSelectBins * states.size());
  const size_t key_bytes = align16(sizeof(uint32_t) * size_t(cand_total));
  const size_t count_bytes = align16(sizeof(int64_t) * size_t(nchunks + 1));
  plan.work = at::empty({int64_t(hist_bytes + key_bytes + 3 * count_bytes + scan_bytes)},
                        at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* w = plan.work.data_ptr<uint8_t>();

  cuda::SelectLaunch& L = plan.launch;
  L.segs = reinterpret_cast<const SelSeg*>(t);
  L.nsegs = int32_t(segs.size());
  L.kind = kind;
  L.states = reinterpret_cast<SelState*>(t + seg_bytes);
  L.ngroups = int32_t(states.size());
  L.chunks = reinterpret_cast<const SelChunk*>(t + seg_bytes + state_bytes);
  L.nchunks = nchunks;
  L.hist = reinterpret_cast<unsigned long long*>(w);
  w += hist_bytes;
  L.cand_key = reinterpret_cast<uint32_t*>(w);
  w += key_bytes;
  L.chunk_count = reinterpret_cast<int64_t*>(w);
  w += count_bytes;
  L.chunk_off = reinterpret_cast<int64_t*>(w);
  w += count_bytes;
  L.chunk_ties = reinterpret_cast<int64_t*>(w);
  w += count_bytes;
  L.scan_temp = w;
  L.scan_temp_bytes = scan_bytes;
  return plan;
}

namespace {

// groups[g]: the input numbers of group g, and ks[g] its k (0 < k < its numel).
// Returns one int64 tensor per input (undefined for inputs in no group).
std::vector<at::Tensor> run(const std::vector<Input>& inputs, ScoreKind kind,
                            const std::vector<std::vector<size_t>>& groups,
                            const std::vector<int64_t>& ks, bool approx, bool sizes_known,
                            const at::Device& device) {
  std::vector<at::Tensor> outs(inputs.size());
  if (groups.empty()) return outs;
  const SelectPlan plan = plan_select(inputs, kind, groups, ks, approx, device);
  const cuda::SelectLaunch& L = plan.launch;
  const std::vector<SelSeg>& segs = plan.segs;
  const int64_t nchunks = L.nchunks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  cuda::select_find(L, stream);
  cuda::select_offsets(L, stream);

  // Output sizes: known (k per tensor) or read back once.
  std::vector<int64_t> sizes(segs.size());
  if (sizes_known) {
    for (size_t s = 0; s < segs.size(); ++s) sizes[s] = ks[segs[s].group];
  } else {
    at::Tensor off = at::from_blob(L.chunk_off, {nchunks + 1},
                                   at::TensorOptions().dtype(at::kLong).device(device))
                         .cpu();  // the one synchronisation
    const int64_t* o = off.data_ptr<int64_t>();
    for (size_t s = 0; s < segs.size(); ++s)
      sizes[s] = o[segs[s].first_chunk + segs[s].nchunks] - o[segs[s].first_chunk];
  }
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  at::Tensor flat = at::empty({total}, at::TensorOptions().dtype(at::kLong).device(device));
  // Chunk c's positions go to flat[chunk_off[c]]: the segments' outputs follow one
  // another in table order, each sizes[s] long.
  int64_t offset = 0;
  for (size_t s = 0; s < segs.size(); ++s) {
    outs[plan.seg_input[s]] = flat.narrow(0, offset, sizes[s]);
    offset += sizes[s];
  }
  cuda::select_write(L, flat.data_ptr<int64_t>(), stream);
  return outs;
}

at::Tensor index_range(int64_t n, const at::Device& device) {
  return at::arange(n, at::TensorOptions().dtype(at::kLong).device(device));
}

at::Tensor empty_indices(const at::Device& device) {
  return at::empty({0}, at::TensorOptions().dtype(at::kLong).device(device));
}

std::vector<at::Tensor> select_impl(std::vector<Input> inputs, const std::vector<int64_t>& ks,
                                    ScoreKind kind, bool global_scope, bool approx,
                                    const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> outs(inputs.size());
  std::vector<int64_t> numels;
  for (const Input& in : inputs) numels.push_back(in.n);
  const cuda::SelectGroups g = cuda::select_groups(numels, ks, global_scope);
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (g.settled[i] == cuda::Settled::Nothing) outs[i] = empty_indices(device);
    else if (g.settled[i] == cuda::Settled::All) outs[i] = index_range(inputs[i].n, device);
  }
  const bool sizes_known = !global_scope && !approx;
  std::vector<at::Tensor> got = run(inputs, kind, g.groups, g.ks, approx, sizes_known, device);
  for (size_t i = 0; i < outs.size(); ++i)
    if (got[i].defined()) outs[i] = got[i];
  return outs;
}

at::Tensor topk_cuda(const at::Tensor& x, int64_t k, bool approx) {
  TORCH_CHECK(x.is_cuda(), "incrkern.topk: x must be a CUDA tensor");
  TORCH_CHECK(k >= 0 && k <= x.numel(), "incrkern.topk: k must be in [0, ", x.numel(), "], got ", k);
  sel_dtype(x, "incrkern.topk", "x", 0);
  Input in{x.contiguous(), at::Tensor(), x.numel(), {}};
  return select_impl({in}, {k}, ScoreKind::Signed, false, approx, x.device())[0];
}

std::vector<at::Tensor> select_cuda(at::TensorList tensors, at::IntArrayRef ks, c10::string_view score,
                                    bool global_scope, bool approx, at::TensorList residuals,
                                    at::TensorList weights, int64_t seed) {
  const char* op = "incrkern.select";
  const SelectArgs a = check_select_args(op, tensors, ks, std::string(score), global_scope,
                                         residuals, weights);
  if (tensors.empty()) return {};
  const at::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), op, ": tensors must be on a CUDA device");
  std::vector<Input> inputs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    Input in{at::Tensor(), at::Tensor(), tensors[i].numel(), select::random_keys(seed, int64_t(i))};
    if (a.kind != ScoreKind::Random) {
      const at::Tensor& d = a.score == "weight" ? weights[i] : tensors[i];
      sel_dtype(d, op, a.score == "weight" ? "weights" : "tensors", i);
      in.data = d.contiguous();
    }
    if (a.kind == ScoreKind::Accumulated) {
      TORCH_CHECK(residuals[i].scalar_type() == at::kFloat, op, ": residuals[", i,
                  "] must be float32 on CUDA");
      in.res = residuals[i].contiguous();
    }
    inputs.push_back(in);
  }
  return select_impl(std::move(inputs), std::vector<int64_t>(ks.begin(), ks.end()), a.kind,
                     global_scope, approx, device);
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CUDA, m) {
  m.impl("topk", &topk_cuda);
  m.impl("select", &select_cuda);
}

}  // namespace incrkern
