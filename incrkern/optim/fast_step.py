"""The common incremental Adam step in one C++ call (on the CPU, or on one GPU where
CUDA_ENABLED), SGD's on the CPU in another, and the micro-steps of accumulate_steps on
the CPU in a third.

On a model of many small tensors the Python around the fused kernel cost more than
the kernel: reading each param's grad and state, checking them and boxing the lists
for the dispatcher (docs/measurements.md, "Python overhead of a step"). When every group
is the plain case, `incrkern._C.fused_adam_step` reads the grads and states itself
and calls the CPU kernel directly. It returns None, having touched nothing, on
anything else it meets (a first step with no state yet, a bad grad, a subclass),
and the Python step runs as before: the same results, and the same errors. The
params the cost model sends to select then update (use_fused) it checks like the
others and hands back; the Python step takes those. select="grad_sq" groups have
their Fisher's EMA formed by the CPU kernel where it reads the keys (first, on a GPU),
and "random" groups
their seed drawn there from torch's default generator, as the op's wrapper draws it
(group by group, only for a group the call steps). A micro-step that only adds the
grads to grad_acc (or to the residual of error feedback) is `accumulate_grads`, with
the same rule: the plain case or nothing touched.

On a GPU the C++ call reads the same state and calls the fused op's CUDA kernel once a
group, as the Python step would (every param takes it there): on a model of a thousand
tensors the Python around the kernels cost more than the kernels. CUDA_ENABLED is on
(INCRKERN_FAST_STEP_CUDA=0 turns it off): an H200 has run the test holding it to the
Python step (tests/test_fast_step.py) and timed the two routes
(scripts/fast_step_host.py; both in `make gpu-check`). THROUGH_OP sends the CPU's
groups the same way (the op's CPU kernel, called as the CUDA one is), so the CPU tests
hold that route to the Python step. `incrkern._C.fused_sgd_step` is SGD's plain case
(select="grad" or "accumulated", or accumulate_steps; every tensor takes
sgd_select_update_'s kernel there), on the same terms: a momentum buffer or residual
not made yet leaves the step to Python, which makes it.
"""
import os

import torch

from .. import _extension, ops
from . import base
from .base import FUSED_MIN_DENSITY, FUSED_SMALL_NUMEL, accumulation_target, fused_options

_fused_adam_step = (getattr(_extension._C, "fused_adam_step", None)
                    if _extension.EXTENSION_LOADED else None)
_fused_sgd_step = (getattr(_extension._C, "fused_sgd_step", None)
                   if _extension.EXTENSION_LOADED else None)
_accumulate_grads = (getattr(_extension._C, "accumulate_grads", None)
                     if _extension.EXTENSION_LOADED else None)

# False: every step takes the Python path (for comparing the two).
ENABLED = True
# True: a step on one GPU takes the C++ call too (with ops.FUSED_CUDA).
CUDA_ENABLED = os.environ.get("INCRKERN_FAST_STEP_CUDA", "1") == "1"
# True: the CPU's groups take the op's kernel as a GPU's do (the tests' way to it).
THROUGH_OP = False

_CPU = torch.device("cpu")


def _global_group(opt, group):
    """Whether a scope="global" group's step is the CPU kernel's over every tensor's
    blocks as one list (the threshold stream, or below its density the tile lists):
    Adam or SGD by |grad| or error feedback, from FUSED_GLOBAL_DENSITY on, the other
    options as fused_options asks (accumulate_steps 1), no sharded selection
    (_global_select)."""
    return (fused_options(group, scope="global")
            and group["select"] in ("grad", "accumulated")
            and opt._global_select is None
            and float(group["density"]) >= base.FUSED_GLOBAL_DENSITY
            and group["accumulate_steps"] == 1)


def _plain_group(opt, group):
    """Whether the group steps by the fused kernel (where the cost model sends a
    tensor there, or a global group's every tensor) with nothing else the C++ step
    leaves to Python: an update (no accumulation, or the step that ends a cycle of
    accumulate_steps), no masters, capture or differentiable step."""
    select = group["select"]
    return ((_global_group(opt, group)
             or fused_options(group) and select in opt._fused_selects
             and base.use_fused(float(group["density"]), 0, select, opt._fused_rule))
            and group["accumulated_calls"] + 1 == group["accumulate_steps"]
            and not opt._is_dense(group) and not group.get("master_weights")
            and not group.get("capturable") and not group.get("differentiable"))


