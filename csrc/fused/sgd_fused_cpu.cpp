// CPU kernel of sgd_select_update_: per tensor, the k largest |grad| (or, with error
// feedback, |residual + grad|) chosen and SGD applied to them in one call, the same
// result as select(score="grad") then sgd_update_ at the positions it returns.
//
// From the threshold stream's densities on (fused/threshold_stream_cpu.h), a
// counting pass over |g| in a band around the k-th, then SGD's streaming loop, which
// compares each |g| with the k-th as it reads it: the select's second read of the
// gradient, its mask or positions, and the update's read of them are gone. Below
// those densities, and where the band misses, select's positions and their update.
// With error feedback the pass that reads the keys forms r + g as it reads them (the
// counting pass, or below the stream's densities the Adam kernel's listing pass,
// fused/list_pass_cpu.h), and a chosen element's r becomes 0.
// Tensors that select on one thread (up to 2^20 elements when they stream) run one
// thread each, side by side; the others one after another over every thread. With
// scope="global" (the one-call step's global_k), fused/global_cpu.h's passes over every
// tensor's blocks as one flat list, the call described by SgdCall.
#include <ATen/OpMathType.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "common/amp_checks.h"
#include "common/claims.h"
#include "common/rules.h"
#include "common/prefetched.h"
#include "fused/band_choice_cpu.h"
#include "fused/fused_call_cpu.h"  // with_param_type
#include "fused/fused_checks.h"
#include "fused/fused_cpu.h"
#include "fused/global_cpu.h"
#include "fused/list_pass_cpu.h"
#include "fused/sgd_tensor_cpu.h"
#include "fused/threshold_stream_cpu.h"
#include "select/radix_cpu.h"
#include "select/selector_cpu.h"
#include "update/update_checks.h"

