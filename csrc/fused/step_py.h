// What the one-call optimizer steps (fused_step_py.cpp: Adam's and the accumulate_steps
// micro-step; sgd_step_py.cpp: SGD's) share: tensors borrowed from their Python
// objects, the params' state read from the optimizer's state dict, the plain case's
// tests, and the version bumps the op's dispatcher kernel would make. Each call only
// accepts: on anything else it returns None having touched nothing.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "common/versions.h"

namespace incrkern::step_py {

// Tensors borrowed from the Python objects that own them, each object held by a new
// reference meanwhile. A copy of a tensor that has a Python object increments the
// TensorImpl's count and, through the interpreter, the object's: on a model of
// thousands of params, whose metadata a step's streams have pushed out of the cache,
// two waits on memory a tensor (and two more to drop it), where the Python reference
// touches a line the read has just brought in.
class Borrows {
 public:
  Borrows() = default;
  Borrows(const Borrows&) = delete;
  Borrows& operator=(const Borrows&) = delete;
  ~Borrows() {
    for (PyObject* o : held_) Py_DECREF(o);
  }
  at::Tensor borrow(PyObject* tensor) {
    held_.push_back(Py_NewRef(tensor));
    return c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(tensor));
  }
  // Drops borrowed tensors without touching their counts (before the objects go).
  static void forget(std::vector<at::Tensor>& borrowed) {
    for (at::Tensor& t : borrowed) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }

 private:
  std::vector<PyObject*> held_;
};

inline bool exact_tensor(PyObject* o) { return Py_TYPE(o) == (PyTypeObject*)THPVariableClass; }

inline bool plain_on(const at::Tensor& t, const at::Device& device) {
  return t.layout() == at::kStrided && t.device() == device && t.is_contiguous();
}

inline const at::Device kCpu(at::kCPU);

