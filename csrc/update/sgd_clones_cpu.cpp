// The SGD update loop for each ISA, per param and gradient type (IK_CLONED_TYPES in
// update/adam_stream_cpu.h), declared in update/sgd_stream_cpu.h and called by the
// update kernel and the fused select-and-update; in a file of its own, as the Adam
// loops are (adam_clones_cpu.cpp), so that a parallel build compiles it beside them.
#include "update/sgd_stream_cpu.h"

namespace incrkern {

#define IK_DEFINE_SGD_CLONED(T, G)                                                           \
  IK_ISA_CLONES void sgd_stream_cloned(T* p, G* g, float* buf, const bool* mask, bool above, \
                                       int32_t above_gt, bool consume, int64_t begin,        \
                                       int64_t end, const SgdHyper<float> h,                 \
                                       const bool first, const float grad_scale) {           \
    sgd_stream_any<T, G, float>(p, g, buf, mask, above, above_gt, consume, begin, end, h,    \
                                first, grad_scale);                                          \
  }
IK_CLONED_TYPES(IK_DEFINE_SGD_CLONED)
#undef IK_DEFINE_SGD_CLONED

}  // namespace incrkern
