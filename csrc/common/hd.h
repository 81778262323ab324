// IK_HD marks the small functions that CPU and CUDA kernels share (update rules,
// select keys). Always inlined: see Note [branch-free loops vectorise].
//
// Note [branch-free loops vectorise]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// gcc vectorises a CPU loop only when it can make the loop body straight-line code.
// It turns simple selects into blends and unswitches some loop-invariant tests, but
// a branch it cannot remove, or a call per element, leaves the whole loop scalar,
// and a loop that would run at memory speed becomes compute-bound. The streaming loops of update_cpu.cpp and
// accumulate_cpu.cpp, and the rules of common/rules.h they inline, are therefore
// written so that nothing is left to branch on:
//  - flags that pick code (first step, nesterov, masked, which accumulators) are
//    template parameters: one loop per combination, picked once outside the loop;
//  - flags that only pick values (maximize, weight decay kinds) are selects
//    (`c ? a : b`) and non-short-circuit `&` computed for every element;
//  - a masked loop computes every element and selects the new or the old value, so
//    an unchosen element is written back bit-identical;
//  - shared functions are forced inline (IK_HD): gcc may leave even a small one
//    (sgd_rule) out of line, a call per element;
//  - pointers are __restrict and hyper-parameters are passed by value, so that gcc
//    sees no store alias them (read through a reference, they kept the loop scalar
//    with "control flow in loop").
// gcc's vectoriser report (-fopt-info-vec-missed) says which loops it left scalar.
#pragma once

#if defined(__CUDACC__)
#define IK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define IK_HD inline __attribute__((always_inline))
#else
#define IK_HD inline
#endif
