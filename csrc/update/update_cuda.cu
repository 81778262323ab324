// CUDA kernels of the update family: one launch covers many tensors (see
// common/multi_tensor.cuh). Dense chunks whose pointers are aligned move kILP
// elements per access; indexed, masked or unaligned ones go element by element.
// The math is csrc/common/rules.h, the same functions the CPU kernels call.
//
// Indexed tensors are cut into kIndexedChunk positions per block, not kChunk: a
// position costs a scattered access (a 32-byte sector per array) rather than a
// share of a stream, so a block's chunk can be small, and 1e6 positions spread
// over ~250 blocks instead of 16, enough to fill a GPU.
#include "update/update_cuda.h"

#include "common/multi_tensor.cuh"
#include "update/update_ops.h"

namespace incrkern::cuda {
namespace {

constexpr int64_t kIndexedChunk = 4096;

// The kernel's arguments besides the table: the larger Op (AdamArgs), the options
// and the chunk length.
constexpr int kUpdateSlots =
    slots_that_fit<UpdateTensor>(sizeof(AdamArgs) + sizeof(UpdateOptions) + sizeof(int64_t));
using UpdateTable = ChunkTable<UpdateTensor, kUpdateSlots>;

template <typename T, typename G, typename Op>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const UpdateTable table, const Op op, const UpdateOptions opt,
                  const int64_t chunk) {
  if (skipped(opt)) return;
  int slot = 0;
  const int64_t begin = locate_chunk(table, int32_t(blockIdx.x), slot) * chunk;
  const UpdateTensor& t = table.slots[slot];
  const int64_t end = min(t.count, begin + chunk);
  const auto c = op.prepare(t, opt);
  T* p = static_cast<T*>(t.param);
  G* g = static_cast<G*>(t.grad);
  float* m1 = opt.has_first_moment ? t.first_moment : nullptr;
  float* m2 = opt.has_second_moment ? t.second_moment : nullptr;
  float* m2max = opt.has_max_second_moment ? t.max_second_moment : nullptr;
  const float scale = grad_factor(opt);

  int64_t scalar_begin = begin;
  const bool dense = !opt.has_indices && !opt.has_mask && !opt.has_age;
  if (dense && pack_aligned(p) && pack_aligned(g) && pack_aligned(m1) && pack_aligned(m2) &&
      pack_aligned(m2max)) {
    // begin is a multiple of the chunk (a multiple of kILP), so every pack below
    // stays aligned.
    const int64_t vec_end = begin + (end - begin) / kILP * kILP;
    for (int64_t i = begin + int64_t(threadIdx.x) * kILP; i < vec_end;
         i += int64_t(blockDim.x) * kILP) {
      Pack<T> pp = load_pack(p + i);
      Pack<G> gp = load_pack(g + i);
      Pack<float> m{}, v{}, vmax{};
      if (m1) m = load_pack(m1 + i);
      if (m2) v = load_pack(m2 + i);
      if (m2max) vmax = load_pack(m2max + i);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        float pm = to_float(pp.v[k]);
        op.apply(pm, to_float(gp.v[k]) * scale, m.v[k], v.v[k], vmax.v[k], c);
        pp.v[k] = from_float<T>(pm);
        gp.v[k] = from_float<G>(0.f);
      }
      store_pack(p + i, pp);
      if (opt.consume_grad) store_pack(g + i, gp);
      if (m1) store_pack(m1 + i, m);
      if (m2) store_pack(m2 + i, v);
      if (m2max) store_pack(m2max + i, vmax);
    }
    scalar_begin = vec_end;
  }
  for (int64_t j = scalar_begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t e = opt.has_indices ? t.indices[j] : j;
    if (opt.has_mask && !t.mask[e]) continue;
    const int64_t s = opt.compact_state ? j : e;
    float pm = to_float(p[e]);
    const float gm = to_float(g[e]) * scale;
    if (opt.consume_grad) g[e] = from_float<G>(0.f);
    float m = m1 ? m1[s] : 0.f, v = m2 ? m2[s] : 0.f, vmax = m2max ? m2max[s] : 0.f;
    if (opt.has_age) op.apply_aged(pm, gm, m, v, vmax, t.age + s, c);
    else op.apply(pm, gm, m, v, vmax, c);
    p[e] = from_float<T>(pm);
    if (m1) m1[s] = m;
    if (m2) m2[s] = v;
    if (m2max) m2max[s] = vmax;
  }
}

template <typename T, typename G, typename Op>
void launch_typed(const UpdateTensor* tensors, int64_t n, const UpdateOptions& opt,
                  const Op& op, cudaStream_t stream) {
  const int64_t chunk = opt.has_indices ? kIndexedChunk : kChunk;
  for_each_launch<kUpdateSlots>(tensors, n, chunk, [&](const UpdateTable& table, int blocks) {
    update_kernel<T, G, Op><<<blocks, kThreads, 0, stream>>>(table, op, opt, chunk);
    check_launch("update kernel");
  });
}

template <typename Op>
void launch(const UpdateTensor* tensors, int64_t n, const UpdateOptions& opt, const Op& op,
            cudaStream_t stream) {
  switch (opt.param_dtype) {
    case DType::Float32:
      return launch_typed<float, float>(tensors, n, opt, op, stream);
    case DType::BFloat16:
      return opt.grad_is_fp32
                 ? launch_typed<__nv_bfloat16, float>(tensors, n, opt, op, stream)
                 : launch_typed<__nv_bfloat16, __nv_bfloat16>(tensors, n, opt, op, stream);
    case DType::Float16:
      return opt.grad_is_fp32 ? launch_typed<__half, float>(tensors, n, opt, op, stream)
                              : launch_typed<__half, __half>(tensors, n, opt, op, stream);
  }
  throw std::runtime_error("incrkern: unsupported param dtype for the CUDA update");
}

}  // namespace

void adam_update(const UpdateTensor* tensors, int64_t n, const UpdateOptions& options,
                 const AdamArgs& args, cudaStream_t stream) {
  launch(tensors, n, options, AdamOp{args}, stream);
}

void sgd_update(const UpdateTensor* tensors, int64_t n, const UpdateOptions& options,
                const SgdArgs& args, cudaStream_t stream) {
  launch(tensors, n, options, SgdOp{args}, stream);
}

}  // namespace incrkern::cuda
