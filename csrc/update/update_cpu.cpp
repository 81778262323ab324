// CPU kernels of the update family: SGD / Adam / AdamW, dense or at given
// positions, one parallel loop over the positions of every tensor of a call
// (common/parallel_ranges.h). The math is csrc/common/rules.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/parallel_ranges.h"
#include "common/prefetched.h"
#include "common/rules.h"
#include "update/adam_stream_cpu.h"
#include "update/sgd_stream_cpu.h"
#include "update/update_checks.h"

namespace incrkern {
namespace {

// Positions per task: a streamed element costs a few bytes of bandwidth, a
// scattered one a wait on memory for each of its lines, so indexed work is split
// finer (under the coarse grain, 1e4 indices would all go to one core).
constexpr int64_t kGrain = 1 << 15;
constexpr int64_t kIndexedGrain = 1 << 10;

// Where the j-th updated element lives: its flat position in the param and grad,
// and its slot in the state tensors (the same position, or j for compact state).
struct Positions {
  const int64_t* indices = nullptr;  // null: every element, in order
  const bool* mask = nullptr;        // null: no mask
  bool compact = false;
  int64_t count = 0;                 // number of positions j
};

Positions positions_of(const UpdateLists& a, size_t i) {
  Positions pos;
  pos.count = a.params[i].numel();
  if (!a.indices.empty()) {
    const at::Tensor& idx = a.indices[i];
    pos.indices = idx.data_ptr<int64_t>();
    pos.count = idx.numel();
    pos.compact = a.compact_state;
    if (pos.count > 0) {
      // Out-of-range positions would write outside the tensor: refuse before writing.
      // A plain loop, not at::aminmax: an op call per tensor costs more than the
      // check for the few positions of a small tensor.
      const int64_t* p = pos.indices;
      const auto [lo, hi] = std::minmax_element(p, p + pos.count);
      TORCH_CHECK(*lo >= 0 && *hi < a.params[i].numel(), "incrkern: indices[", i,
                  "] holds positions outside [0, ", a.params[i].numel(), ")");
    }
  }
  if (!a.masks.empty()) pos.mask = a.masks[i].data_ptr<bool>();
  return pos;
}

double lr_value(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
}

// Calls visit(element, slot) for every position in [begin, end), their lines
// requested ahead (prefetched).
template <typename Visit, typename Prefetch>
inline void for_positions(const Positions& pos, int64_t begin, int64_t end, Visit&& visit,
                          Prefetch&& prefetch) {
  if (!pos.indices) {
    for (int64_t e = begin; e < end; ++e)
      if (!pos.mask || pos.mask[e]) visit(e, e);
    return;
  }
  prefetched(
      begin, end,
      [&](int64_t j) {
        const int64_t e = pos.indices[j];
        if (!pos.mask || pos.mask[e]) visit(e, pos.compact ? j : e);
      },
      [&](int64_t j) { prefetch(pos.indices[j], pos.compact ? j : pos.indices[j]); });
}

// `vmax`: AMSGrad's max_exp_avg_sq, null without AMSGrad.
template <typename T, typename G, typename M>
RangeFn adam_ranges(T* p, G* g, M* m, M* v, M* vmax, int32_t* age, const Positions& pos,
                    const AdamHyper<M> h, double lr, double beta1, double beta2, double step,
                    M grad_scale, bool consume) {
  const AdamBias bias = adam_bias(lr, beta1, beta2, step);
  const M step_size = M(bias.step_size), bc2_sqrt = M(bias.bc2_sqrt);
  if (!pos.indices && !age) {  // dense or dense-mask: stream over every element
    if (vmax)
      return [=](int64_t begin, int64_t end) {
        adam_stream_amsgrad_isa<T, G, M>(p, g, m, v, vmax, pos.mask, consume, begin, end, h,
                                         step_size, bc2_sqrt, grad_scale);
      };
    return [=](int64_t begin, int64_t end) {
      adam_stream_isa<T, G, M>(p, g, m, v, pos.mask, false, 0, KeyFrom::Grad, nullptr, consume,
                               begin, end, h,
                               step_size, bc2_sqrt, grad_scale);
    };
  }
  return [=](int64_t begin, int64_t end) {
    for_positions(pos, begin, end, [&](int64_t e, int64_t s) {
      M pm = M(p[e]);
      const M gm = M(g[e]) * grad_scale;
      if (consume) g[e] = G(0);
      M size = step_size, bc2 = bc2_sqrt;
      if (age) {
        const AdamBias b = adam_bias(lr, beta1, beta2, double(++age[s]));
        size = M(b.step_size);
        bc2 = M(b.bc2_sqrt);
      }
      if (vmax) adam_rule<true>(pm, gm, m[s], v[s], vmax[s], h, size, bc2);
      else adam_rule(pm, gm, m[s], v[s], h, size, bc2);
      p[e] = T(pm);
    }, [&](int64_t e, int64_t s) {
      request_line(p + e);
      request_line(g + e);
      request_line(m + s);
      request_line(v + s);
      if (vmax) request_line(vmax + s);
    });
  };
}

template <typename T, typename G, typename M>
RangeFn sgd_ranges(T* p, G* g, M* buf, const Positions& pos, const SgdHyper<M> h, bool first,
                   M grad_scale, bool consume) {
  if (!pos.indices) {  // dense or dense-mask: stream over every element
    return [=](int64_t begin, int64_t end) {
      sgd_stream_isa<T, G, M>(p, g, buf, pos.mask, false, 0, consume, begin, end, h, first,
                              grad_scale);
    };
  }
  return [=](int64_t begin, int64_t end) {
    for_positions(pos, begin, end, [&](int64_t e, int64_t s) {
      M pm = M(p[e]), scratch = M(0);
      const M gm = M(g[e]) * grad_scale;
      if (consume) g[e] = G(0);
      sgd_rule(pm, gm, buf ? buf[s] : scratch, h, first);
      p[e] = T(pm);
    }, [&](int64_t e, int64_t s) {
      request_line(p + e);
      request_line(g + e);
      if (buf) request_line(buf + s);
    });
  };
}

// The grain of a call's parallel loop: the finer one when any tensor is indexed.
int64_t grain_of(const std::vector<Positions>& pos) {
  const bool indexed =
      std::any_of(pos.begin(), pos.end(), [](const Positions& p) { return p.indices; });
  return indexed ? kIndexedGrain : kGrain;
}

// Calls fn.template operator()<T, G>() with the param type T and grad type G.
template <typename Fn>
void dispatch_param_grad(const at::Tensor& p, const at::Tensor& g, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "incrkern_update", [&] {
    using T = scalar_t;
    using M = at::opmath_type<T>;
    if (g.scalar_type() == p.scalar_type())
      fn.template operator()<T, T>();
    else
      fn.template operator()<T, M>();
  });
}

void adam_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList indices,
                     at::TensorList masks, at::TensorList ages,
                     at::TensorList max_exp_avg_sqs, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled_weight_decay,
                     bool maximize, double grad_scale, bool consume_grad, bool compact_state,
                     const std::optional<at::Tensor>& lr_tensor, bool increment_steps,
                     const std::optional<at::Tensor>& amp_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const UpdateLists a{params, grads, exp_avgs, exp_avg_sqs, steps, indices, masks, ages,
                      compact_state, true, max_exp_avg_sqs};
  check_update_lists("incrkern.adam_update_", a);
  check_lr_tensor("incrkern.adam_update_", lr_tensor, params);
  check_amp("incrkern.adam_update_", amp_scale, found_inf, params);
  if (amp_found_inf(found_inf)) return;
  const std::optional<float> amp = amp_value(amp_scale);
  lr = lr_value(lr, lr_tensor);
  std::vector<Positions> pos;
  for (size_t i = 0; i < params.size(); ++i) pos.push_back(positions_of(a, i));
  std::vector<RangeFn> fns;
  std::vector<int64_t> counts;
  // Every check has passed: from here on the call changes its arguments.
  if (increment_steps)
    for (const at::Tensor& s : steps) *s.data_ptr<float>() += 1.0f;
  for (size_t i = 0; i < params.size(); ++i) {
    const double step = *steps[i].data_ptr<float>();  // checked: a float32 scalar on the CPU
    dispatch_param_grad(params[i], grads[i], [&]<typename T, typename G>() {
      using M = at::opmath_type<T>;
      const auto h = make_adam_hyper<M>(lr, beta1, beta2, eps, weight_decay,
                                        decoupled_weight_decay, maximize);
      fns.push_back(adam_ranges<T, G, M>(
          params[i].data_ptr<T>(), grads[i].data_ptr<G>(), exp_avgs[i].data_ptr<M>(),
          exp_avg_sqs[i].data_ptr<M>(),
          max_exp_avg_sqs.empty() ? nullptr : max_exp_avg_sqs[i].data_ptr<M>(),
          ages.empty() ? nullptr : ages[i].data_ptr<int32_t>(),
          pos[i], h, lr, beta1, beta2, step, amp_factor<M>(grad_scale, amp), consume_grad));
    });
    counts.push_back(pos[i].count);
  }
  run_ranges(fns, counts, grain_of(pos));
}

void sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList indices, at::TensorList masks, c10::List<bool> first_step,
                    double lr, double momentum, double dampening, double weight_decay,
                    bool nesterov, bool maximize, double grad_scale, bool consume_grad,
                    bool compact_state, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& amp_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const UpdateLists a{params, grads, momentum_buffers, {}, {}, indices, masks, {},
                      compact_state, false};
  check_update_lists("incrkern.sgd_update_", a);
  check_lr_tensor("incrkern.sgd_update_", lr_tensor, params);
  check_sgd_args("incrkern.sgd_update_", momentum, momentum_buffers, first_step, params);
  check_amp("incrkern.sgd_update_", amp_scale, found_inf, params);
  if (amp_found_inf(found_inf)) return;
  const std::optional<float> amp = amp_value(amp_scale);
  lr = lr_value(lr, lr_tensor);
  std::vector<Positions> pos;
  for (size_t i = 0; i < params.size(); ++i) pos.push_back(positions_of(a, i));
  std::vector<RangeFn> fns;
  std::vector<int64_t> counts;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool first = first_step.size() ? bool(first_step.get(i)) : false;
    dispatch_param_grad(params[i], grads[i], [&]<typename T, typename G>() {
      using M = at::opmath_type<T>;
      const auto h = make_sgd_hyper<M>(lr, momentum, dampening, weight_decay, nesterov, maximize);
      M* buf = momentum != 0 ? momentum_buffers[i].data_ptr<M>() : nullptr;
      fns.push_back(sgd_ranges<T, G, M>(params[i].data_ptr<T>(), grads[i].data_ptr<G>(), buf,
                                        pos[i], h, first, amp_factor<M>(grad_scale, amp),
                                        consume_grad));
    });
    counts.push_back(pos[i].count);
  }
  run_ranges(fns, counts, grain_of(pos));
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) {
  m.impl("adam_update_", &adam_update_cpu);
  m.impl("sgd_update_", &sgd_update_cpu);
}

}  // namespace incrkern
