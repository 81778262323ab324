// The CUDA select kernels' plain interface: raw pointers and a stream, so that the
// .cu file needs no torch headers. The glue (select_cuda_ops.cpp) allocates every
// buffer and copies the tables (select_tables.h) to the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "select/radix_digits.h"  // SelState, kSelectBins
#include "select/select_keys.h"  // ScoreKind
#include "select/select_tables.h"  // SelSeg, SelChunk, kSelectChunk

namespace incrkern::cuda {

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
