// incrkern._C.cuda_fused_on_host (Adam's) and cuda_sgd_fused_on_host (SGD's): the
// CUDA fused select-and-update (fused_cuda_ops.cpp, then fused_cuda.cu) run on the
// host over CPU tensors, so that the CPU tests hold what the GPU runs to the
// reference. The glue's code builds the groups, the tensor table and the options
// (fused_table.h); the select's host run (select_on_host.h) settles every group with
// the kernels' digit logic; the fused pass then runs each chunk's kFusedSplit blocks
// and their threads in turn over fused_pass.h's split, element step and update, with
// update_ops.h's AdamOp or SgdOp. What the kernel takes on trust is
// checked here: the blocks' shares and their threads' packs cover every element of a
// chunk once, and every pack starts kILP-aligned in its tensor.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/cuda_dtype.h"
#include "common/cuda_glue.h"
#include "fused/fused_checks.h"
#include "fused/fused_cpu.h"
#include "fused/fused_pass.h"
#include "fused/fused_table.h"
#include "select/select_on_host.h"
#include "update/update_ops.h"

namespace incrkern {
namespace {

using cuda::FusedTensor;
using cuda::kILP;
using cuda::SelChunk;
using cuda::SelSeg;
using cuda::SelState;

// fused_kernel, block (ci, y) then thread by thread, over params and grads of type T
// (float, or c10's BFloat16 and Half, which convert as the kernel's intrinsics do:
// exactly to float, to nearest even back), with `op`'s rule. Returns the elements it
// visited; counts[f.index] gains the block's updates.
template <typename T, typename Op>
int64_t fused_block(host_run::HostLaunch& L, size_t ci, int y,
                    const std::vector<FusedTensor>& table, const Op& op,
                    const cuda::UpdateOptions& opt, int64_t* counts,
                    std::vector<uint8_t>& visits) {
  const SelChunk& ch = L.t.chunks[ci];
  int64_t begin, end;
  cuda::fused_share(ch.begin, ch.end, y, kILP, begin, end);
  if (begin >= end || cuda::skipped(opt)) return 0;
  const SelSeg& s = L.seg(ch);
  const SelState& st = L.state(ch);
  const FusedTensor& f = table[size_t(ch.seg)];
  const typename Op::Coeff c = op.prepare(f.update, opt);
  const cuda::FusedScales scales = cuda::fused_scales(f.residual != nullptr, opt, s.amp_scale);
  auto* p = static_cast<T*>(f.update.param);
  const auto* g = static_cast<const T*>(f.update.grad);
  float* r = f.residual;
  int64_t visited = 0, taken = 0;
  for (int thread = 0; thread < cuda::kFusedThreads; ++thread) {
    for (int64_t i = begin + int64_t(thread) * kILP; i < end;
         i += int64_t(cuda::kFusedThreads) * kILP) {
      TORCH_CHECK(i % kILP == 0, "chunk ", ci, " block ", y, ": a pack starts at element ",
                  i, ", not a multiple of ", kILP);
      const int valid = int(std::min<int64_t>(kILP, end - i));
      float u[kILP] = {}, kept[kILP] = {};
      for (int j = 0; j < valid; ++j) {
        u[j] = float(g[i + j]);
        if (r) kept[j] = r[i + j];
        TORCH_CHECK(visits[size_t(i + j)]++ == 0, "chunk ", ci, " block ", y,
                    ": element ", i + j, " visited twice");
      }
      visited += valid;
      taken += cuda::fused_elements(st, s.pos0 + i, valid, r != nullptr, scales, u, kept,
                                    [&](int j, float scaled) {
                                      cuda::fused_update(
                                          f, p, op, c, i + j, scaled,
                                          [](T x) { return float(x); },
                                          [](float x) { return T(x); });
                                    });
      for (int j = 0; r && j < valid; ++j) r[i + j] = kept[j];
    }
  }
  counts[f.index] += taken;
  return visited;
}

// The selection of every group settled on the host, as the glue plans it and
// select_find runs it: by |g|, or with residuals by |r + g * residual_amp|.
host_run::HostLaunch settle_on_host(const std::vector<at::Tensor>& params,
                                    const std::vector<at::Tensor>& grads,
                                    const std::vector<at::Tensor>& residuals,
                                    const cuda::SelectGroups& groups, bool approx,
                                    const float* residual_amp) {
  host_run::HostLaunch L;
  std::vector<int64_t> numels;
  for (const at::Tensor& p : params) numels.push_back(p.numel());
  L.t = cuda::select_tables(numels, groups.groups, groups.ks, approx,
                            [&](SelSeg& s, size_t i) {
                              s.data = grads[i].data_ptr();
                              s.res = residuals.empty() ? nullptr
                                                        : residuals[i].data_ptr<float>();
                              s.amp_scale = residual_amp;
                              s.dtype = *cuda_dtype_of(params[i].scalar_type());
                            });
  for (size_t i = 0; i < params.size(); ++i)
    L.keys.push_back(host_run::keys_of(
        residuals.empty() ? ScoreKind::Abs : ScoreKind::Accumulated,
        grads[i].to(at::kFloat).const_data_ptr<float>(),
        residuals.empty() ? nullptr : residuals[i].const_data_ptr<float>(),
        amp_fold(1.f, residual_amp), size_t(numels[i])));
  std::vector<int> levels;
  std::vector<bool> ties;
  host_run::settle(L, levels, ties);
  return L;
}

// The fused pass over every chunk's blocks with `op`'s rule, counts per param; each
// chunk's blocks must visit its elements once.
template <typename Op>
void run_pass_on_host(host_run::HostLaunch& L, const std::vector<at::Tensor>& params,
                      const std::vector<FusedTensor>& table, const Op& op,
                      const cuda::UpdateOptions& options, int64_t* count) {
  std::vector<std::vector<uint8_t>> visits;
  for (const at::Tensor& p : params) visits.emplace_back(size_t(p.numel()), 0);
  for (size_t ci = 0; ci < L.t.chunks.size(); ++ci) {
    const SelChunk& ch = L.t.chunks[ci];
    std::vector<uint8_t>& seen = visits[L.t.seg_input[size_t(ch.seg)]];
    int64_t visited = 0;
    for (int y = 0; y < cuda::kFusedSplit; ++y) {
      switch (L.seg(ch).dtype) {
        case cuda::DType::Float32:
          visited += fused_block<float>(L, ci, y, table, op, options, count, seen);
          break;
        case cuda::DType::BFloat16:
          visited += fused_block<c10::BFloat16>(L, ci, y, table, op, options, count, seen);
          break;
        case cuda::DType::Float16:
          visited += fused_block<c10::Half>(L, ci, y, table, op, options, count, seen);
          break;
      }
    }
    TORCH_CHECK(visited == (cuda::skipped(options) ? 0 : ch.end - ch.begin), "chunk ", ci,
                ": the blocks visited ", visited, " of its ", ch.end - ch.begin,
                " elements");
  }
}

std::vector<at::Tensor> tensor_list(PyObject* seq, const char* name) {
  TORCH_CHECK(PyList_Check(seq), "incrkern._C.cuda_fused_on_host: ", name,
              " must be a list of tensors");
  std::vector<at::Tensor> out;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
    PyObject* item = PyList_GET_ITEM(seq, i);
    TORCH_CHECK(THPVariable_Check(item), "incrkern._C.cuda_fused_on_host: ", name, "[", i,
                "] must be a tensor");
    out.push_back(THPVariable_Unpack(item));
  }
  return out;
}

std::optional<at::Tensor> optional_tensor(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  TORCH_CHECK(THPVariable_Check(obj), "incrkern._C.cuda_fused_on_host: ", name,
              " must be a tensor or None");
  return THPVariable_Unpack(obj);
}

PyObject* cuda_fused_on_host(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_seq, *grads_seq, *m_seq, *v_seq, *steps_seq, *ks_seq, *res_seq;
  PyObject *lr_obj = Py_None, *amp_obj = Py_None, *found_obj = Py_None;
  int approx = 0, decoupled = 0, maximize = 0, steps_on_device = 0, increment_steps = 0;
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
  if (!PyArg_ParseTuple(args, "OOOOOOOp(dddddppd)|OOOpp", &params_seq, &grads_seq, &m_seq,
                        &v_seq, &steps_seq, &ks_seq, &res_seq, &approx, &lr, &beta1, &beta2,
                        &eps, &weight_decay, &decoupled, &maximize, &grad_scale, &lr_obj,
                        &amp_obj, &found_obj, &steps_on_device, &increment_steps))
    return nullptr;
  const char* op = "incrkern._C.cuda_fused_on_host";
  const std::vector<at::Tensor> params = tensor_list(params_seq, "params"),
                                grads = tensor_list(grads_seq, "grads"),
                                exp_avgs = tensor_list(m_seq, "exp_avgs"),
                                exp_avg_sqs = tensor_list(v_seq, "exp_avg_sqs"),
                                steps = tensor_list(steps_seq, "steps");
  const std::vector<at::Tensor> residuals =
      res_seq == Py_None ? std::vector<at::Tensor>() : tensor_list(res_seq, "residuals");
  const std::vector<int64_t> ks = host_run::int_list_arg(ks_seq, op, "ks");
  const std::optional<at::Tensor> lr_tensor = optional_tensor(lr_obj, "lr_tensor"),
                                  amp_scale = optional_tensor(amp_obj, "amp_scale");
  std::optional<at::Tensor> found = optional_tensor(found_obj, "found_inf");
  check_select_update(c10::DeviceType::CPU, params, grads, exp_avgs, exp_avg_sqs, steps, ks,
                      residuals, lr_tensor, amp_scale, found);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(cuda_dtype_of(params[i].scalar_type()) && params[i].is_contiguous(), op,
                ": params[", i, "] must be contiguous float32, bfloat16 or float16");
  const int64_t n = int64_t(params.size());
  at::Tensor counts = at::zeros({n}, at::TensorOptions().dtype(at::kLong));
  const auto read = [](const std::optional<at::Tensor>& t) {
    return t ? t->data_ptr<float>() : nullptr;
  };

  // As the glue: with steps to count on the host, a found inf is read first and the
  // call changes nothing; else the kernel reads it and skips.
  if (found && increment_steps && !steps_on_device) {
    if (*read(found) != 0.f) return THPVariable_Wrap(counts);
    found.reset();
  }
  const cuda::SelectGroups groups = fused_groups(params, ks);
  const std::vector<FusedTensor> table =
      fused_table(groups, params, grads, exp_avgs, exp_avg_sqs, steps, residuals,
                  increment_steps != 0,
                  [&](const at::Tensor&) { return steps_on_device != 0; });
  const cuda::UpdateOptions options =
      fused_options(grad_scale, read(lr_tensor), read(amp_scale), read(found));
  const cuda::AdamOp adam{cuda::AdamArgs{lr, beta1, beta2, eps, weight_decay, decoupled != 0,
                                         maximize != 0}};
  // count_step: a device step gains 1 - found_inf, on the stream before the kernels.
  for (size_t i = 0; increment_steps && i < steps.size(); ++i)
    *steps[i].data_ptr<float>() += steps_on_device && found ? 1.0f - *read(found) : 1.0f;

  const float* residual_amp = residuals.empty() ? nullptr : read(amp_scale);
  host_run::HostLaunch L =
      settle_on_host(params, grads, residuals, groups, approx != 0, residual_amp);
  run_pass_on_host(L, params, table, adam, options, counts.data_ptr<int64_t>());
  return THPVariable_Wrap(counts);
  END_HANDLE_TH_ERRORS
}

PyObject* cuda_sgd_fused_on_host(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *params_seq, *grads_seq, *buf_seq, *ks_seq, *res_seq, *first_seq;
  PyObject *lr_obj = Py_None, *amp_obj = Py_None, *found_obj = Py_None;
  int approx = 0, nesterov = 0, maximize = 0;
  double lr, momentum, dampening, weight_decay, grad_scale;
  if (!PyArg_ParseTuple(args, "OOOOOOp(ddddppd)|OOO", &params_seq, &grads_seq, &buf_seq,
                        &ks_seq, &res_seq, &first_seq, &approx, &lr, &momentum, &dampening,
                        &weight_decay, &nesterov, &maximize, &grad_scale, &lr_obj, &amp_obj,
                        &found_obj))
    return nullptr;
  const char* op = "incrkern._C.cuda_sgd_fused_on_host";
  const std::vector<at::Tensor> params = tensor_list(params_seq, "params"),
                                grads = tensor_list(grads_seq, "grads"),
                                buffers = tensor_list(buf_seq, "momentum_buffers"),
                                residuals = tensor_list(res_seq, "residuals");
  const std::vector<int64_t> ks = host_run::int_list_arg(ks_seq, op, "ks");
  c10::List<bool> first_step;
  for (int64_t flag : host_run::int_list_arg(first_seq, op, "first_step"))
    first_step.push_back(flag != 0);
  const std::optional<at::Tensor> lr_tensor = optional_tensor(lr_obj, "lr_tensor"),
                                  amp_scale = optional_tensor(amp_obj, "amp_scale"),
                                  found = optional_tensor(found_obj, "found_inf");
  check_sgd_select_update(c10::DeviceType::CPU, params, grads, buffers, ks, residuals,
                          first_step, momentum, lr_tensor, amp_scale, found);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(cuda_dtype_of(params[i].scalar_type()), op, ": params[", i,
                "] must be float32, bfloat16 or float16");
  at::Tensor counts = at::zeros({int64_t(params.size())}, at::TensorOptions().dtype(at::kLong));
  const auto read = [](const std::optional<at::Tensor>& t) {
    return t ? t->data_ptr<float>() : nullptr;
  };
  const cuda::SelectGroups groups = fused_groups(params, ks);
  const std::vector<FusedTensor> table = sgd_fused_table(
      groups, params, grads, momentum != 0 ? at::TensorList(buffers) : at::TensorList(),
      residuals, first_step);
  const cuda::UpdateOptions options =
      fused_options(grad_scale, read(lr_tensor), read(amp_scale), read(found));
  const cuda::SgdOp sgd{
      cuda::SgdArgs{lr, momentum, dampening, weight_decay, nesterov != 0, maximize != 0}};
  host_run::HostLaunch L = settle_on_host(params, grads, residuals, groups, approx != 0,
                                          residuals.empty() ? nullptr : read(amp_scale));
  run_pass_on_host(L, params, table, sgd, options, counts.data_ptr<int64_t>());
  return THPVariable_Wrap(counts);
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef kFusedOnHostMethods[] = {
    {"cuda_fused_on_host", cuda_fused_on_host, METH_VARARGS,
     "(params, grads, exp_avgs, exp_avg_sqs, steps, ks, residuals, approx, "
     "(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, grad_scale), "
     "lr_tensor=None, amp_scale=None, found_inf=None, steps_on_device=False, "
     "increment_steps=False) -> counts: the CUDA adam_select_update_ run on the host over "
     "float32, bfloat16 or float16 CPU tensors, in place, its steps read as device steps with steps_on_device; "
     "for the tests."},
    {"cuda_sgd_fused_on_host", cuda_sgd_fused_on_host, METH_VARARGS,
     "(params, grads, momentum_buffers, ks, residuals, first_step, approx, (lr, momentum, "
     "dampening, weight_decay, nesterov, maximize, grad_scale), lr_tensor=None, "
     "amp_scale=None, found_inf=None) -> counts: the CUDA sgd_select_update_ run on the "
     "host over float32, bfloat16 or float16 CPU tensors, in place; for the tests."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace incrkern
