// The CUDA select's histogram pass and the fused select-and-update pass, each in a
// few forms, timed alone on one tensor of fp32 gradients: which form to build into
// csrc/select/select_cuda.cu and csrc/fused/fused_cuda.cu, decided from one run of a
// few seconds rather than from a whole build per form. No torch: the keys, digits and
// the Adam rule come from csrc's host-device headers, so a form measured here counts
// and updates as the kernels do. Run by scripts/gpu_check.sh (its `passes` stage):
//
//   nvcc -O3 -std=c++17 -arch=native -I csrc bench/cuda_passes.cu -o cuda_passes
//   ./cuda_passes [n (1e7)] [repeats (21)]
//
// Histogram forms, over the same 16K-element chunks, 256-thread blocks and 16-byte
// loads as the kernel, into 2048 shared-memory bins flushed to global ones:
//   match     the kernel's increment: the warp's lanes with one bin merged by
//             __match_any_sync, their lowest lane adding the count
//   skip      match, after a vote that skips warps with nothing to count
//   plain     one shared-memory atomic per counted key (RAFT's AIR top-k)
//   uniform   one atomic for a warp whose 32 keys share a bin, else plain
//   plain2    plain into two copies of the bins (even and odd warps)
//   read      the keys read and folded, nothing counted: the pass's floor
// Each runs level 0 (every key, bits 31..21) and level 1 (the keys of the bucket
// holding the 1% largest, bits 20..10; the kernel also copies them out, not timed
// here). Every form's bins must equal match's. The gradient: z / (u + 0.05), heavy
// tailed, as scripts/profile_sparse.py's.
//
// Fused forms, the kernel's grid (16K chunks, 2 blocks each, 256 threads, 4 elements
// a thread a step) and its per-block coefficients (AdamOp::prepare):
//   kernel    as fused_cuda.cu: an element whose key exceeds the threshold updated
//   restrict  the same with __restrict__ pointers and the gradient read through the
//             read-only path (__ldg), so that loads may pass the update's stores
//   stride    restrict over one wave of blocks (as many as the SMs hold) striding
//             the whole tensor
//   count     the keys compared and counted, nothing updated: the pass's floor
// at densities 0.1, 0.01 and 0.001. Every form must update the same count.
//
// Launches: 1, 7 and 14 one-block kernels back to back (the fused step's small
// kernels), what folding them into the passes would save per launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/rules.h"
#include "select/radix_digits.h"
#include "select/select_keys.h"
#include "update/update_ops.h"

using incrkern::cuda::AdamArgs;
using incrkern::cuda::AdamOp;
using incrkern::cuda::UpdateOptions;
using incrkern::cuda::UpdateTensor;
using incrkern::select::abs_key32;

namespace {

constexpr int kThreads = 256;
constexpr int kPack = 4;
constexpr int64_t kChunk = 16384;
constexpr int kBins = incrkern::cuda::kSelectBins;
constexpr unsigned kAll = 0xffffffffu;

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
  std::exit(1);
}

// The gradient (and a param), from hashes of the index.
__device__ float hashed_uniform(uint64_t i, uint32_t salt) {
  uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ (uint64_t(salt) << 32);
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 29;
  return (float(uint32_t(x >> 40)) + 0.5f) / 16777216.f;
}

__global__ void fill_kernel(float* g, float* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float u1 = hashed_uniform(i, 1), u2 = hashed_uniform(i, 2);
    const float z = sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2);
    g[i] = z / (hashed_uniform(i, 3) + 0.05f);
    p[i] = hashed_uniform(i, 4) - 0.5f;
  }
}

// A launch that does next to nothing, as the step's digit and tie kernels nearly do.
__global__ void tiny_kernel(unsigned long long* counted) {
  if (threadIdx.x == 0 && counted[0] == 0x1234567ull) counted[0] = 0;
}

enum class Inc { Match, Skip, Plain, Uniform, Read };

