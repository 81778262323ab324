// IK_HD marks the small functions that CPU and CUDA kernels share (update rules,
// select keys). Always inlined: one left out of line (gcc did so for sgd_rule)
// becomes a call per element and keeps the streaming CPU loops from vectorising.
#pragma once

#if defined(__CUDACC__)
#define IK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define IK_HD inline __attribute__((always_inline))
#else
#define IK_HD inline
#endif
