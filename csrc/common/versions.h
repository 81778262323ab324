// Version counters of the tensors an op writes. Torch's in-place ops bump the counter of
// every tensor they change, and autograd compares it when it unpacks a tensor saved for
// backward: a backward through a value that a step has since changed is refused, not
// silently wrong. incrkern's ops do the same. Through the dispatcher, a kernel at the
// ADInplaceOrView key bumps every argument the schema marks written (csrc/ops.cpp). The
// one-call steps call the kernels directly: the Adam step has its kernel bump what it
// writes (Bookkeeping, fused/fused_cpu.h), and a micro-step of accumulate_steps bumps
// its buffers itself (fused/fused_step_py.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace incrkern {

// Inference tensors have no counter (torch's in-place ops skip them too).
inline void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors)
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace incrkern