namespace incrkern {
namespace {

using fused::BlockOut;
using fused::SgdTensor;
using select::Selector;
using select::Source;

constexpr const char* kOp = "incrkern.sgd_select_update_";
constexpr int64_t kPositionsGrain = 1 << 10;  // scattered positions per claim
constexpr int64_t kSmallGrain = 8;            // one-thread tensors per claim

// The keys select reads: |g|, or with error feedback |r| once r holds r + g.
template <typename T>
Source score_source(const SgdTensor<T>& t, at::ScalarType dtype, int64_t n) {
  if (!t.r) return Source{ScoreKind::Abs, dtype, t.g, at::kFloat, nullptr, {}, n, 0};
  const at::ScalarType math = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  return Source{ScoreKind::Abs, math, t.r, math, nullptr, {}, n, 0};
}

// Error feedback's keys before g is added: |r + g| (select's accumulated score).
template <typename T>
Source sum_source(const SgdTensor<T>& t, at::ScalarType dtype, int64_t n) {
  return Source{ScoreKind::Accumulated, dtype, t.g, at::kFloat, t.r, {}, n, 0};
}

// With error feedback a block's listed winner tiles, tail winners and chosen
// candidates, updated one element at a time, their lines requested ahead.
template <typename T>
void update_listed(const SgdTensor<T>& t, const BlockOut& o) {
  const int64_t* start = o.wstart.data();
  const uint32_t* mask = o.wmask.data();
  prefetched(
      0, int64_t(o.wstart.size()),
      [&](int64_t j) {
        for (uint32_t m = mask[j]; m; m &= m - 1) t.one(start[j] + __builtin_ctz(m));
      },
      [&](int64_t j) { t.fetch(start[j]); });
  for (int64_t e : o.tail_winners) t.one(e);
  fused::update_at(t, o.chosen.data(), int64_t(o.chosen.size()));
}

// Error feedback below the stream's densities (a tensor over every thread): the listing
// pass lists the tiles above the band [lo, hi] and the band's candidates, forming
// r + g as it reads unless `added`, then the chosen elements are updated. The count
// updated, or nothing (nothing updated) where the counts refute the band.
template <typename T>
std::optional<int64_t> run_listed(const SgdTensor<T>& t, int64_t n, int64_t k, bool added,
                                  uint32_t lo, uint32_t hi, bool approx) {
  const std::span<BlockOut> out =
      fused::list_pass(t, n, lo, hi, added, fused::few_hits(k, n), /*values=*/false);
  auto [w, cnt] = fused::listed_counts(out);
  if (!fused::band_holds(w, cnt, k, approx)) return std::nullopt;
  fused::choose_candidates(out, k - w, lo, hi, /*values=*/false);
  parallel_for_claimed(0, int64_t(out.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) update_listed(t, out[size_t(bi)]);
  });
  for (const BlockOut& o : out) w += int64_t(o.chosen.size());
  return w;
}

// One tensor of n elements, k of them chosen by |g| (or, with error feedback, by
// |r + g|). `whole`: over every thread (a large tensor), else on the calling one,
// whose stream is exact in either mode (as the Adam kernel's one-thread tensors' are).
template <typename T>
int64_t run_tensor(const SgdTensor<T>& t, at::ScalarType dtype, int64_t n, int64_t k,
                   bool approx, bool whole) {
  if (k == n) {
    fused::update_every(t, n, whole);
    return n;
  }
  // The residual holds r + g from here on where the selection then reads it alone: on
  // one thread (the tensor in cache), at k = 0, in fp64, and with a mixed-precision
  // unscale (select's accumulated score, which the sample reads, has none).
  bool added = !t.r;
  if (!added && (!whole || k == 0 || std::is_same_v<T, double> || t.residual_alpha != 1)) {
    fused::accumulate_every(t, n, whole);
    added = true;
  }
  if (k == 0) return 0;
  if constexpr (!std::is_same_v<T, double>) {
    const bool stream = fused::stream_pays(n, k);
    if ((stream || (t.r && whole)) && !fused::forced_fallback("before")) {
      const Source keys = added ? score_source(t, dtype, n) : sum_source(t, dtype, n);
      Selector<uint32_t> sel({keys}, k, approx);
      const auto band = stream ? fused::stream_band(sel, whole) : sel.sample_band();
      if (band) {
        const auto chosen =
            stream ? fused::stream_update(t, n, k, added, band->first, band->second,
                                          approx && whole)
                   : run_listed(t, n, k, added, band->first, band->second, approx);
        if (chosen) return *chosen;
        added = true;  // the pass that refuted the band added g to r
      }
    }
  }
  if (!added) fused::accumulate_every(t, n, whole);
  const at::Tensor pos = fused::select_positions(score_source(t, dtype, n), k, approx);
  const int64_t* q = pos.data_ptr<int64_t>();
  if (whole)
    parallel_for_claimed(0, pos.numel(), kPositionsGrain,
                         [&](int64_t b, int64_t e) { fused::update_at(t, q + b, e - b); });
  else
    fused::update_at(t, q, pos.numel());
  return pos.numel();
}

// A call's tensors and constants: each tensor's SgdTensor, and the interface of a global
// call (fused/global_cpu.h).
struct SgdCall {
  at::TensorList params, grads, momentum_buffers, residuals_;
  const c10::List<bool>& first_step;
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
  double grad_scale;
  std::optional<float> amp;
  bool approx_;

  template <typename T>
  SgdTensor<T> tensor(size_t i) const {
    using M = at::opmath_type<T>;
    // With residuals the update reads r + g / amp_scale (as accumulate_ adds it) times
    // grad_scale; without, g times grad_scale / amp_scale.
    const bool ef = !residuals_.empty();
    return SgdTensor<T>{
        params[i].data_ptr<T>(),
        grads[i].const_data_ptr<T>(),
        momentum != 0 ? momentum_buffers[i].data_ptr<M>() : nullptr,
        make_sgd_hyper<M>(lr, momentum, dampening, weight_decay, nesterov, maximize),
        first_step.size() ? bool(first_step.get(i)) : false,
        ef ? M(grad_scale) : amp_factor<M>(grad_scale, amp),
        ef ? residuals_[i].data_ptr<M>() : nullptr,
        ef ? amp_factor<M>(1.0, amp) : M(1)};
  }

  size_t size() const { return params.size(); }
  int64_t numel(size_t i) const { return params[i].numel(); }
  at::ScalarType dtype(size_t i) const { return params[i].scalar_type(); }
  bool approx() const { return approx_; }
  bool residuals() const { return !residuals_.empty(); }
  Source source(size_t i) const {
    Source s{};
    with_tensor(i, [&](const auto& t) {
      s = t.r ? sum_source(t, dtype(i), numel(i)) : score_source(t, dtype(i), numel(i));
    });
    return s;
  }
  Source added_source(size_t i) const {
    Source s{};
    with_tensor(i, [&](const auto& t) { s = score_source(t, dtype(i), numel(i)); });
    return s;
  }
  template <typename Fn>
  void with_tensor(size_t i, Fn&& fn) const {
    fused::with_param_type(dtype(i), [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, double>) fn(tensor<T>(i));
    });
  }
  void update_positions(size_t i, const at::Tensor& pos) const {
    with_tensor(i, [&](const auto& t) {
      const int64_t* q = pos.data_ptr<int64_t>();
      parallel_for_claimed(0, pos.numel(), kPositionsGrain,
                           [&](int64_t b, int64_t e) { fused::update_at(t, q + b, e - b); });
    });
  }
  template <typename T>
  void update_listed(const SgdTensor<T>& t, const BlockOut& o, bool) const {
    incrkern::update_listed(t, o);
  }
};

}  // namespace

