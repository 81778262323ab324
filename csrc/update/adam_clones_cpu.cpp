// The Adam update loops for each ISA, per param and gradient type (IK_CLONED_TYPES in
// update/adam_stream_cpu.h), declared there and called by the update and fused
// kernels. In a file of their own because they are most of the extension's compile
// time: apart from update_cpu.cpp, a parallel build compiles them beside it.
#include "update/adam_stream_cpu.h"

namespace incrkern {

#define IK_DEFINE_CLONED(T, G)                                                                 \
  IK_ISA_CLONES void adam_stream_cloned(T* p, G* g, float* m, float* v, const bool* mask,      \
                                        bool consume, int64_t begin, int64_t end,              \
                                        const AdamHyper<float> h, const float step_size,       \
                                        const float bc2_sqrt, const float grad_scale) {        \
    adam_stream_any<T, G, float>(p, g, m, v, mask, consume, begin, end, h, step_size,          \
                                 bc2_sqrt, grad_scale);                                        \
  }                                                                                            \
  IK_ISA_CLONES void adam_stream_above_cloned(                                                 \
      T* p, G* g, float* m, float* v, int32_t above_gt, KeyFrom key_from, const float* keys,   \
      bool consume, int64_t begin, int64_t end, const AdamHyper<float> h,                      \
      const float step_size, const float bc2_sqrt, const float grad_scale) {                   \
    adam_stream_above_any<T, G, float>(p, g, m, v, above_gt, key_from, keys, consume, begin,   \
                                       end, h, step_size, bc2_sqrt, grad_scale);               \
  }                                                                                            \
  IK_ISA_CLONES const float* adam_tiles_cloned(                                                \
      T* p, G* g, const float* vals, float* m, float* v, bool consume, const int64_t* starts,  \
      const uint32_t* masks, int64_t n, int32_t lanes, const AdamHyper<float> h,               \
      const float step_size, const float bc2_sqrt, const float grad_scale) {                   \
    return adam_tiles_any<T, G, float>(p, g, vals, m, v, consume, starts, masks, n, lanes, h,  \
                                       step_size, bc2_sqrt, grad_scale);                       \
  }                                                                                            \
  IK_ISA_CLONES void adam_stream_amsgrad_cloned(                                               \
      T* p, G* g, float* m, float* v, float* vmax, const bool* mask, bool consume,             \
      int64_t begin, int64_t end, const AdamHyper<float> h, const float step_size,             \
      const float bc2_sqrt, const float grad_scale) {                                          \
    adam_stream_amsgrad_any<T, G, float>(p, g, m, v, vmax, mask, consume, begin, end, h,       \
                                         step_size, bc2_sqrt, grad_scale);                     \
  }
IK_CLONED_TYPES(IK_DEFINE_CLONED)
#undef IK_DEFINE_CLONED

}  // namespace incrkern
