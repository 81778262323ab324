// CUDA kernel of the accumulate family: one launch covers many tensors (see
// common/multi_tensor.cuh). Chunks whose pointers are aligned move kILP elements
// per access (16 bytes for the fp32 accumulators), the rest element by element.
// The math is csrc/common/rules.h, the same functions the CPU kernel calls.
#include "accumulate/accumulate_cuda.h"

#include "common/multi_tensor.cuh"
#include "common/rules.h"

namespace incrkern::cuda {
namespace {

constexpr int kAccumulateSlots = slots_that_fit<AccumulateTensor>(sizeof(AccumulateArgs));
using AccumulateTable = ChunkTable<AccumulateTensor, kAccumulateSlots>;

// kHasAcc / kHasSq: which accumulators the launch writes, fixed at compile time so
// the inner loop carries no per-element branch.
template <typename G, bool kHasAcc, bool kHasSq>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(const AccumulateTable table, AccumulateArgs args) {
  if (amp_skips(args.found_inf)) return;
  args.alpha = amp_fold(args.alpha, args.amp_scale);
  args.sq_alpha = amp_fold_sq(args.sq_alpha, args.amp_scale);
  int slot = 0;
  const int64_t begin = locate_chunk(table, int32_t(blockIdx.x), slot) * kChunk;
  const AccumulateTensor& t = table.slots[slot];
  const int64_t end = begin + kChunk < t.count ? begin + kChunk : t.count;
  const G* g = static_cast<const G*>(t.grad);
  float* acc = t.acc;
  float* sq = t.sq;

  int64_t scalar_begin = begin;
  if (pack_aligned(g) && pack_aligned(acc) && pack_aligned(sq)) {
    // begin is a multiple of kChunk, so every pack below stays aligned.
    const int64_t vec_end = begin + (end - begin) / kILP * kILP;
    for (int64_t i = begin + int64_t(threadIdx.x) * kILP; i < vec_end;
         i += int64_t(blockDim.x) * kILP) {
      const Pack<G> gp = load_pack(g + i);
      Pack<float> a, s;
      if constexpr (kHasAcc) a = load_pack(acc + i);
      if constexpr (kHasSq) s = load_pack(sq + i);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const float gm = to_float(gp.v[k]);
        if constexpr (kHasAcc) accumulate_rule(a.v[k], gm, args.alpha);
        if constexpr (kHasSq) accumulate_sq_rule(s.v[k], gm, args.sq_alpha, args.sq_decay);
      }
      if constexpr (kHasAcc) store_pack(acc + i, a);
      if constexpr (kHasSq) store_pack(sq + i, s);
    }
    scalar_begin = vec_end;
  }
  for (int64_t j = scalar_begin + threadIdx.x; j < end; j += blockDim.x) {
    const float gm = to_float(g[j]);
    if constexpr (kHasAcc) accumulate_rule(acc[j], gm, args.alpha);
    if constexpr (kHasSq) accumulate_sq_rule(sq[j], gm, args.sq_alpha, args.sq_decay);
  }
}

template <typename G, bool kHasAcc, bool kHasSq>
void launch_typed(const AccumulateTensor* tensors, int64_t n, const AccumulateArgs& args,
                  cudaStream_t stream) {
  for_each_launch<kAccumulateSlots>(tensors, n, kChunk,
                                    [&](const AccumulateTable& table, int blocks) {
    accumulate_kernel<G, kHasAcc, kHasSq><<<blocks, kThreads, 0, stream>>>(table, args);
    check_launch("accumulate kernel");
  });
}

template <typename G>
void launch(const AccumulateTensor* tensors, int64_t n, const AccumulateArgs& args,
            cudaStream_t stream) {
  const bool has_acc = args.has_acc, has_sq = args.has_sq;
  if (has_acc && has_sq) return launch_typed<G, true, true>(tensors, n, args, stream);
  if (has_acc) return launch_typed<G, true, false>(tensors, n, args, stream);
  if (has_sq) return launch_typed<G, false, true>(tensors, n, args, stream);
}

}  // namespace

void accumulate(const AccumulateTensor* tensors, int64_t n, DType grad_dtype,
                const AccumulateArgs& args, cudaStream_t stream) {
  if (n == 0) return;
  switch (grad_dtype) {
    case DType::Float32: return launch<float>(tensors, n, args, stream);
    case DType::BFloat16: return launch<__nv_bfloat16>(tensors, n, args, stream);
    case DType::Float16: return launch<__half>(tensors, n, args, stream);
  }
  throw std::runtime_error("incrkern: unsupported grad dtype for the CUDA accumulate");
}

}  // namespace incrkern::cuda
