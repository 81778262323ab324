// CPU kernels of the select family (the ops topk and select): indices (ascending)
// of the k largest scores of one tensor, of each tensor of a list, or of the
// concatenation of a list. The work is the Selector's (select/selector_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "select/select_checks.h"
#include "select/selector_cpu.h"

namespace incrkern {
namespace {

using namespace incrkern::select;

// ---------------------------------------------------------------------------------
// Ops

bool needs_wide_keys(const std::vector<Source>& srcs) {
  for (const Source& s : srcs)
    if (s.score != ScoreKind::Random && (s.dtype == at::kDouble || s.res_dtype == at::kDouble))
      return true;
  return false;
}

std::vector<at::Tensor> run_selection(std::vector<Source> srcs, int64_t k, bool approx) {
  if (needs_wide_keys(srcs)) return Selector<uint64_t>(std::move(srcs), k, approx).run();
  return Selector<uint32_t>(std::move(srcs), k, approx).run();
}

void check_cpu_dtype(const char* op, const char* name, size_t i, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble, op,
              ": ", name, "[", i, "] must be float32, bfloat16, float16 or float64, got ", d);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
              ", expected the CPU");
}

at::Tensor topk_cpu(const at::Tensor& x, int64_t k, bool approx) {
  check_cpu_dtype("incrkern.topk", "x", 0, x);
  TORCH_CHECK(k >= 0 && k <= x.numel(), "incrkern.topk: k must be in [0, ", x.numel(),
              "], got ", k);
  const at::Tensor xc = x.contiguous();
  Source s{ScoreKind::Signed, xc.scalar_type(), xc.data_ptr(), at::kFloat, nullptr, {}, xc.numel(), 0};
  return run_selection({s}, k, approx)[0];
}

std::vector<at::Tensor> select_cpu(at::TensorList tensors, at::IntArrayRef ks, c10::string_view score,
                                   bool global_scope, bool approx, at::TensorList residuals,
                                   at::TensorList weights, int64_t seed) {
  const char* op = "incrkern.select";
  const SelectArgs a = check_select_args(op, tensors, ks, std::string(score), global_scope,
                                         residuals, weights);
  std::vector<at::Tensor> keep;  // contiguous inputs, alive until the end
  std::vector<Source> srcs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& data_t = a.score == "weight" ? weights[i] : tensors[i];
    check_cpu_dtype(op, a.score == "weight" ? "weights" : "tensors", i, data_t);
    Source s{a.kind, data_t.scalar_type(), nullptr, at::kFloat, nullptr, {}, tensors[i].numel(), 0};
    if (a.kind != ScoreKind::Random) {
      keep.push_back(data_t.contiguous());
      s.data = keep.back().data_ptr();
    }
    if (a.kind == ScoreKind::Accumulated) {
      keep.push_back(residuals[i].contiguous());
      s.res = keep.back().data_ptr();
      s.res_dtype = residuals[i].scalar_type();
    }
    s.rk = random_keys(seed, int64_t(i));
    srcs.push_back(s);
  }
  if (global_scope) {
    int64_t pos = 0;
    for (Source& s : srcs) s.pos0 = pos, pos += s.n;
    return run_selection(srcs, ks[0], approx);
  }
  std::vector<at::Tensor> outs(srcs.size());
  // Small tensors side by side, one thread each; large ones one after another,
  // each over every thread.
  std::vector<int64_t> small, large;
  for (size_t i = 0; i < srcs.size(); ++i)
    (one_thread_selection(srcs[i].n, ks[i]) ? small : large).push_back(int64_t(i));
  parallel_for_claimed(0, int64_t(small.size()), 8, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t i = small[j];
      outs[i] = run_selection({srcs[i]}, ks[i], approx)[0];
    }
  });
  for (int64_t i : large) outs[i] = run_selection({srcs[i]}, ks[i], approx)[0];
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, CPU, m) {
  m.impl("topk", &topk_cpu);
  m.impl("select", &select_cpu);
}

}  // namespace incrkern