def _plain_micro_step(group):
    """Whether this step only adds the group's grads to its accumulators (a micro-step
    of accumulate_steps) with nothing the C++ call leaves to Python: |grad| (into
    grad_acc) or error feedback without momentum correction (into the residual)."""
    return (group["accumulated_calls"] + 1 < group["accumulate_steps"]
            and group["select"] in ("grad", "accumulated")
            and not group.get("momentum_correction") and not group.get("capturable"))


def _micro_step(opt):
    specs = [(group["params"], *accumulation_target(group)) for group in opt.param_groups]
    answer = _accumulate_grads(specs, opt.state, torch.nn.Parameter)
    if answer is None:
        return False
    for group, had_grads in zip(opt.param_groups, answer):
        if had_grads:
            group["accumulated_calls"] += 1
    return True


def _spec_head(opt, group, device):
    """What both C++ calls read first of a group, (params, density, error_feedback,
    approx, lr, lr_tensor), and the optimizer's hyperparameters."""
    lr, lr_tensor = opt._lr_args(group, device)
    return ((group["params"], float(group["density"]), group["select"] == "accumulated",
             group["topk"] == "approx", lr, lr_tensor), opt._hyper(group))


def _adam_call(opt, groups, device):
    """fused_adam_step's answer for the groups (per group None, or the params it left
    to the Python step), None when not taken."""
    if device.type == "cuda":
        if not (CUDA_ENABLED and ops.FUSED_CUDA):
            return None
    elif device.type != "cpu":
        return None
    specs = []
    for group in groups:
        head, h = _spec_head(opt, group, device)
        specs.append((*head, h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
                      h["decoupled_weight_decay"], h["maximize"], group["accumulate_steps"],
                      base.fused_score(group["select"]),
                      float(group.get("fisher_beta", 0.0)), group["scope"] == "global"))
    return _fused_adam_step(specs, opt.state, torch.nn.Parameter, FUSED_SMALL_NUMEL,
                            FUSED_MIN_DENSITY, -1 if device.type == "cpu" else device.index,
                            THROUGH_OP)


def _sgd_call(opt, groups, device):
    """fused_sgd_step's answer for the groups (a list of bools), None when not taken."""
    if device.type != "cpu" or _fused_sgd_step is None:
        return None
    specs = []
    for group in groups:
        head, h = _spec_head(opt, group, device)
        specs.append((*head, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"],
                      h["maximize"], group["accumulate_steps"], group["scope"] == "global"))
    answer = _fused_sgd_step(specs, opt.state, torch.nn.Parameter)
    return None if answer is None else [[] if had else None for had in answer]


def one_call_step(opt):
    """Steps every group of `opt` (an incrkern Adam or SGD) in one C++ call; False when
    the step is not the plain case and nothing was touched."""
    if (not ENABLED or _fused_adam_step is None
            or getattr(opt, "grad_scale", None) is not None
            or getattr(opt, "found_inf", None) is not None
            or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
        return False
    groups = opt.param_groups
    if _accumulate_grads is not None and all(_plain_micro_step(group) for group in groups):
        return _micro_step(opt)
    if not all(_plain_group(opt, group) for group in groups):
        return False
    # The call's device, from its first param: the C++ call finds any tensor elsewhere.
    device = next((group["params"][0].device for group in groups if group["params"]), _CPU)
    if opt._fused_rule == "sgd":
        answer = _sgd_call(opt, groups, device)
    else:
        answer = _adam_call(opt, groups, device)
    if answer is None:
        return False
    for group, elsewhere in zip(groups, answer):
        if elsewhere:  # the Python step accumulates their grads and counts the update
            opt._step_group(group, [(_CPU, elsewhere, [p.grad for p in elsewhere])])
        elif elsewhere is not None:
            group["accumulated_calls"] = 0
            group["updates"] += 1
    return True