inline bool fused_dtype(at::ScalarType d) {
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// The names read for every param (its state dict's keys), interned
// once: a lookup then reuses the string's hash.
struct Names {
  PyObject* step = PyUnicode_InternFromString("step");
  PyObject* exp_avg = PyUnicode_InternFromString("exp_avg");
  PyObject* exp_avg_sq = PyUnicode_InternFromString("exp_avg_sq");
  PyObject* residual = PyUnicode_InternFromString("residual");
  PyObject* grad_acc = PyUnicode_InternFromString("grad_acc");
  PyObject* fisher = PyUnicode_InternFromString("fisher");
  PyObject* momentum_buffer = PyUnicode_InternFromString("momentum_buffer");
};

inline const Names& names() {
  static const Names interned;
  return interned;
}

// The tensor under `key` in a param's state dict (a plain torch.Tensor), or nullptr.
inline PyObject* state_entry(PyObject* state, PyObject* key) {
  PyObject* t = PyDict_GetItemWithError(state, key);
  return t && exact_tensor(t) ? t : nullptr;
}

// What the calls read the params' state through: the optimizer's state dict, the
// Parameter type, and the step counts seen, which no two params may share.
class StateReader {
 public:
  StateReader(PyObject* state, PyObject* parameter_type)
      : state_(state), parameter_type_(parameter_type) {}

  PyObject* parameter_type() const { return parameter_type_; }

  // The state dict of p (borrowed), or nullptr. The dict is keyed by the params, and a
  // tensor's hash is Tensor.__hash__, a Python method (id(self)) that a plain lookup
  // runs for every param. Where it gives the param's address, checked once a type,
  // the lookup passes that hash instead.
  PyObject* state_of(PyObject* p) {
#if PY_VERSION_HEX < 0x030D0000
    if (hash_is_address(p))
      return _PyDict_GetItem_KnownHash(state_, p, Py_hash_t(reinterpret_cast<intptr_t>(p)));
#endif
    return PyDict_GetItemWithError(state_, p);
  }

  void saw_step(PyObject* step) { steps_.push_back(step); }

  // Whether every step count seen belongs to one param only.
  bool steps_unshared() {
    std::sort(steps_.begin(), steps_.end());
    return std::adjacent_find(steps_.begin(), steps_.end()) == steps_.end();
  }

 private:
  bool hash_is_address(PyObject* p) {
    for (const auto& [type, is_address] : hashes_)
      if (type == Py_TYPE(p)) return is_address;
    const Py_hash_t h = PyObject_Hash(p);
    if (h == -1) PyErr_Clear();
    hashes_.emplace_back(Py_TYPE(p), h == Py_hash_t(reinterpret_cast<intptr_t>(p)));
    return hashes_.back().second;
  }

  PyObject* state_;
  PyObject* parameter_type_;
  std::vector<PyObject*> steps_;
  std::vector<std::pair<PyTypeObject*, bool>> hashes_;
};

// The grad of p (a torch.Tensor or nn.Parameter, no subclass) into `grad`, left
// undefined when p has none; false when p or its grad is not the plain case: a dense,
// contiguous tensor on `device` of p's dtype and shape. The `grad` attribute of such a
// p is this tensor's Python object (made if it has none); read here without making one.
inline bool plain_grad(PyObject* p, PyObject* parameter_type, const at::Device& device,
                       at::Tensor& grad) {
  if (!exact_tensor(p) && Py_TYPE(p) != (PyTypeObject*)parameter_type) return false;
  const at::Tensor& param = THPVariable_Unpack(p);
  const at::Tensor& g = param.grad();
  if (!g.defined()) return true;
  PyObject* object = g.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj();
  if (object && !exact_tensor(object)) return false;
  grad = g;  // a reference of its own: the step may outlive p's hold on it
  return plain_on(param, device) && plain_on(grad, device) &&
         grad.scalar_type() == param.scalar_type() &&
         grad.sizes().equals(param.sizes());
}

// What every group spec of the calls begins with (fast_step._spec_head): (params,
// density, error_feedback, approx, lr, lr_tensor), and its accumulate_steps.
struct SpecHead {
  PyObject* param_list = nullptr;  // the group's params, borrowed from the spec
  double density = 0, lr = 0;
  bool error_feedback = false, approx = false;
  std::optional<at::Tensor> lr_tensor;
  // The update ending a cycle of accumulate_steps = n: the accumulated grads are the
  // kernel's residuals, read times 1 / n, and zeroed afterwards, chosen or not.
  double grad_scale = 1.0;
  bool spends_accumulation = false;
};

// The head of `spec`, a tuple of `size` items whose item `steps_at` is accumulate_steps;
// false when it is not one (or asks for error feedback with accumulate_steps).
inline bool read_spec_head(PyObject* spec, Py_ssize_t size, Py_ssize_t steps_at,
                           SpecHead& out) {
  if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != size) return false;
  auto item = [&](Py_ssize_t i) { return PyTuple_GET_ITEM(spec, i); };
  out.param_list = item(0);
  if (!PyList_Check(out.param_list)) return false;
  out.density = PyFloat_AsDouble(item(1));
  out.error_feedback = PyObject_IsTrue(item(2)) == 1;
  out.approx = PyObject_IsTrue(item(3)) == 1;
  out.lr = PyFloat_AsDouble(item(4));
  if (item(5) != Py_None) {
    if (!exact_tensor(item(5))) return false;
    out.lr_tensor = THPVariable_Unpack(item(5));
  }
  const long accumulate_steps = PyLong_AsLong(item(steps_at));
  out.spends_accumulation = accumulate_steps > 1;
  if (out.spends_accumulation) out.grad_scale = 1.0 / double(accumulate_steps);
  return !(out.spends_accumulation && out.error_feedback) && !PyErr_Occurred();
}

// ops.density_k: the elements a tensor of numel updates at `density`.
inline int64_t density_k(double density, int64_t numel) {
  return std::min(numel, int64_t(std::ceil(density * double(numel))));
}

// scope="global": the elements the concatenation of params updates at `density`.
inline int64_t global_density_k(double density, const std::vector<at::Tensor>& params) {
  int64_t total = 0;
  for (const at::Tensor& p : params) total += p.numel();
  return density_k(density, total);
}

// Params per thread's run in the passes over their metadata.
constexpr int64_t kChecksGrain = 512;