void check_sgd_select_update(c10::DeviceType device_type, at::TensorList params,
                             at::TensorList grads, at::TensorList momentum_buffers,
                             at::IntArrayRef ks, at::TensorList residuals,
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
  const char* where = device_type == c10::DeviceType::CPU ? "the CPU" : "a CUDA device";
  TORCH_CHECK(ks.size() == n, kOp, ": ks has ", ks.size(), " entries, expected ", n);
  TORCH_CHECK(residuals.empty() || residuals.size() == n, kOp, ": residuals has ",
              residuals.size(), " tensors, expected ", n, " (or none)");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device_type, kOp, ": params[", i, "] is on ",
                p.device(), ", expected ", where);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), kOp, ": grads[", i, "] has dtype ",
                grads[i].scalar_type(), ", expected the param's ", p.scalar_type());
    TORCH_CHECK(ks[i] >= 0 && ks[i] <= p.numel(), kOp, ": ks[", i, "] must be in [0, ",
                p.numel(), "], got ", ks[i]);
    check_residual(kOp, p, residuals, i);
  }
}

at::Tensor sgd_select_update_checked(at::TensorList params, at::TensorList grads,
                                     at::TensorList momentum_buffers, at::IntArrayRef ks,
                                     at::TensorList residuals, const c10::List<bool>& first_step,
                                     bool approx, double lr, double momentum, double dampening,
                                     double weight_decay, bool nesterov, bool maximize,
                                     double grad_scale, const std::optional<at::Tensor>& lr_tensor,
                                     const std::optional<at::Tensor>& amp_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     std::optional<int64_t> global_k) {
  const int64_t n = int64_t(params.size());
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* count = counts.data_ptr<int64_t>();
  if (amp_found_inf(found_inf)) return counts;
  const std::optional<float> amp = amp_value(amp_scale);
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  // Every check has passed: from here on the call changes its arguments.
  const SgdCall call{params,       grads,    momentum_buffers, residuals, first_step, lr,
                     momentum,     dampening, weight_decay,    nesterov,  maximize,   grad_scale,
                     amp,          approx};
  if (global_k) {
    fused::run_global(call, *global_k);
    return counts;
  }
  const auto run = [&](size_t i, bool whole) {
    fused::with_param_type(params[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      count[i] = run_tensor(call.tensor<T>(i), params[i].scalar_type(), params[i].numel(),
                            ks[i], approx, whole);
    });
  };
  std::vector<size_t> small, large;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    (fused::one_thread_tensor(numel, ks[i]) ? small : large).push_back(size_t(i));
  }
  parallel_for_claimed(0, int64_t(small.size()), kSmallGrain, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) run(small[size_t(j)], false);
  });
  for (size_t i : large) run(i, true);
  return counts;
}

namespace {

at::Tensor sgd_select_update_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList momentum_buffers, at::IntArrayRef ks,
                                 at::TensorList residuals, c10::List<bool> first_step,
                                 bool approx, double lr, double momentum, double dampening,
                                 double weight_decay, bool nesterov, bool maximize,
                                 double grad_scale, const std::optional<at::Tensor>& lr_tensor,
                                 const std::optional<at::Tensor>& amp_scale,
                                 const std::optional<at::Tensor>& found_inf) {
  check_sgd_select_update(c10::DeviceType::CPU, params, grads, momentum_buffers, ks, residuals,
                          first_step, momentum, lr_tensor, amp_scale, found_inf);
  return sgd_select_update_checked(params, grads, momentum_buffers, ks, residuals, first_step,
                                   approx, lr, momentum, dampening, weight_decay, nesterov,
                                   maximize, grad_scale, lr_tensor, amp_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) { m.impl("sgd_select_update_", &sgd_select_update_cpu); }

}  // namespace incrkern
