// CUDA kernels of the select family: radix select over the 32-bit keys of
// select/select_keys.h, after the AIR top-k design (RAFT's radix select_k).
//
//  pass 0  histogram of bits 31..21 of every key           -> digit 0 of the k-th
//  pass 1  histogram of bits 20..10 of the keys in that bucket; when the bucket
//          fits the group's buffer, its keys are copied out (pass 2 needs no
//          positions: ties are located over the input)
//  pass 2  histogram of bits 9..0, over the buffered candidates (or, when the
//          bucket was too large, over the input again)        -> the k-th key T
//  ties    only when T is shared beyond the k-th: per-chunk counts of T locate the
//          position of the last tie taken
//  output  per-chunk counts of the chosen, an exclusive scan, and an
//          order-preserving compaction (block scans) into one flat output
//          (select_offsets, select_write); the fused select-and-update
//          (fused/fused_cuda.cu) stops after the ties and updates in place instead.
// A small kernel after each histogram scans the 2048 bins for the digit of the
// k-th and settles the group early when its bucket is chosen whole, or, in
// approximate mode, when the boundary bucket's count is within the tolerance
// (after pass 0 by leaving it out, after pass 1 either way). Every group (a
// tensor, or the whole list in global scope) keeps its state in device memory,
// so one launch sequence covers many tensors and the host never waits. Chunks of
// kSelectChunk elements, 16-byte loads where aligned, 64-bit positions.
//
// Contention: a warp's equal bins are merged before the shared-memory atomic
// (__match_any_sync), so an all-zero or heavily skewed tensor, whose keys fall in
// one bin, costs one atomic per warp step rather than 32 serialised ones; pass 1
// stages its candidates in shared memory and reserves room in the group's buffer
// once per kStage keys (one global atomic per slab, not one per warp step).
#include "select/select_cuda.h"

#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include "common/cuda_utils.cuh"
#include "select/select_device.cuh"

namespace incrkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = kThreads * kILP;
constexpr int kStage = 2 * kTile;  // candidate keys a block stages before reserving room

// For loops in which every thread runs every tile of chunk c (block scans, warp
// intrinsics): this thread's first element i of the tile at `tile`, its keys, and
// which of them exist and satisfy pred(key, position); returns how many do.
template <typename Pred>
__device__ __forceinline__ int tile_match(const SelSeg& s, ScoreKind kind, const SelChunk& c,
                                          int64_t tile, Pred pred, int64_t& i,
                                          uint32_t (&key)[kILP], bool (&take)[kILP]) {
  i = tile + int64_t(threadIdx.x) * kILP;
  const int valid = int(imax(0, imin(kILP, c.end - i)));
#pragma unroll
  for (int j = 0; j < kILP; ++j) key[j] = 0;
  if (valid > 0) keys4(s, kind, i, valid, key);
  int count = 0;
#pragma unroll
  for (int j = 0; j < kILP; ++j) {
    take[j] = j < valid && pred(key[j], s.pos0 + i + j);
    count += take[j];
  }
  return count;
}

// ---------------------------------------------------------------------------------
// Histogram passes

__device__ __forceinline__ void flush_hist(const uint32_t* sh, unsigned long long* hist) {
  for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x)
    if (sh[b]) atomicAdd(hist + b, static_cast<unsigned long long>(sh[b]));
}

// Counts `bin` in the shared histogram for every lane of the warp with `take`.
// The lanes with one bin are merged first and their lowest lane adds the count:
// keys that share a bin (an all-zero tensor, a skewed score) would otherwise
// serialise 32 atomics on one shared-memory word. Every lane of the warp must call.
__device__ __forceinline__ void hist_add(uint32_t* sh, bool take, uint32_t bin) {
  const unsigned peers = __match_any_sync(0xffffffffu, take ? bin : 0xffffffffu);
  const unsigned lane = threadIdx.x % 32;
  if (take && lane == unsigned(__ffs(peers) - 1)) atomicAdd(sh + bin, unsigned(__popc(peers)));
}