// The version counters of tensors a call wrote, as the op's dispatcher kernel bumps
// them, in runs over the threads: a counter is no Python object, and each is a wait
// on memory once a step's streams have gone through the cache.
inline void bump_over_threads(at::TensorList written) {
  at::parallel_for(0, int64_t(written.size()), kChecksGrain, [&](int64_t b, int64_t e) {
    bump_versions(written.slice(size_t(b), size_t(e - b)));
  });
}

// A group's params and grads, read over the threads before anything else: only their
// objects' fields and the tensors' metadata (no call into the interpreter, which the
// calling thread holds meanwhile), each a wait on memory on a model of thousands of
// params. Each param's size too: read later, it would wait on the TensorImpl again.
struct ParamsRead {
  std::vector<at::Tensor> grads;  // undefined where a param has none
  std::vector<uint8_t> plain;     // plain_grad's answer, the grad (if any) of a fused dtype
  std::vector<int64_t> numels;    // where plain
};

inline ParamsRead read_params(PyObject* params, PyObject* parameter_type,
                              const at::Device& device) {
  const auto n = size_t(PyList_GET_SIZE(params));
  ParamsRead out{std::vector<at::Tensor>(n), std::vector<uint8_t>(n), std::vector<int64_t>(n)};
  at::parallel_for(0, int64_t(n), kChecksGrain, [&](int64_t b, int64_t e) {
    for (auto i = size_t(b); i < size_t(e); ++i) {
      PyObject* p = PyList_GET_ITEM(params, Py_ssize_t(i));
      at::Tensor& grad = out.grads[i];
      out.plain[i] = plain_grad(p, parameter_type, device, grad) &&
                     (!grad.defined() || fused_dtype(grad.scalar_type()));
      if (out.plain[i]) out.numels[i] = THPVariable_Unpack(p).numel();
    }
  });
  return out;
}

// The run [b, e) of a list (an empty one stays empty): the kernels' checks run over the
// threads, a run of params each, as lists of their own.
template <typename List>
List run_of(const List& list, int64_t b, int64_t e) {
  return list.empty() ? list : list.slice(size_t(b), size_t(e - b));
}

// Contiguous tensors zeroed in place over the threads, without a dispatcher call each.
inline void zero_over_threads(at::TensorList tensors) {
  at::parallel_for(0, int64_t(tensors.size()), 1, [&](int64_t b, int64_t e) {
    for (auto i = size_t(b); i < size_t(e); ++i)
      std::memset(tensors[i].data_ptr(), 0, tensors[i].nbytes());
  });
}

// A call's arguments (specs, state, parameter_type): the group specs, and the reader
// of the params' state; false, Python's error set, when they are not a list and a dict.
inline bool parse_call(PyObject* args, PyObject*& specs, std::optional<StateReader>& reader) {
  PyObject *state, *parameter_type;
  if (!PyArg_ParseTuple(args, "O!O!O", &PyList_Type, &specs, &PyDict_Type, &state,
                        &parameter_type))
    return false;
  reader.emplace(state, parameter_type);
  return true;
}

// Each group of `groups` (one per spec) read by read(spec, reader, group); false, its
// Python error (if any) cleared, at the first that is not the plain case.
template <typename Group, typename Read>
bool read_groups(PyObject* specs, StateReader& reader, std::vector<Group>& groups, Read read) {
  for (size_t i = 0; i < groups.size(); ++i)
    if (!read(PyList_GET_ITEM(specs, Py_ssize_t(i)), reader, groups[i])) {
      PyErr_Clear();
      return false;
    }
  return true;
}

// A Python list of bools, one per group: had(group).
template <typename Group, typename Had>
PyObject* bools_of(const std::vector<Group>& groups, Had had) {
  PyObject* answer = PyList_New(Py_ssize_t(groups.size()));
  if (!answer) return nullptr;
  for (size_t i = 0; i < groups.size(); ++i)
    PyList_SET_ITEM(answer, Py_ssize_t(i), PyBool_FromLong(had(groups[i])));
  return answer;
}

struct WithoutGil {
  PyThreadState* saved = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(saved); }
};

}  // namespace incrkern::step_py
