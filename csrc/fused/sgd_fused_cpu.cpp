// CPU kernel of sgd_select_update_: per tensor, the k largest |grad| chosen and SGD
// applied to them in one call, the same result as select(score="grad") then
// sgd_update_ at the positions it returns.
//
// From the threshold stream's densities on (fused/threshold_stream_cpu.h), a
// counting pass over |g| in a band around the k-th, then SGD's streaming loop, which
// compares each |g| with the k-th as it reads it: the select's second read of the
// gradient, its mask or positions, and the update's read of them are gone. Below
// those densities, and where the band misses, select's positions and their update.
// Tensors that select on one thread (up to 2^20 elements when they stream) run one
// thread each, side by side; the others one after another over every thread.
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "common/amp_checks.h"
#include "common/claims.h"
#include "common/rules.h"
#include "fused/fused_call_cpu.h"  // with_param_type
#include "fused/sgd_tensor_cpu.h"
#include "fused/threshold_stream_cpu.h"
#include "select/radix_cpu.h"
#include "select/selector_cpu.h"
#include "update/update_checks.h"

namespace incrkern {
namespace {

using fused::SgdTensor;
using select::Selector;
using select::Source;

constexpr const char* kOp = "incrkern.sgd_select_update_";
constexpr int64_t kPositionsGrain = 1 << 10;  // scattered positions per claim
constexpr int64_t kSmallGrain = 8;            // one-thread tensors per claim

// One tensor of n elements, k of them chosen by |g| (src). `whole`: over every thread
// (a large tensor), else on the calling one, whose stream is exact in either mode (as
// the Adam kernel's one-thread tensors' are).
template <typename T>
int64_t run_tensor(const SgdTensor<T>& t, const Source& src, int64_t k, bool approx,
                   bool whole) {
  const int64_t n = src.n;
  if (k == 0) return 0;
  if (k == n) {
    fused::update_every(t, n, whole);
    return n;
  }
  if constexpr (!std::is_same_v<T, double>) {
    if (fused::stream_pays(n, k) && !fused::forced_fallback("before")) {
      Selector<uint32_t> sel({src}, k, approx);
      if (const auto band = fused::stream_band(sel, whole))
        if (const auto chosen = fused::stream_update(t, n, k, /*added=*/true, band->first,
                                                     band->second, approx && whole))
          return *chosen;
    }
  }
  const at::Tensor pos = fused::select_positions(src, k, approx);
  const int64_t* q = pos.data_ptr<int64_t>();
  if (whole)
    parallel_for_claimed(0, pos.numel(), kPositionsGrain,
                         [&](int64_t b, int64_t e) { fused::update_at(t, q + b, e - b); });
  else
    fused::update_at(t, q, pos.numel());
  return pos.numel();
}

void check_sgd_select_update(at::TensorList params, at::TensorList grads,
                             at::TensorList momentum_buffers, at::IntArrayRef ks,
                             const c10::List<bool>& first_step, double momentum,
                             const std::optional<at::Tensor>& lr_tensor,
                             const std::optional<at::Tensor>& amp_scale,
                             const std::optional<at::Tensor>& found_inf) {
  const UpdateLists a{params, grads, momentum_buffers, {}, {}, {}, {}, {}, false, false};
  check_update_lists(kOp, a);
  check_lr_tensor(kOp, lr_tensor, params);
  check_sgd_args(kOp, momentum, momentum_buffers, first_step, params);
  check_amp(kOp, amp_scale, found_inf, params);
  const size_t n = params.size();
  TORCH_CHECK(ks.size() == n, kOp, ": ks has ", ks.size(), " entries, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), kOp, ": params[", i, "] is on ", p.device(),
                ", expected the CPU (ops.sgd_select_update_ composes select and sgd_update_ "
                "elsewhere)");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), kOp, ": grads[", i, "] has dtype ",
                grads[i].scalar_type(), ", expected the param's ", p.scalar_type());
    TORCH_CHECK(ks[i] >= 0 && ks[i] <= p.numel(), kOp, ": ks[", i, "] must be in [0, ",
                p.numel(), "], got ", ks[i]);
  }
}

at::Tensor sgd_select_update_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList momentum_buffers, at::IntArrayRef ks,
                                 c10::List<bool> first_step, bool approx, double lr,
                                 double momentum, double dampening, double weight_decay,
                                 bool nesterov, bool maximize, double grad_scale,
                                 const std::optional<at::Tensor>& lr_tensor,
                                 const std::optional<at::Tensor>& amp_scale,
                                 const std::optional<at::Tensor>& found_inf) {
  check_sgd_select_update(params, grads, momentum_buffers, ks, first_step, momentum, lr_tensor,
                          amp_scale, found_inf);
  const int64_t n = int64_t(params.size());
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* count = counts.data_ptr<int64_t>();
  if (amp_found_inf(found_inf)) return counts;
  const std::optional<float> amp = amp_value(amp_scale);
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  // Every check has passed: from here on the call changes its arguments.
  const auto run = [&](size_t i, bool whole) {
    fused::with_param_type(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using M = at::opmath_type<T>;
      const SgdTensor<T> t{
          params[i].data_ptr<T>(),
          grads[i].const_data_ptr<T>(),
          momentum != 0 ? momentum_buffers[i].data_ptr<M>() : nullptr,
          make_sgd_hyper<M>(lr, momentum, dampening, weight_decay, nesterov, maximize),
          first_step.size() ? bool(first_step.get(i)) : false,
          amp_factor<M>(grad_scale, amp)};
      const Source src{ScoreKind::Abs, grads[i].scalar_type(), t.g, at::kFloat, nullptr, {},
                       params[i].numel(), 0};
      count[i] = run_tensor(t, src, ks[i], approx, whole);
    });
  };
  std::vector<size_t> small, large;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    const bool one_thread =
        select::one_thread_selection(numel, ks[i]) ||
        (numel <= select::kTileMaxNumel && fused::stream_pays(numel, ks[i]));
    (one_thread ? small : large).push_back(size_t(i));
  }
  parallel_for_claimed(0, int64_t(small.size()), kSmallGrain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) run(small[size_t(j)], false);
  });
  for (size_t i : large) run(i, true);
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) { m.impl("sgd_select_update_", &sgd_select_update_cpu); }

}  // namespace incrkern