// Pass 1's candidates go to a shared-memory stage; when the next tile might not
// fit, the block reserves room for the staged keys in the group's buffer with one
// atomic and copies them out. The candidates' order is free (pass 2 counts keys
// only), so the blocks need no further scan. `fill` is uniform across the block.
__device__ __forceinline__ void flush_stage(const uint32_t* stage, int fill, SelState* stp,
                                            uint32_t* cand_key) {
  __shared__ unsigned long long s_base;
  if (threadIdx.x == 0)
    s_base = atomicAdd(reinterpret_cast<unsigned long long*>(&stp->cand_count),
                       static_cast<unsigned long long>(fill));
  __syncthreads();
  uint32_t* dst = cand_key + stp->cand_base + int64_t(s_base);
  for (int x = threadIdx.x; x < fill; x += blockDim.x) dst[x] = stage[x];
  __syncthreads();  // the stage and s_base are reused
}

// One block per chunk of the input. Level 1 also buffers the candidates. Every
// thread runs the same number of tiles (the warp intrinsics and block scans need
// the whole block).
__global__ void __launch_bounds__(kThreads)
    hist_input_kernel(SelectLaunch L, int level) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ uint32_t sh[kSelectBins];
  __shared__ uint32_t stage[kStage];
  __shared__ typename Scan::TempStorage scan;
  const SelChunk c = L.chunks[blockIdx.x];
  const SelSeg s = L.segs[c.seg];
  SelState* stp = L.states + s.group;
  if (stp->done || (level == 2 && stp->use_cands)) return;
  const uint32_t prefix = stp->prefix;
  const bool buffer = level == 1 && stp->use_cands;
  const int low = level_low(level);
  const uint32_t mask = (1u << level_bits(level)) - 1u;
  for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  int fill = 0;
  for (int64_t tile = c.begin; tile < c.end; tile += kTile) {
    int64_t i = 0;
    uint32_t key[kILP];
    bool match[kILP];
    const int mine = tile_match(
        s, L.kind, c, tile,
        [&](uint32_t k, int64_t) { return in_level(k, prefix, level); }, i,
        key, match);
#pragma unroll
    for (int j = 0; j < kILP; ++j) hist_add(sh, match[j], (key[j] >> low) & mask);
    if (buffer) {
      int offset = 0, total = 0;
      Scan(scan).ExclusiveSum(mine, offset, total);
      if (fill + total > kStage) {
        flush_stage(stage, fill, stp, L.cand_key);
        fill = 0;
      }
#pragma unroll
      for (int j = 0; j < kILP; ++j)
        if (match[j]) stage[fill + offset++] = key[j];
      fill += total;
      __syncthreads();  // the stage is read by other threads; the scan storage is reused
    }
  }
  if (buffer && fill > 0) flush_stage(stage, fill, stp, L.cand_key);
  __syncthreads();
  flush_hist(sh, L.hist + int64_t(s.group) * kSelectBins);
}

// Level 2 over the buffered candidates: grid (blocks, groups).
__global__ void __launch_bounds__(kThreads) hist_cands_kernel(SelectLaunch L, int group0) {
  __shared__ uint32_t sh[kSelectBins];
  const int group = group0 + int(blockIdx.y);
  SelState* stp = L.states + group;
  if (stp->done || !stp->use_cands) return;
  const uint32_t prefix = stp->prefix;
  const int64_t n = stp->cand_count, base = stp->cand_base;
  for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  // `start` is uniform across the block, so whole warps reach hist_add.
  for (int64_t start = int64_t(blockIdx.x) * blockDim.x; start < n;
       start += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const uint32_t key = i < n ? L.cand_key[base + i] : 0u;
    hist_add(sh, i < n && in_level(key, prefix, 2), key & 1023u);
  }
  __syncthreads();
  flush_hist(sh, L.hist + int64_t(group) * kSelectBins);
}

