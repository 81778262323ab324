// Registers the CUDA accumulate kernel: checks the arguments (the same checks as
// the CPU path), groups the tensors by grad dtype and hands raw pointers to
// accumulate_cuda.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "accumulate/accumulate_checks.h"
#include "accumulate/accumulate_cuda.h"
#include "common/amp_checks.h"
#include "common/cuda_glue.h"

namespace incrkern {
namespace {

cuda::DType cuda_grad_dtype(at::ScalarType t) {
  const std::optional<cuda::DType> d = cuda_dtype_of(t);
  TORCH_CHECK(d, "incrkern.accumulate_: CUDA grads must be float32, bfloat16 or float16, got ",
              t);
  return *d;
}

void accumulate_cuda(at::TensorList accs, at::TensorList grads, double alpha,
                     at::TensorList sq_accs, double sq_alpha, double sq_decay,
                     const std::optional<at::Tensor>& amp_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const char* op = "incrkern.accumulate_";
  check_accumulate_lists(op, accs, grads, sq_accs, /*allow_double=*/false);
  check_amp(op, amp_scale, found_inf, grads);
  if (grads.empty() || (accs.empty() && sq_accs.empty())) return;
  TORCH_CHECK(grads[0].is_cuda(), op, ": grads[0] is on ", grads[0].device(),
              ", expected CUDA");
  // One launch per grad dtype present (at most three).
  std::array<std::vector<cuda::AccumulateTensor>, cuda::kDTypes> groups;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    cuda::AccumulateTensor t{};
    t.grad = g.const_data_ptr();
    t.acc = accs.empty() ? nullptr : accs[i].data_ptr<float>();
    t.sq = sq_accs.empty() ? nullptr : sq_accs[i].data_ptr<float>();
    t.count = g.numel();
    groups[int(cuda_grad_dtype(g.scalar_type()))].push_back(t);
  }
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cuda::AccumulateArgs args{
      float(alpha), float(sq_alpha), float(sq_decay),
      amp_scale ? amp_scale->data_ptr<float>() : nullptr,
      found_inf ? found_inf->data_ptr<float>() : nullptr, !accs.empty(), !sq_accs.empty()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t d = 0; d < groups.size(); ++d)
    cuda::accumulate(groups[d].data(), int64_t(groups[d].size()), cuda::DType(int(d)),
                     args, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CUDA, m) {
  m.impl("accumulate_", &accumulate_cuda);
}

}  // namespace incrkern
