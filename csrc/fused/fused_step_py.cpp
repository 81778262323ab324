// incrkern._C.fused_adam_step: the common incremental Adam step in one call from
// Python, on the CPU or one GPU; incrkern._C.accumulate_grads: a micro-step of
// accumulate_steps on the CPU. On a model of many small tensors a step spent more
// time in Python, reading each param's grad and state and checking them, and in the
// dispatcher boxing the tensor lists than in its kernels (docs/measurements.md,
// "Python overhead of a step"). These calls read the same things from the same
// objects and call the kernels directly.
//
// It only accepts; it never reports. Anything it does not recognise as the plain
// case (a missing state, a grad of another dtype, a subclass, a shared step count)
// makes it return None before it touches anything, and the optimizer's Python step
// then does the step, with its errors. The params the cost model sends to select
// then update are checked like the rest and handed back to the Python step.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_zero.h>
#include <ATen/ops/randint.h>
#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>

#include <optional>
#include <utility>
#include <vector>

#include "accumulate/accumulate_checks.h"
#include "accumulate/accumulate_cpu.h"
#include "common/versions.h"
#include "fused/fused_checks.h"
#include "fused/fused_cpu.h"
#include "fused/step_py.h"

namespace incrkern {

SelectUpdateKernel cuda_select_update_kernel = nullptr;

namespace {

using namespace step_py;

struct Group : SpecHead {
  Group() = default;
  Group(const Group&) = delete;
  ~Group() {
    for (auto* list : {&params, &exp_avgs, &exp_avg_sqs, &steps, &residuals, &scores})
      Borrows::forget(*list);
  }
  Borrows borrows;
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, steps, residuals;  // borrowed
  std::vector<at::Tensor> scores;  // borrowed: the Fishers of select="grad_sq"
  std::vector<at::Tensor> grads;
  std::vector<int64_t> ks;
  std::vector<PyObject*> elsewhere;  // borrowed from the group's list
  bool any_grad = false;
  double beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, maximize;
  // Where the CPU kernel's keys come from: |g|, |p| (select="weight"), the Fisher
  // (select="grad_sq", its EMA by fisher_beta formed by the CPU kernel, first on a GPU)
  // or the hash of the indices (select="random", its seed drawn once the call is known
  // to step).
  KeyFrom key_from = KeyFrom::Grad;
  int64_t seed = 0;
  double fisher_beta = 0.0;
  // scope="global" (CPU, |g| or error feedback): the k of the concatenation.
  std::optional<int64_t> global_k;
};

// The Python constants of incrkern.optim.base (FUSED_SMALL_NUMEL, FUSED_MIN_DENSITY)
// with the rule of its use_fused and of ops.density_k.
struct CostModel {
  int64_t small_numel;
  double min_density;
  bool fused(int64_t numel, double density, bool error_feedback) const {
    return numel <= small_numel || error_feedback || density >= min_density;
  }
};

// (params, density, error_feedback, approx, lr, lr_tensor, beta1, beta2, eps,
//  weight_decay, decoupled_weight_decay, maximize, accumulate_steps, score, fisher_beta,
//  global_scope) into `out`, every tensor on `device`; false when not the plain case.
// score: the kernel's, "grad", "weight", "grad_sq" or "random". On a GPU every param
// takes the fused kernel (the optimizer's rule there); the other scores than "grad"
// have a CPU kernel only, and on the CPU every param takes it, as every param of a
// global group does (CPU, "grad", no accumulate_steps).
bool read_group(PyObject* spec, StateReader& reader, const CostModel& cost,
                const at::Device& device, Group& out) {
  if (!read_spec_head(spec, 16, 12, out)) return false;
  auto item = [&](int i) { return PyTuple_GET_ITEM(spec, i); };
  PyObject* params = out.param_list;
  out.beta1 = PyFloat_AsDouble(item(6));
  out.beta2 = PyFloat_AsDouble(item(7));
  out.eps = PyFloat_AsDouble(item(8));
  out.weight_decay = PyFloat_AsDouble(item(9));
  out.decoupled_weight_decay = PyObject_IsTrue(item(10)) == 1;
  out.maximize = PyObject_IsTrue(item(11)) == 1;
  const char* score = PyUnicode_Check(item(13)) ? PyUnicode_AsUTF8(item(13)) : nullptr;
  const std::optional<KeyFrom> key_from = score ? key_from_score(score) : std::nullopt;
  if (!key_from) return false;
  out.key_from = *key_from;
  if (out.key_from != KeyFrom::Grad &&
      (out.error_feedback || out.spends_accumulation || !device.is_cpu()))
    return false;
  out.fisher_beta = PyFloat_AsDouble(item(14));
  if (PyErr_Occurred()) return false;
  const bool global_scope = PyObject_IsTrue(item(15)) == 1;
  if (global_scope &&
      (!device.is_cpu() || out.key_from != KeyFrom::Grad || out.spends_accumulation))
    return false;

  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (auto* list : {&out.params, &out.grads, &out.exp_avgs, &out.exp_avg_sqs, &out.steps})
    list->reserve(size_t(n));
  out.ks.reserve(size_t(n));
  ParamsRead read = read_params(params, reader.parameter_type(), device);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    if (!read.plain[size_t(i)]) return false;
    at::Tensor& grad = read.grads[size_t(i)];
    if (!grad.defined()) continue;
    const int64_t numel = read.numels[size_t(i)];
    PyObject* s = reader.state_of(p);
    if (!s || !PyDict_Check(s)) return false;
    PyObject* step = state_entry(s, names().step);
    PyObject* m = state_entry(s, names().exp_avg);
    PyObject* v = state_entry(s, names().exp_avg_sq);
    const bool needs_r = out.error_feedback || out.spends_accumulation;
    PyObject* r = needs_r ? state_entry(s, out.error_feedback ? names().residual
                                                              : names().grad_acc)
                          : nullptr;
    PyObject* f =
        out.key_from == KeyFrom::Scores ? state_entry(s, names().fisher) : nullptr;
    if (!step || !m || !v || (needs_r && !r) || (out.key_from == KeyFrom::Scores && !f))
      return false;
    reader.saw_step(step);
    out.any_grad = true;
    if (device.is_cpu() && out.key_from == KeyFrom::Grad && !global_scope &&
        !cost.fused(numel, out.density, out.error_feedback)) {
      out.elsewhere.push_back(p);
      continue;
    }
    out.params.push_back(out.borrows.borrow(p));
    out.grads.push_back(std::move(grad));
    out.exp_avgs.push_back(out.borrows.borrow(m));
    out.exp_avg_sqs.push_back(out.borrows.borrow(v));
    out.steps.push_back(out.borrows.borrow(step));
    if (r) out.residuals.push_back(out.borrows.borrow(r));
    if (f) out.scores.push_back(out.borrows.borrow(f));
    out.ks.push_back(density_k(out.density, numel));
  }
  if (global_scope) out.global_k = global_density_k(out.density, out.params);
  return true;
}

// A group's step by the op's kernel (its checks, then the step), as the dispatcher
// would call it, and the written tensors' versions bumped after, as the op's
// ADInplaceOrView kernel bumps them: on a GPU the CUDA kernel, on the current stream,
// nothing read back. Through the dispatcher, the op's boxed ADInplaceOrView kernel
// would copy every tensor of its lists, a wait on memory each (docs/design.md).
void step_by_op_kernel(SelectUpdateKernel kernel, const Group& g) {
  kernel(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, g.ks, g.residuals, g.approx,
         g.lr, g.beta1, g.beta2, g.eps, g.weight_decay, g.decoupled_weight_decay, g.maximize,
         g.grad_scale, g.lr_tensor, /*increment_steps=*/true, std::nullopt, std::nullopt,
         score_name(g.key_from),
         g.scores.empty() ? std::nullopt : std::optional<at::TensorList>(g.scores), g.seed);
  for (const std::vector<at::Tensor>* written :
       {&g.params, &g.exp_avgs, &g.exp_avg_sqs, &g.steps, &g.residuals})
    bump_over_threads(*written);
  if (g.spends_accumulation) at::_foreach_zero_(g.residuals);
}

// fused_adam_step(groups, state, parameter_type, small_numel, min_density, cuda_index,
// through_op): every tensor on the CPU (cuda_index -1) or on that CUDA device. Per
// group, None when none of its params has a grad, else the list of params with grads
// it left to the Python step (select then update); None in place of the whole list
// when the step is not the plain case and nothing was touched. A GPU's groups (and,
// with through_op, the CPU's) take the op's kernel (step_by_op_kernel); the CPU's
// take its checked step directly.
PyObject* fused_adam_step(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *specs, *state, *parameter_type;
  long long small_numel;
  double min_density;
  int cuda_index = -1, through_op = 0;
  if (!PyArg_ParseTuple(args, "O!O!OLdip", &PyList_Type, &specs, &PyDict_Type, &state,
                        &parameter_type, &small_numel, &min_density, &cuda_index, &through_op))
    return nullptr;
  const at::Device device =
      cuda_index < 0 ? kCpu : at::Device(at::kCUDA, c10::DeviceIndex(cuda_index));
  const SelectUpdateKernel op_kernel =
      !device.is_cpu() ? cuda_select_update_kernel
                       : through_op ? &adam_select_update_cpu : nullptr;
  if (!device.is_cpu() && !op_kernel) Py_RETURN_NONE;
  const CostModel cost{int64_t(small_numel), min_density};
  const Py_ssize_t n = PyList_GET_SIZE(specs);
  std::vector<Group> groups(static_cast<size_t>(n));
  StateReader reader(state, parameter_type);
  const auto read = [&](PyObject* spec, StateReader& r, Group& g) {
    return read_group(spec, r, cost, device, g);
  };
  if (!read_groups(specs, reader, groups, read) || !reader.steps_unshared()) Py_RETURN_NONE;
  for (const Group& g : groups)  // the op's kernels select per tensor
    if (g.global_k && op_kernel) Py_RETURN_NONE;
  // Every group's lists pass the kernel's checks before any group is stepped. Only
  // whether they pass matters here (the Python step raises its own errors), so each
  // thread checks a run of the params as lists of their own.
  try {
    for (const Group& g : groups)
      at::parallel_for(0, int64_t(g.params.size()), kChecksGrain, [&](int64_t b, int64_t e) {
        const auto run = [&](const auto& list) { return run_of(list, b, e); };
        check_select_update(device.type(), run(at::TensorList(g.params)),
                            run(at::TensorList(g.grads)), run(at::TensorList(g.exp_avgs)),
                            run(at::TensorList(g.exp_avg_sqs)), run(at::TensorList(g.steps)),
                            run(at::IntArrayRef(g.ks)), run(at::TensorList(g.residuals)),
                            g.lr_tensor, std::nullopt, std::nullopt);
        if (g.key_from != KeyFrom::Scores) return;
        check_select_update_score("grad_sq", run(at::TensorList(g.params)), {},
                                  run(at::TensorList(g.scores)), device.type());
        check_accumulate_lists("incrkern.accumulate_", {}, run(at::TensorList(g.grads)),
                               run(at::TensorList(g.scores)), /*allow_double=*/true);
      });
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  // The random score's seed of each group stepped, in group order, drawn as
  // ops.adam_select_update_ draws it: torch.randint(0, 2**62, (1,)) from the default
  // CPU generator.
  for (Group& g : groups)
    if (g.key_from == KeyFrom::Random && !g.params.empty())
      g.seed = at::randint(0, int64_t(1) << 62, {1}, at::TensorOptions().dtype(at::kLong))
                   .item<int64_t>();
  {
    WithoutGil released;
    for (const Group& g : groups) {
      if (g.params.empty()) continue;
      const bool fisher = g.key_from == KeyFrom::Scores;
      if (op_kernel) {
        if (fisher) {  // the Fisher first, as the Python step
          RECORD_FUNCTION("incrkern::accumulate_", std::vector<c10::IValue>());
          accumulate_checked({}, g.grads, 1.0, g.scores, 1.0 - g.fisher_beta, g.fisher_beta,
                             std::nullopt, std::nullopt);
        }
        RECORD_FUNCTION("incrkern::adam_select_update_", std::vector<c10::IValue>());
        step_by_op_kernel(op_kernel, g);
        continue;
      }
      // The CPU kernel forms the Fisher's EMA where it reads the keys: a large tensor's
      // by the pass that lists or counts them, one read of g and f for both.
      RECORD_FUNCTION("incrkern::adam_select_update_", std::vector<c10::IValue>());
      adam_select_update_checked(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, g.ks,
                                 g.residuals, g.approx, g.lr, g.beta1, g.beta2, g.eps,
                                 g.weight_decay, g.decoupled_weight_decay, g.maximize,
                                 g.grad_scale, g.lr_tensor,
                                 Bookkeeping{.increment_steps = true, .steps_distinct = true,
                                             .bump_written = true},
                                 std::nullopt, std::nullopt, g.key_from, g.scores, g.seed,
                                 fisher ? std::optional<double>(g.fisher_beta) : std::nullopt,
                                 g.global_k);
      if (g.spends_accumulation) zero_over_threads(g.residuals);  // contiguous: checked
    }
  }
  for (const Group& g : groups) bump_over_threads(g.scores);  // accumulate_'s, as its op's
  PyObject* answer = PyList_New(n);
  if (!answer) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Group& g = groups[size_t(i)];
    PyObject* left = Py_None;
    if (g.any_grad) {
      left = PyList_New(Py_ssize_t(g.elsewhere.size()));
      if (!left) return Py_DECREF(answer), nullptr;
      for (size_t j = 0; j < g.elsewhere.size(); ++j) {
        Py_INCREF(g.elsewhere[j]);
        PyList_SET_ITEM(left, Py_ssize_t(j), g.elsewhere[j]);
      }
    } else {
      Py_INCREF(Py_None);
    }
    PyList_SET_ITEM(answer, i, left);
  }
  return answer;
  END_HANDLE_TH_ERRORS
}

// The accumulators and grads of one group's micro-step.
struct Accumulation {
  Accumulation() = default;
  Accumulation(const Accumulation&) = delete;
  ~Accumulation() { Borrows::forget(accs); }
  Borrows borrows;
  std::vector<at::Tensor> accs;  // borrowed
  std::vector<at::Tensor> grads;
  double alpha = 1.0;
};

// (params, buffer name, alpha) into `out`; false when not the plain case.
bool read_accumulation(PyObject* spec, StateReader& reader, Accumulation& out) {
  if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3) return false;
  PyObject* params = PyTuple_GET_ITEM(spec, 0);
  PyObject* buffer = PyTuple_GET_ITEM(spec, 1);
  out.alpha = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 2));
  if (!PyList_Check(params) || !PyUnicode_Check(buffer) || PyErr_Occurred()) return false;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    at::Tensor grad;
    if (!plain_grad(p, reader.parameter_type(), kCpu, grad)) return false;
    if (!grad.defined()) continue;
    PyObject* s = reader.state_of(p);
    if (!s || !PyDict_Check(s)) return false;
    PyObject* acc = state_entry(s, buffer);
    // A param updated before has a step, which no other param may share.
    PyObject* step = PyDict_GetItemWithError(s, names().step);
    if (!acc || PyErr_Occurred()) return false;
    if (step) reader.saw_step(step);
    out.accs.push_back(out.borrows.borrow(acc));
    out.grads.push_back(std::move(grad));
  }
  return true;
}