template <Inc kInc>
__device__ __forceinline__ void count_key(uint32_t* sh, bool take, uint32_t bin) {
  if (kInc == Inc::Skip && !__any_sync(kAll, take)) return;
  if (kInc == Inc::Match || kInc == Inc::Skip) {
    const unsigned peers = __match_any_sync(kAll, take ? bin : kAll);
    if (take && threadIdx.x % 32 == unsigned(__ffs(peers) - 1)) atomicAdd(sh + bin, __popc(peers));
  } else if (kInc == Inc::Uniform) {
    const uint32_t first = __shfl_sync(kAll, bin, 0);
    if (__all_sync(kAll, take && bin == first)) {
      if (threadIdx.x % 32 == 0) atomicAdd(sh + bin, 32u);
    } else if (take) {
      atomicAdd(sh + bin, 1u);
    }
  } else {
    if (take) atomicAdd(sh + bin, 1u);
  }
}

// Level 0 (every key) or 1 (the keys whose bits 31..21 are prefix's), as
// hist_input_kernel counts them, into `copies` copies of the bins.
template <Inc kInc>
__global__ void __launch_bounds__(kThreads)
    hist_kernel(const float* g, int64_t n, int level, uint32_t prefix, int copies,
                unsigned long long* hist, uint32_t* folded) {
  __shared__ uint32_t sh[2 * kBins];
  const int64_t begin = blockIdx.x * kChunk, end = begin + kChunk < n ? begin + kChunk : n;
  for (int b = threadIdx.x; b < copies * kBins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  uint32_t* mine = sh + (threadIdx.x / 32 % copies) * kBins;
  const int low = incrkern::cuda::level_low(level);
  uint32_t fold = 0;
  for (int64_t tile = begin; tile < end; tile += kThreads * kPack) {
    const int64_t i = tile + int64_t(threadIdx.x) * kPack;
    float x[kPack] = {};
    if (i + kPack <= end) {
      const float4 q = *reinterpret_cast<const float4*>(g + i);
      x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    } else {
      for (int j = 0; j < kPack; ++j) x[j] = i + j < end ? g[i + j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      const uint32_t key = abs_key32(x[j]);
      const bool take = i + j < end && incrkern::cuda::in_level(key, prefix, level);
      if (kInc == Inc::Read) fold ^= take ? key : 0u;
      else count_key<kInc>(mine, take, (key >> low) & (kBins - 1));
    }
  }
  if (kInc == Inc::Read) {
    if (fold == 0x12345678u) folded[0] = fold;  // keeps the loads
    return;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    uint32_t sum = 0;
    for (int c = 0; c < copies; ++c) sum += sh[c * kBins + b];
    if (sum) atomicAdd(hist + b, static_cast<unsigned long long>(sum));
  }
}

enum class Pass { Kernel, Restrict, Stride, Count };

// The tensors' pointers, __restrict__ in every form but the kernel's own.
template <bool kRestrict>
struct Ptr {
  using F = float*;
  using CF = const float*;
};
template <>
struct Ptr<true> {
  using F = float* __restrict__;
  using CF = const float* __restrict__;
};

// The pack [i, i + kPack) of [.., end): an element is chosen where its key exceeds
// `above`. Returns how many were.
template <Pass kPass, typename F = typename Ptr<kPass != Pass::Kernel>::F,
          typename CF = typename Ptr<kPass != Pass::Kernel>::CF>
__device__ __forceinline__ int pass_pack(F p, CF g, F m, F v, int64_t i, int64_t end,
                                         uint32_t above, const AdamOp& op,
                                         const AdamOp::Coeff& c) {
  float x[kPack] = {};
  if (i + kPack <= end) {
    const float4 q = kPass == Pass::Kernel ? *reinterpret_cast<const float4*>(g + i)
                                           : __ldg(reinterpret_cast<const float4*>(g + i));
    x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
  } else {
    for (int j = 0; j < kPack; ++j) x[j] = i + j < end ? g[i + j] : 0.f;
  }
  int taken = 0;
#pragma unroll
  for (int j = 0; j < kPack; ++j) {
    if (i + j >= end || abs_key32(x[j]) <= above) continue;
    ++taken;
    if (kPass == Pass::Count) continue;
    float pm = p[i + j], mm = m[i + j], vv = v[i + j], unused = 0.f;
    op.apply(pm, x[j], mm, vv, unused, c);
    p[i + j] = pm;
    m[i + j] = mm;
    v[i + j] = vv;
  }
  return taken;
}

template <Pass kPass, typename F = typename Ptr<kPass != Pass::Kernel>::F,
          typename CF = typename Ptr<kPass != Pass::Kernel>::CF>
__global__ void __launch_bounds__(kThreads)
    fused_kernel(F p, CF g, F m, F v, int64_t n, uint32_t above, AdamOp op, UpdateTensor ut,
                 UpdateOptions opt, unsigned long long* counted) {
  const AdamOp::Coeff c = op.prepare(ut, opt);
  int taken = 0;
  if (kPass == Pass::Stride) {
    for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * kPack; i < n;
         i += int64_t(gridDim.x) * blockDim.x * kPack)
      taken += pass_pack<kPass>(p, g, m, v, i, n, above, op, c);
  } else {  // block (x, y): the y-th half of chunk x, as fused_share splits it
    const int64_t chunk = blockIdx.x * kChunk;
    const int64_t chunk_end = chunk + kChunk < n ? chunk + kChunk : n;
    const int64_t share = (chunk_end - chunk + 2 * kPack - 1) / (2 * kPack) * kPack;
    const int64_t begin = chunk + blockIdx.y * share;
    const int64_t end = begin + share < chunk_end ? begin + share : chunk_end;
    for (int64_t i = begin + int64_t(threadIdx.x) * kPack; i < end; i += kThreads * kPack)
      taken += pass_pack<kPass>(p, g, m, v, i, end, above, op, c);
  }
  if (taken) atomicAdd(counted, static_cast<unsigned long long>(taken));
}

// Median microseconds of `repeats` launches.
template <typename Launch>
float median_us(int repeats, Launch&& launch) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "event");
  check(cudaEventCreate(&b), "event");
  std::vector<float> ms;
  for (int r = 0; r < repeats + 3; ++r) {
    check(cudaEventRecord(a), "record");
    launch();
    check(cudaEventRecord(b), "record");
    check(cudaEventSynchronize(b), "sync");
    float t = 0;
    check(cudaEventElapsedTime(&t, a, b), "elapsed");
    if (r >= 3) ms.push_back(t);  // the first launches warm up
  }
  check(cudaGetLastError(), "launch");
  std::sort(ms.begin(), ms.end());
  return 1000.f * ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const auto n = int64_t(argc > 1 ? std::atof(argv[1]) : 1e7);
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 21;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "device");
  float *g, *p, *m, *v;
  unsigned long long *hist, *counted;
  uint32_t* folded;
  check(cudaMalloc(&g, n * 4), "malloc");
  check(cudaMalloc(&p, n * 4), "malloc");
  check(cudaMalloc(&m, n * 4), "malloc");
  check(cudaMalloc(&v, n * 4), "malloc");
  check(cudaMalloc(&hist, kBins * 8), "malloc");
  check(cudaMalloc(&counted, 8), "malloc");
  check(cudaMalloc(&folded, 4), "malloc");
  check(cudaMemset(m, 0, n * 4), "memset");
  check(cudaMemset(v, 0, n * 4), "memset");
  fill_kernel<<<prop.multiProcessorCount * 8, kThreads>>>(g, p, n);
  check(cudaDeviceSynchronize(), "fill");

  std::vector<float> host(size_t(n), 0.f);
  check(cudaMemcpy(host.data(), g, n * 4, cudaMemcpyDeviceToHost), "copy");
  std::vector<uint32_t> keys(host.size());
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = abs_key32(host[i]);
  const auto kth_key = [&](double density) {  // the k-th largest key; chosen: keys above it
    std::vector<uint32_t> k = keys;
    const auto at = int64_t(double(n) * density);
    std::nth_element(k.begin(), k.begin() + (n - at), k.end());
    return k[size_t(n - at)];
  };
  const double gb = double(n) * 4 / 1e9;
  std::printf("%s, %d SMs; one tensor of %lld fp32 gradients (%.1f MB), medians of %d\n\n",
              prop.name, prop.multiProcessorCount, static_cast<long long>(n), gb * 1e3,
              repeats);

  const unsigned chunks = unsigned((n + kChunk - 1) / kChunk);
  const uint32_t bucket = kth_key(0.01) >> 21 << 21;  // level 1's prefix: the 1% largest
  std::printf("| histogram form | level 0 us | GB/s | level 1 us | GB/s | bins as match's |\n");
  std::printf("|---|---|---|---|---|---|\n");
  std::vector<unsigned long long> want[2], got(kBins);
  const char* names[] = {"match", "skip", "plain", "uniform", "plain2", "read"};
  for (int form = 0; form < 6; ++form) {
    float us[2];
    bool same = true;
    for (int level = 0; level < 2; ++level) {
      const uint32_t prefix = level ? bucket : 0u;
      const auto launch = [&] {
        const auto run = [&](auto kernel, int copies) {
          kernel<<<chunks, kThreads>>>(g, n, level, prefix, copies, hist, folded);
        };
        switch (form) {
          case 0: run(hist_kernel<Inc::Match>, 1); break;
          case 1: run(hist_kernel<Inc::Skip>, 1); break;
          case 2: run(hist_kernel<Inc::Plain>, 1); break;
          case 3: run(hist_kernel<Inc::Uniform>, 1); break;
          case 4: run(hist_kernel<Inc::Plain>, 2); break;
          default: run(hist_kernel<Inc::Read>, 1);
        }
      };
      check(cudaMemset(hist, 0, kBins * 8), "memset");
      launch();
      check(cudaMemcpy(got.data(), hist, kBins * 8, cudaMemcpyDeviceToHost), "copy");
      if (form == 0) want[level] = got;
      same = same && (form == 5 || got == want[level]);
      us[level] = median_us(repeats, launch);
    }
    std::printf("| %s | %.1f | %.0f | %.1f | %.0f | %s |\n", names[form], us[0], gb / us[0] * 1e6,
                us[1], gb / us[1] * 1e6, form == 5 ? "-" : same ? "yes" : "NO");
  }

  const AdamOp op{AdamArgs{1e-3, 0.9, 0.999, 1e-8, 0.01, true, false}};
  UpdateTensor ut{};
  ut.step_value = 10.f;
  UpdateOptions opt{};
  opt.grad_scale = 1.0;
  int resident = 0;  // the stride form's grid: as many blocks as the SMs hold at once
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fused_kernel<Pass::Stride>,
                                                      kThreads, 0),
        "occupancy");
  const unsigned stride_blocks = unsigned(prop.multiProcessorCount * resident);
  std::printf("\nThe kernel's grid: %u x 2 blocks; the stride form's: %u.\n\n", chunks,
              stride_blocks);
  std::printf("| fused form | density | us | GB/s of the gradient | updated as kernel's |\n");
  std::printf("|---|---|---|---|---|\n");
  const char* passes[] = {"kernel", "restrict", "stride", "count"};
  for (const double density : {0.1, 0.01, 0.001}) {
    const uint32_t above = kth_key(density);
    unsigned long long want_count = 0;
    for (int form = 0; form < 4; ++form) {
      const auto launch = [&] {
        const auto run = [&](auto kernel, unsigned blocks, unsigned split) {
          kernel<<<dim3(blocks, split), kThreads>>>(p, g, m, v, n, above, op, ut, opt, counted);
        };
        switch (form) {
          case 0: run(fused_kernel<Pass::Kernel>, chunks, 2); break;
          case 1: run(fused_kernel<Pass::Restrict>, chunks, 2); break;
          case 2: run(fused_kernel<Pass::Stride>, stride_blocks, 1); break;
          default: run(fused_kernel<Pass::Count>, chunks, 2);
        }
      };
      unsigned long long count = 0;
      check(cudaMemset(counted, 0, 8), "memset");
      launch();
      check(cudaMemcpy(&count, counted, 8, cudaMemcpyDeviceToHost), "copy");
      if (form == 0) want_count = count;
      const float us = median_us(repeats, launch);
      std::printf("| %s | %g | %.1f | %.0f | %s (%llu) |\n", passes[form], density, us,
                  gb / us * 1e6, count == want_count ? "yes" : "NO", count);
    }
  }
  std::printf("\n| one-block launches in a row | us | us a launch |\n|---|---|---|\n");
  for (const int launches : {1, 7, 14}) {
    const float us = median_us(repeats, [&] {
      for (int l = 0; l < launches; ++l) tiny_kernel<<<1, kThreads>>>(counted);
    });
    std::printf("| %d | %.1f | %.2f |\n", launches, us, us / float(launches));
  }
  return 0;
}
