// Every incrkern op's schema, in one place. The kernels register themselves beside
// their code (TORCH_LIBRARY_IMPL in csrc/<family>/), the fake kernels in
// incrkern/ops.py. In-place list arguments carry alias annotations (Tensor(a!)[]).
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "common/versions.h"

namespace incrkern {
extern PyMethodDef kFusedStepMethods[];    // csrc/fused/fused_step_py.cpp
extern PyMethodDef kSgdStepMethods[];       // csrc/fused/sgd_step_py.cpp
extern PyMethodDef kSelectOnHostMethods[];  // csrc/select/select_on_host_cpu.cpp
extern PyMethodDef kFusedOnHostMethods[];   // csrc/fused/fused_on_host_cpu.cpp
}

// `import incrkern._C` runs the static registrations below. The module's functions
// are the optimizers' fast steps and micro-step, written against the C API, and two
// test hooks running the CUDA select's and fused step's passes on the host: the ops
// themselves are reached through torch.ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          incrkern::kFusedStepMethods};
  PyObject* module = PyModule_Create(&module_def);
  if (module && (PyModule_AddFunctions(module, incrkern::kSgdStepMethods) < 0 ||
                 PyModule_AddFunctions(module, incrkern::kSelectOnHostMethods) < 0 ||
                 PyModule_AddFunctions(module, incrkern::kFusedOnHostMethods) < 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(incrkern, m) {
  // update family: SGD / Adam / AdamW over many tensors.
  //  indices empty: every element (dense); else one int64 list of flat positions per
  //    tensor, and only those elements (and their state) change.
  //  masks empty: no mask; else one bool tensor per param, update where true.
  //  compact_state: state tensors are k long, indexed by position in `indices`.
  //  ages empty: bias correction from steps[i]; else an int32 age per state element,
  //    incremented where updated.
  //  grads are read times grad_scale; consume_grad zeroes what was read.
  //  steps are float32 scalars: the update count this call applies, or the count
  //    before it with increment_steps (the op adds one first, saving a launch).
  //  lr_tensor: when given, a float32 scalar on the params' device read instead of lr
  //    (lets a CUDA graph replay with a new learning rate).
  //  max_exp_avg_sqs: empty for Adam; else AMSGrad, one per param like exp_avg_sqs:
  //    the largest exp_avg_sq so far, NaN-propagating as torch.maximum, which the
  //    denominator uses.
  //  amp_scale, found_inf (every op of the update, fused and accumulate families):
  //    torch.amp.GradScaler's loss scale and inf flag, float32 scalars on the params'
  //    device. Grads are read times fp32(grad_scale) * (1 / amp_scale) (accumulate:
  //    alpha and sq_alpha times 1 / amp_scale and its square; the fused op with
  //    residuals: r + g / amp_scale, then grad_scale); found_inf != 0: nothing changes.
  m.def(
      "adam_update_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(f!)[] steps, Tensor[] indices, Tensor[] masks, "
      "Tensor(e!)[] ages, Tensor(g!)[] max_exp_avg_sqs, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay, bool maximize, "
      "float grad_scale=1.0, bool consume_grad=False, bool compact_state=False, "
      "Tensor? lr_tensor=None, bool increment_steps=False, Tensor? amp_scale=None, "
      "Tensor? found_inf=None) -> ()");
  //  first_step[i]: the momentum buffer is new and takes d_p as it is (torch.optim.SGD).
  //  momentum_buffers empty when momentum == 0.
  m.def(
      "sgd_update_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor[] indices, Tensor[] masks, bool[] first_step, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, "
      "float grad_scale=1.0, bool consume_grad=False, bool compact_state=False, "
      "Tensor? lr_tensor=None, Tensor? amp_scale=None, Tensor? found_inf=None) -> ()");

  // fused select-and-update: per tensor, the ks[i] largest |grads[i]| (with residuals:
  //  |residuals[i] + grads[i]|, error feedback) updated by Adam, as select(score="grad")
  //  then adam_update_ at its positions; residuals become r + g, 0 where chosen.
  //  Returns the number of elements updated per tensor (int64): ks[i], or with approx
  //  a count near it (see incrkern.ops.adam_select_update_). score="weight" (CPU, no
  //  residuals): the ks[i] largest |params[i]|, as select(score="weight"); score=
  //  "grad_sq" (CPU, no residuals): the ks[i] largest scores[i] (a Fisher, >= 0), as
  //  select(scores, score="grad_sq"); score="random" (CPU, no residuals): the ks[i]
  //  largest hashes of (seed, i, index), as select(score="random") given that seed.
  m.def(
      "adam_select_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(f!)[] steps, int[] ks, Tensor(e!)[] residuals, "
      "bool approx, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, bool maximize, float grad_scale=1.0, "
      "Tensor? lr_tensor=None, bool increment_steps=False, Tensor? amp_scale=None, "
      "Tensor? found_inf=None, str score=\"grad\", Tensor[]? scores=None, int seed=0) -> Tensor");

  // SGD's fused select-and-update (CPU): per tensor, the ks[i] largest |grads[i]|
  //  (with residuals, |r + g|, as adam_select_update_) updated as sgd_update_ updates
  //  them, every other element and its buffer left as they are: select(score="grad")
  //  then sgd_update_ at its positions. Returns the number updated per tensor (ks[i],
  //  or with approx a count near it).
  m.def(
      "sgd_select_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(c!)[] momentum_buffers, "
      "int[] ks, Tensor(e!)[] residuals, bool[] first_step, bool approx, float lr, "
      "float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, float grad_scale=1.0, "
      "Tensor? lr_tensor=None, Tensor? amp_scale=None, Tensor? found_inf=None) -> Tensor");

  // accumulate family: acc += alpha * g; sq = sq_decay * sq + sq_alpha * g * g.
  // Either list of accumulators may be empty; accumulators are fp32 (fp64 for fp64 grads).
  m.def(
      "accumulate_(Tensor(a!)[] accs, Tensor[] grads, float alpha, "
      "Tensor(b!)[] sq_accs, float sq_alpha=1.0, float sq_decay=1.0, Tensor? amp_scale=None, "
      "Tensor? found_inf=None) -> ()");

  // select family: indices (int64, ascending) of the k largest scores.
  m.def("topk(Tensor x, int k, bool approx=False) -> Tensor");
  //  score: "grad" |t|, "grad_sq" t (an EMA of g^2), "weight" |weights[i]|,
  //  "accumulated" |residuals[i] + t|, "random" uniform from `seed`.
  //  global_scope: ks has one entry, taken over the concatenation of all tensors.
  //  No defaults before residuals/weights: a default may not precede a required
  //  argument (torch.fx and opcheck reject the schema), and Tensor[] takes none.
  m.def(
      "select(Tensor[] tensors, int[] ks, str score, bool global_scope, bool approx, "
      "Tensor[] residuals, Tensor[] weights, int seed=0) -> Tensor[]");
  // masks[i] (bool, contiguous, tensors[i].numel() elements) set to the elements
  //  select(exact, the same scope) chooses in tensors[i], every other element cleared.
  m.def(
      "select_mask_(Tensor(a!)[] masks, Tensor[] tensors, int[] ks, str score, "
      "Tensor[] residuals, Tensor[] weights, int seed=0, bool global_scope=False) -> ()");
}

namespace {

// The ADInplaceOrView kernel of the in-place ops (common/versions.h): the kernels below
// this key run, then every tensor of every argument the schema marks written (a!) has
// its version bumped. A call that throws bumps nothing: it changed nothing.
void bump_written_after(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<c10::IValue> written;
  for (size_t i = 0; i < arguments.size(); ++i)
    if (arguments[i].alias_info() && arguments[i].alias_info()->isWrite())
      written.push_back((*stack)[first + i]);
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const c10::IValue& value : written) {
    if (value.isTensor()) incrkern::bump_versions({value.toTensor()});
    else if (value.isTensorList()) incrkern::bump_versions(value.toTensorVector());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(incrkern, ADInplaceOrView, m) {
  for (const char* name : {"adam_update_", "sgd_update_", "adam_select_update_",
                           "sgd_select_update_", "accumulate_", "select_mask_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_after>());
}
