// The CUDA fused select-and-update: after select_find (select/select_cuda.cu) has
// settled every tensor's predicate on the device, one pass over the scores applies
// the Adam (or SGD) update where it holds. Against select then update it saves the count
// pass, the scan, the compaction pass, the positions' memory and the indexed
// update's second read of the scores, and the host never waits.
//
// The split of a chunk over blocks and the step over an element's score, update and
// residual are fused_pass.h's, which the host run (fused_on_host_cpu.cpp) replays;
// the keys and the predicate are select_device.cuh's and the update is
// update_ops.h's AdamOp or SgdOp, so an element is chosen and updated bit for bit as
// select then adam_update_ (sgd_update_) would do it.
#include "fused/fused_cuda.h"

#include "common/cuda_utils.cuh"
#include "fused/fused_pass.h"
#include "select/select_device.cuh"
#include "update/update_ops.h"

namespace incrkern::cuda {
namespace {

// The chosen elements of tensor f in [begin, end): updated in place; with a residual
// r is written everywhere (0 where chosen, r + g elsewhere). Returns how many this
// thread updated.
template <typename T, typename Op>
__device__ int apply_range(const SelSeg& s, const SelState& st, const FusedTensor& f,
                           const Op& op, const typename Op::Coeff& c,
                           const FusedScales& scales, int64_t begin, int64_t end) {
  T* p = static_cast<T*>(f.update.param);
  const T* g = static_cast<const T*>(f.update.grad);
  float* r = f.residual;
  int taken = 0;
  for (int64_t i = begin + int64_t(threadIdx.x) * kILP; i < end;
       i += int64_t(blockDim.x) * kILP) {
    const int valid = int(imin(kILP, end - i));
    float u[kILP], kept[kILP] = {};
    load_floats(g + i, valid, u);
    if (r) load_floats(r + i, valid, kept);
    taken += fused_elements(
        st, s.pos0 + i, valid, r != nullptr, scales, u, kept, [&](int j, float scaled) {
          fused_update(f, p, op, c, i + j, scaled, [](T x) { return to_float(x); },
                       [](float x) { return from_float<T>(x); });
        });
    if (r) {
      if (valid == kILP && pack_aligned(r + i)) {
        Pack<float> out;
#pragma unroll
        for (int j = 0; j < kILP; ++j) out.v[j] = kept[j];
        store_pack(r + i, out);
      } else {
        for (int j = 0; j < valid; ++j) r[i + j] = kept[j];
      }
    }
  }
  return taken;
}

// Grid (chunks, kFusedSplit): block (x, y) takes the y-th share of chunk x.
template <typename Op>
__global__ void __launch_bounds__(kFusedThreads)
    fused_kernel(const SelectLaunch L, const FusedTensor* tensors, const Op op,
                 const UpdateOptions opt, unsigned long long* counts) {
  __shared__ int block_taken;
  const SelChunk ch = L.chunks[blockIdx.x];
  int64_t begin, end;
  fused_share(ch.begin, ch.end, int(blockIdx.y), kILP, begin, end);
  if (begin >= end || skipped(opt)) return;  // uniform across the block
  if (threadIdx.x == 0) block_taken = 0;
  __syncthreads();
  const SelSeg s = L.segs[ch.seg];
  const SelState st = L.states[s.group];
  const FusedTensor& f = tensors[ch.seg];
  const typename Op::Coeff c = op.prepare(f.update, opt);
  const FusedScales scales = fused_scales(f.residual != nullptr, opt, s.amp_scale);
  int taken = 0;
  switch (s.dtype) {
    case DType::Float32:
      taken = apply_range<float>(s, st, f, op, c, scales, begin, end);
      break;
    case DType::BFloat16:
      taken = apply_range<__nv_bfloat16>(s, st, f, op, c, scales, begin, end);
      break;
    case DType::Float16:
      taken = apply_range<__half>(s, st, f, op, c, scales, begin, end);
      break;
  }
  if (taken) atomicAdd(&block_taken, taken);
  __syncthreads();
  if (threadIdx.x == 0 && block_taken)
    atomicAdd(counts + f.index, static_cast<unsigned long long>(block_taken));
}

template <typename Op>
void launch_fused(const SelectLaunch& L, const FusedTensor* tensors,
                  const UpdateOptions& options, const Op& op, unsigned long long* counts,
                  cudaStream_t stream) {
  if (L.nchunks == 0) return;
  const dim3 grid(unsigned(L.nchunks), kFusedSplit);
  fused_kernel<Op><<<grid, kFusedThreads, 0, stream>>>(L, tensors, op, options, counts);
  check_launch("fused select-and-update kernel");
}

}  // namespace

void fused_adam_apply(const SelectLaunch& L, const FusedTensor* tensors,
                      const UpdateOptions& options, const AdamArgs& args,
                      unsigned long long* counts, cudaStream_t stream) {
  launch_fused(L, tensors, options, AdamOp{args}, counts, stream);
}

void fused_sgd_apply(const SelectLaunch& L, const FusedTensor* tensors,
                     const UpdateOptions& options, const SgdArgs& args,
                     unsigned long long* counts, cudaStream_t stream) {
  launch_fused(L, tensors, options, SgdOp{args}, counts, stream);
}

}  // namespace incrkern::cuda
