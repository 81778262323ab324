// incrkern._C.fused_sgd_step: the common incremental SGD step on the CPU in one call
// from Python, as fused_adam_step is Adam's (fused_step_py.cpp). On a model of many
// small tensors the Python step (each param's grad and state read, checked and boxed
// for the dispatcher) took longer than SGD's fused kernel. This call reads the same
// things from the same objects and calls the kernel directly.
//
// It only accepts: a missing state (a param's first step, or a momentum buffer or
// residual not made yet: the Python step makes it), a grad of another dtype or layout, a subclass, or any list
// the kernel's checks refuse makes it return None before it touches anything, and the
// optimizer's Python step then does the step, with its errors.
#include <ATen/core/List.h>
#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>

#include <optional>
#include <vector>

#include "fused/fused_cpu.h"
#include "fused/step_py.h"

namespace incrkern {
namespace {

using namespace step_py;

struct SgdGroup : SpecHead {
  SgdGroup() = default;
  SgdGroup(const SgdGroup&) = delete;
  ~SgdGroup() {
    for (auto* list : {&params, &buffers, &residuals}) Borrows::forget(*list);
  }
  Borrows borrows;
  std::vector<at::Tensor> params, buffers, residuals;  // borrowed
  std::vector<at::Tensor> grads;
  std::vector<int64_t> ks;
  bool any_grad = false;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize;
  std::optional<int64_t> global_k;  // scope="global": the k of the concatenation
};

// (params, density, error_feedback, approx, lr, lr_tensor, momentum, dampening,
//  weight_decay, nesterov, maximize, accumulate_steps, global_scope) into `out`, every
// tensor on the CPU; false when not the plain case (a global group with
// accumulate_steps among them). Every param with a grad takes the kernel.
bool read_sgd_group(PyObject* spec, StateReader& reader, SgdGroup& out) {
  if (!read_spec_head(spec, 13, 11, out)) return false;
  auto item = [&](int i) { return PyTuple_GET_ITEM(spec, i); };
  PyObject* params = out.param_list;
  out.momentum = PyFloat_AsDouble(item(6));
  out.dampening = PyFloat_AsDouble(item(7));
  out.weight_decay = PyFloat_AsDouble(item(8));
  out.nesterov = PyObject_IsTrue(item(9)) == 1;
  out.maximize = PyObject_IsTrue(item(10)) == 1;
  const bool global_scope = PyObject_IsTrue(item(12)) == 1;
  if (PyErr_Occurred() || (global_scope && out.spends_accumulation)) return false;

  const bool needs_buffer = out.momentum != 0;
  const bool needs_r = out.error_feedback || out.spends_accumulation;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (auto* list : {&out.params, &out.grads, &out.buffers, &out.residuals})
    list->reserve(size_t(n));
  out.ks.reserve(size_t(n));
  ParamsRead read = read_params(params, reader.parameter_type(), kCpu);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    if (!read.plain[size_t(i)]) return false;
    at::Tensor& grad = read.grads[size_t(i)];
    if (!grad.defined()) continue;
    out.any_grad = true;
    // Every param stepped before has a state dict, empty without momentum or a residual
    // (the Python step makes it, as the optimizer's state_dict then shows).
    PyObject* s = reader.state_of(p);
    if (!s || !PyDict_Check(s)) return false;
    PyObject* buffer = needs_buffer ? state_entry(s, names().momentum_buffer) : nullptr;
    PyObject* r = needs_r ? state_entry(s, out.error_feedback ? names().residual
                                                              : names().grad_acc)
                          : nullptr;
    if ((needs_buffer && !buffer) || (needs_r && !r)) return false;
    out.params.push_back(out.borrows.borrow(p));
    out.grads.push_back(std::move(grad));
    if (buffer) out.buffers.push_back(out.borrows.borrow(buffer));
    if (r) out.residuals.push_back(out.borrows.borrow(r));
    out.ks.push_back(density_k(out.density, read.numels[size_t(i)]));
  }
  if (global_scope) out.global_k = global_density_k(out.density, out.params);
  return true;
}

// fused_sgd_step(groups, state, parameter_type): every tensor on the CPU. Per group,
// whether any of its params had a grad; None when the step is not the plain case and
// nothing was touched.
PyObject* fused_sgd_step(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* specs;
  std::optional<StateReader> reader;
  if (!parse_call(args, specs, reader)) return nullptr;
  std::vector<SgdGroup> groups(size_t(PyList_GET_SIZE(specs)));
  if (!read_groups(specs, *reader, groups, read_sgd_group)) Py_RETURN_NONE;
  // Every group's lists pass the kernel's checks before any group is stepped, a run
  // of params per thread (only whether they pass matters: the Python step raises).
  const c10::List<bool> no_first_steps;  // every buffer exists: none is new
  try {
    for (const SgdGroup& g : groups)
      at::parallel_for(0, int64_t(g.params.size()), kChecksGrain, [&](int64_t b, int64_t e) {
        const auto run = [&](const auto& list) { return run_of(list, b, e); };
        check_sgd_select_update(c10::DeviceType::CPU, run(at::TensorList(g.params)),
                                run(at::TensorList(g.grads)), run(at::TensorList(g.buffers)),
                                run(at::IntArrayRef(g.ks)), run(at::TensorList(g.residuals)),
                                no_first_steps, g.momentum, g.lr_tensor, std::nullopt,
                                std::nullopt);
      });
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  {
    WithoutGil released;
    for (const SgdGroup& g : groups) {
      if (g.params.empty()) continue;
      RECORD_FUNCTION("incrkern::sgd_select_update_", std::vector<c10::IValue>());
      sgd_select_update_checked(g.params, g.grads, g.buffers, g.ks, g.residuals, no_first_steps,
                                g.approx, g.lr, g.momentum, g.dampening, g.weight_decay,
                                g.nesterov, g.maximize, g.grad_scale, g.lr_tensor, std::nullopt,
                                std::nullopt, g.global_k);
      if (g.spends_accumulation) zero_over_threads(g.residuals);  // contiguous: checked
    }
  }
  // The tensors the op writes, their versions bumped as its dispatcher kernel would.
  for (const SgdGroup& g : groups)
    for (const std::vector<at::Tensor>* written : {&g.params, &g.buffers, &g.residuals})
      bump_over_threads(*written);
  return bools_of(groups, [](const SgdGroup& g) { return g.any_grad; });
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef kSgdStepMethods[] = {
    {"fused_sgd_step", fused_sgd_step, METH_VARARGS,
     "The common incremental SGD step on the CPU in one call, or None (not touched)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace incrkern
