// CPU kernels of the accumulate family: acc += alpha * g and
// sq = sq_decay * sq + sq_alpha * g * g, one at::parallel_for per tensor.
// The math is csrc/common/rules.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "accumulate/accumulate_checks.h"
#include "common/rules.h"

namespace incrkern {
namespace {

constexpr int64_t kGrain = 1 << 16;

// The loops are kept free of branches (one per combination of accumulators) and
// their pointers declared unaliased, so that gcc vectorises them.
template <typename G, typename M>
void accumulate_tensor(M* __restrict__ acc, M* __restrict__ sq, const G* __restrict__ g,
                       int64_t n, M alpha, M sq_alpha, M sq_decay) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    M* __restrict__ a = acc;
    M* __restrict__ s = sq;
    const G* __restrict__ x = g;
    if (a && s) {
      for (int64_t e = begin; e < end; ++e) {
        const M gm = M(x[e]);
        accumulate_rule(a[e], gm, alpha);
        accumulate_sq_rule(s[e], gm, sq_alpha, sq_decay);
      }
    } else if (a) {
      for (int64_t e = begin; e < end; ++e) accumulate_rule(a[e], M(x[e]), alpha);
    } else if (s) {
      for (int64_t e = begin; e < end; ++e) accumulate_sq_rule(s[e], M(x[e]), sq_alpha, sq_decay);
    }
  });
}

void accumulate_cpu(at::TensorList accs, at::TensorList grads, double alpha,
                    at::TensorList sq_accs, double sq_alpha, double sq_decay) {
  check_accumulate_lists("incrkern.accumulate_", accs, grads, sq_accs, /*allow_double=*/true);
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (g.numel() == 0 || (accs.empty() && sq_accs.empty())) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                    "incrkern_accumulate", [&] {
      using M = at::opmath_type<scalar_t>;
      accumulate_tensor<scalar_t, M>(accs.empty() ? nullptr : accs[i].data_ptr<M>(),
                                     sq_accs.empty() ? nullptr : sq_accs[i].data_ptr<M>(),
                                     g.const_data_ptr<scalar_t>(), g.numel(), M(alpha),
                                     M(sq_alpha), M(sq_decay));
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) {
  m.impl("accumulate_", &accumulate_cpu);
}

}  // namespace incrkern