// One block per group: the digit of the k-th from the histogram of `level`.
__global__ void __launch_bounds__(kThreads) find_kernel(SelectLaunch L, int level) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  SelState* stp = L.states + blockIdx.x;
  unsigned long long* hist = L.hist + int64_t(blockIdx.x) * kSelectBins;
  if (stp->done) return;
  // Read before the scan's barriers: the finding thread rewrites the state after.
  const unsigned long long r = static_cast<unsigned long long>(stp->r);
  const int nbins = 1 << level_bits(level), per = nbins / kThreads;
  const int top = nbins - 1 - int(threadIdx.x) * per;  // this thread's bins: top .. top-per+1
  unsigned long long sum = 0;
  for (int j = 0; j < per; ++j) sum += hist[top - j];
  unsigned long long before = 0;
  Scan(scan).ExclusiveSum(sum, before);
  if (before < r && r <= before + sum) {
    const int b = walk_bins(hist, top, per, r, before);
    SelState st = *stp;
    settle_digit(st, uint32_t(b), int64_t(before), int64_t(hist[b]), level);
    *stp = st;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kSelectBins; b += blockDim.x) hist[b] = 0;
}

// ---------------------------------------------------------------------------------
// Ties at the k-th key

// The elements of chunk c whose (key, position) satisfy pred, counted over the
// block; every thread gets the total.
template <typename Pred>
__device__ int64_t chunk_count(const SelectLaunch& L, const SelChunk& c, const SelSeg& s,
                               Pred pred) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int64_t mine = 0;
  for (int64_t i = c.begin + int64_t(threadIdx.x) * kILP; i < c.end; i += kTile) {
    const int valid = int(imin(kILP, c.end - i));
    uint32_t key[kILP];
    keys4(s, L.kind, i, valid, key);
#pragma unroll
    for (int j = 0; j < kILP; ++j) mine += j < valid && pred(key[j], s.pos0 + i + j);
  }
  int64_t total = 0;
  Scan(tmp).ExclusiveSum(mine, mine, total);
  return total;
}

__global__ void __launch_bounds__(kThreads) tie_count_kernel(SelectLaunch L) {
  const SelChunk c = L.chunks[blockIdx.x];
  const SelSeg s = L.segs[c.seg];
  const SelState* stp = L.states + s.group;
  if (stp->done) {
    if (threadIdx.x == 0) L.chunk_ties[blockIdx.x] = 0;
    return;
  }
  const uint32_t t = stp->threshold;
  const int64_t total = chunk_count(L, c, s, [t](uint32_t key, int64_t) { return key == t; });
  if (threadIdx.x == 0) L.chunk_ties[blockIdx.x] = total;
}

// In counts[0..n), the index holding the r-th unit (1-based) and the units before
// it; every thread of the block gets the answer.
__device__ void find_rank(const int64_t* counts, int64_t n, int64_t r, int64_t& index,
                          int64_t& before) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int64_t s_index, s_before, s_carry;
  if (threadIdx.x == 0) s_index = -1, s_carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < n ? counts[i] : 0;
    int64_t excl = 0, total = 0;
    Scan(scan).ExclusiveSum(v, excl, total);
    const int64_t start = s_carry + excl;
    if (i < n && start < r && r <= start + v) s_index = i, s_before = start;
    __syncthreads();
    if (threadIdx.x == 0) s_carry += total;
    __syncthreads();
    if (s_index >= 0) break;
  }
  index = s_index;
  before = s_before;
}

// One block per group with ties: the position of the r-th tie.
__global__ void __launch_bounds__(kThreads) tie_find_kernel(SelectLaunch L) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int64_t s_found, s_carry;
  SelState* stp = L.states + blockIdx.x;
  if (stp->done) return;
  int64_t chunk = -1, before = 0;
  find_rank(L.chunk_ties + stp->first_chunk, stp->nchunks, stp->r, chunk, before);
  if (chunk < 0) return;  // unreachable: the histograms counted these ties
  const SelChunk c = L.chunks[stp->first_chunk + chunk];
  const SelSeg s = L.segs[c.seg];
  const uint32_t t = stp->threshold;
  const int64_t want = stp->r - before;  // the want-th tie of this chunk
  if (threadIdx.x == 0) s_found = -1, s_carry = 0;
  __syncthreads();
  for (int64_t base = c.begin; base < c.end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < c.end && key1(s, L.kind, i) == t;
    int64_t excl = 0, total = 0;
    Scan(scan).ExclusiveSum(v, excl, total);
    if (v && s_carry + excl + 1 == want) s_found = s.pos0 + i;
    __syncthreads();
    if (threadIdx.x == 0) s_carry += total;
    __syncthreads();
    if (s_found >= 0) break;
  }
  if (threadIdx.x == 0) {
    stp->last_pos = s_found;
    stp->done = 1;
  }
}

