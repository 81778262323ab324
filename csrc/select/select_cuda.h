// The CUDA select kernels' plain interface: raw pointers and a stream, so that the
// .cu file needs no torch headers. The glue (select_cuda_ops.cpp) allocates every
// buffer and copies the tables below to the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/cuda_dtype.h"
#include "select/select_keys.h"  // ScoreKind

namespace incrkern::cuda {

// Elements per block of the chunked passes. A pass keeps about one 16-byte load per
// warp in flight (its histogram atomics and warp votes sit between tiles), so the
// chunks must be small enough to give every SM several blocks: 64K-element chunks
// left an H200 with one block per SM on a 1e7 tensor.
constexpr int64_t kSelectChunk = 16384;
constexpr int kSelectBins = 2048;        // 11-bit digits: bits 31..21, 20..10, 9..0

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

// The selection state of one group (one tensor, or the whole list in global
// scope), kept in device memory and advanced by the kernels: the host never
// reads it, so nothing waits.
struct SelState {
  int64_t k, n;            // set by the host
  int64_t cap;             // candidate buffer capacity of the group: the level-1
                           // pass buffers its keys only when they fit
  int64_t cand_base;       // its first slot in the candidate buffers
  int64_t tol;             // approximate mode: accepted |count - k|; -1: exact
  int64_t first_chunk, nchunks;
  // advanced by the kernels
  int64_t r;               // rank of the k-th among the keys sharing `prefix`
  int64_t count;           // keys sharing `prefix`
  int64_t cand_count;      // keys buffered so far (blocks reserve slabs of it)
  int64_t last_pos;        // predicate: key > T or (key == T and position <= last_pos)
  uint32_t prefix;
  int32_t shift;           // low bits not yet fixed (32, 21, 10, 0)
  uint32_t threshold;      // T
  int32_t done;            // predicate final
  int32_t use_cands;       // the candidates of the last two passes are buffered
  int32_t pad;
};

struct SelectLaunch {
  const SelSeg* segs;
  int32_t nsegs;
  ScoreKind kind;
  const SelChunk* chunks;
  int64_t nchunks;
  SelState* states;
  int32_t ngroups;
  unsigned long long* hist;  // ngroups * kSelectBins
  uint32_t* cand_key;         // sum of the groups' cap
  int64_t* chunk_count;      // nchunks + 1
  int64_t* chunk_off;        // nchunks + 1: exclusive sums of chunk_count, which are
                             // also each chunk's offset in the flat output
  int64_t* chunk_ties;       // nchunks
  void* scan_temp;
  size_t scan_temp_bytes;
};

// Bytes of scan workspace for nchunks chunks.
size_t select_scan_temp_bytes(int64_t nchunks);

// Finds every group's predicate (threshold and last position, in its state);
// launches only, no host synchronisation. Throws std::runtime_error on failure.
void select_find(const SelectLaunch& launch, cudaStream_t stream);

// After select_find: the per-chunk output offsets (chunk_off), for select_write.
void select_offsets(const SelectLaunch& launch, cudaStream_t stream);

// Writes the chosen positions of every tensor, ascending and relative to its own
// element 0, into one flat array: chunk c's at out[chunk_off[c]], so the tensors'
// outputs lie one after the other in table order.
void select_write(const SelectLaunch& launch, int64_t* out, cudaStream_t stream);

}  // namespace incrkern::cuda
