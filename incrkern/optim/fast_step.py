"""The common incremental Adam step on the CPU in one C++ call, and the micro-steps of
accumulate_steps in another.

On a model of many small tensors the Python around the fused kernel cost more than
the kernel: reading each param's grad and state, checking them and boxing the lists
for the dispatcher (docs/measurements.md, "Python overhead of a step"). When every group
is the plain case, `incrkern._C.fused_adam_step` reads the grads and states itself
and calls the CPU kernel directly. It returns None, having touched nothing, on
anything else it meets (a first step with no state yet, a bad grad, a subclass),
and the Python step runs as before: the same results, and the same errors. The
params the cost model sends to select then update (use_fused) it checks like the
others and hands back; the Python step takes those. A micro-step that only adds the
grads to grad_acc (or to the residual of error feedback) is `accumulate_grads`, with
the same rule: the plain case or nothing touched.
"""
import torch

from .. import _extension
from .base import FUSED_MIN_DENSITY, FUSED_SMALL_NUMEL, accumulation_target, fused_options

_fused_adam_step = (getattr(_extension._C, "fused_adam_step", None)
                    if _extension.EXTENSION_LOADED else None)
_accumulate_grads = (getattr(_extension._C, "accumulate_grads", None)
                     if _extension.EXTENSION_LOADED else None)

# False: every step takes the Python path (for comparing the two).
ENABLED = True

_CPU = torch.device("cpu")


def _plain_group(opt, group):
    """Whether the group steps by the fused kernel (where the cost model sends a
    tensor there) with nothing else the C++ step leaves to Python: an update (no
    accumulation, or the step that ends a cycle of accumulate_steps), no masters,
    capture or differentiable step."""
    return (fused_options(group)
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


def one_call_step(opt):
    """Steps every group of `opt` (an incrkern Adam) in one C++ call; False when the
    step is not the plain case and nothing was touched."""
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
    specs = []
    for group in groups:
        lr, lr_tensor = opt._lr_args(group, _CPU)
        h = opt._hyper(group)
        specs.append((group["params"], float(group["density"]),
                      group["select"] == "accumulated", group["topk"] == "approx", lr,
                      lr_tensor, h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
                      h["decoupled_weight_decay"], h["maximize"], group["accumulate_steps"]))
    answer = _fused_adam_step(specs, opt.state, torch.nn.Parameter, FUSED_SMALL_NUMEL,
                              FUSED_MIN_DENSITY)
    if answer is None:
        return False
    for group, elsewhere in zip(groups, answer):
        if elsewhere:  # the Python step accumulates their grads and counts the update
            opt._step_group(group, [(_CPU, elsewhere, [p.grad for p in elsewhere])])
        elif elsewhere is not None:
            group["accumulated_calls"] = 0
            group["updates"] += 1
    return True