// ---------------------------------------------------------------------------------
// Output

__global__ void __launch_bounds__(kThreads) count_kernel(SelectLaunch L) {
  const SelChunk c = L.chunks[blockIdx.x];
  const SelSeg s = L.segs[c.seg];
  const SelState st = L.states[s.group];
  const int64_t total =
      chunk_count(L, c, s, [&st](uint32_t key, int64_t pos) { return chosen(st, key, pos); });
  if (threadIdx.x == 0) L.chunk_count[blockIdx.x] = total;
}

// Order-preserving compaction: one block per chunk, one block scan per tile.
__global__ void __launch_bounds__(kThreads) write_kernel(SelectLaunch L, int64_t* out) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const SelChunk c = L.chunks[blockIdx.x];
  const SelSeg s = L.segs[c.seg];
  const SelState st = L.states[s.group];
  int64_t* dst = out + L.chunk_off[blockIdx.x];
  for (int64_t tile = c.begin; tile < c.end; tile += kTile) {
    int64_t i = 0;
    uint32_t key[kILP];
    bool take[kILP];
    const int mine = tile_match(
        s, L.kind, c, tile, [&st](uint32_t k, int64_t pos) { return chosen(st, k, pos); }, i,
        key, take);
    int offset = 0, total = 0;
    Scan(tmp).ExclusiveSum(mine, offset, total);
#pragma unroll
    for (int j = 0; j < kILP; ++j)
      if (take[j]) dst[offset++] = i + j;
    dst += total;
    __syncthreads();  // the scan storage is reused by the next tile
  }
}

}  // namespace

size_t select_scan_temp_bytes(int64_t nchunks) {
  size_t bytes = 0;
  check_cuda(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), nchunks + 1),
        "select scan size");
  return bytes;
}

void select_find(const SelectLaunch& L, cudaStream_t stream) {
  if (L.nchunks == 0 || L.ngroups == 0) return;
  check_cuda(cudaMemsetAsync(L.hist, 0,
                             sizeof(unsigned long long) * kSelectBins * L.ngroups, stream),
             "select memset");
  const unsigned chunks = unsigned(L.nchunks);
  for (int level = 0; level < 3; ++level) {
    hist_input_kernel<<<chunks, kThreads, 0, stream>>>(L, level);
    check_launch("select histogram kernel");
    if (level == 2) {
      for (int g0 = 0; g0 < L.ngroups; g0 += 65535) {  // gridDim.y <= 65535
        const unsigned gy = unsigned(L.ngroups - g0 < 65535 ? L.ngroups - g0 : 65535);
        hist_cands_kernel<<<dim3(64, gy), kThreads, 0, stream>>>(L, g0);
        check_launch("select candidate histogram kernel");
      }
    }
    find_kernel<<<unsigned(L.ngroups), kThreads, 0, stream>>>(L, level);
    check_launch("select digit kernel");
  }
  tie_count_kernel<<<chunks, kThreads, 0, stream>>>(L);
  check_launch("select tie count kernel");
  tie_find_kernel<<<unsigned(L.ngroups), kThreads, 0, stream>>>(L);
  check_launch("select tie kernel");
}

void select_offsets(const SelectLaunch& L, cudaStream_t stream) {
  if (L.nchunks == 0) return;
  check_cuda(cudaMemsetAsync(L.chunk_count + L.nchunks, 0, sizeof(int64_t), stream),
             "select memset");
  count_kernel<<<unsigned(L.nchunks), kThreads, 0, stream>>>(L);
  check_launch("select count kernel");
  size_t bytes = L.scan_temp_bytes;
  check_cuda(cub::DeviceScan::ExclusiveSum(L.scan_temp, bytes, L.chunk_count, L.chunk_off,
                                      L.nchunks + 1, stream),
        "select scan");
}

void select_write(const SelectLaunch& L, int64_t* out, cudaStream_t stream) {
  if (L.nchunks == 0) return;
  write_kernel<<<unsigned(L.nchunks), kThreads, 0, stream>>>(L, out);
  check_launch("select write kernel");
}

}  // namespace incrkern::cuda