// accumulate_grads(groups, state, parameter_type): a micro-step of accumulate_steps,
// every group's grads added, times its alpha, to a buffer of each param's state
// (grad_acc, or the residual of error feedback). Per group, whether any of its params
// had a grad; None when the step is not the plain case and nothing was touched.
PyObject* accumulate_grads(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* specs;
  std::optional<StateReader> reader;
  if (!parse_call(args, specs, reader)) return nullptr;
  std::vector<Accumulation> groups(size_t(PyList_GET_SIZE(specs)));
  if (!read_groups(specs, *reader, groups, read_accumulation) || !reader->steps_unshared())
    Py_RETURN_NONE;
  try {
    for (const Accumulation& g : groups)
      check_accumulate_lists("incrkern.accumulate_", g.accs, g.grads, {}, /*allow_double=*/true);
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  {
    WithoutGil released;
    for (const Accumulation& g : groups) {
      if (g.grads.empty()) continue;
      RECORD_FUNCTION("incrkern::accumulate_", std::vector<c10::IValue>());
      accumulate_checked(g.accs, g.grads, g.alpha, {}, 1.0, 1.0, std::nullopt, std::nullopt);
    }
  }
  for (const Accumulation& g : groups) bump_over_threads(g.accs);
  return bools_of(groups, [](const Accumulation& g) { return !g.grads.empty(); });
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef kFusedStepMethods[] = {
    {"fused_adam_step", fused_adam_step, METH_VARARGS,
     "The common incremental Adam step on the CPU in one call, or None (not touched)."},
    {"accumulate_grads", accumulate_grads, METH_VARARGS,
     "A micro-step of accumulate_steps on the CPU in one call, or None (not touched)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace incrkern
