"""Adam and AdamW with incremental (sparse) updates."""
import torch
from torch.optim.adam import adam as torch_adam

from .. import ops
from .base import IncrementalOptimizer, fused_score
from .checks import _check_number, check_tensor_lr
from .fast_step import one_call_step


def _checked_betas(betas, foreach, capturable):
    """torch.optim.Adam's checks of `betas`, with its messages: two floats or two
    one-element Tensors (kept as 0-d tensors, as torch keeps them; the kernels read
    them on the host, which costs nothing for CPU tensors)."""
    beta1, beta2 = betas
    if not (isinstance(beta1, float) and isinstance(beta2, float)
            or isinstance(beta1, torch.Tensor) and isinstance(beta2, torch.Tensor)):
        raise ValueError("betas must be either both floats or both Tensors")
    if isinstance(beta1, float):
        return betas
    for i, beta in enumerate(betas):
        if not capturable and foreach:
            raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                             "capturable=False and foreach=True")
        if beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
    return tuple(beta.squeeze() if beta.dim() else beta for beta in betas)


class Adam(IncrementalOptimizer):
    """Drop-in torch.optim.Adam (and, with decoupled_weight_decay=True, AdamW).

    With the defaults it is torch's Adam: same math, state keys (`step`, `exp_avg`,
    `exp_avg_sq`, and `max_exp_avg_sq` with amsgrad=True) and state_dict; bf16/fp16
    params keep fp32 state. The incremental options (density, select, scope, topk,
    accumulate_steps, mask, bias_correction, fisher_beta) are documented in the README
    and in incrkern.optim. With amsgrad, max_exp_avg_sq is lazy like the moments: only
    updated elements change it.
    """

    _counts_steps = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 master_weights=False, **incremental):
        check_tensor_lr(lr, foreach=foreach, capturable=capturable)
        _check_number("learning rate", lr)
        _check_number("epsilon value", eps)
        _check_number("beta parameter at index 0", betas[0], 0.0, 1.0)
        _check_number("beta parameter at index 1", betas[1], 0.0, 1.0)
        _check_number("weight_decay value", weight_decay)
        betas = _checked_betas(betas, foreach, capturable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=bool(amsgrad), foreach=foreach, maximize=maximize,
                        capturable=capturable, differentiable=bool(differentiable),
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay,
                        master_weights=bool(master_weights))
        super().__init__(params, defaults, incremental)
        for group in self.param_groups:
            self._check_differentiable(group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", isinstance(self, AdamW))
            group.setdefault("amsgrad", False)
            group.setdefault("master_weights", False)

    def _init_states(self, group, params, states, ks, sparse):
        # The common case, every state made, is checked over the list without a call
        # per param: it runs every step.
        moment = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
        if all(moment in s for s in states) and (
                not (sparse and group["bias_correction"] == "element")
                or all("age" in s for s in states)):
            return
        super()._init_states(group, params, states, ks, sparse)

    def _new_step(self, p):
        return self._place_step(torch.tensor(0.0), p)

    def _init_state(self, group, p, k, sparse):
        state = self.state[p]
        want_age = sparse and group["bias_correction"] == "element"
        if "step" not in state:
            state["step"] = self._new_step(p)
        shape = p.shape if k is None else (k,)
        dtype = ops.math_dtype(p.dtype)
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else (
            "exp_avg", "exp_avg_sq")
        for key in keys:
            if key not in state:
                state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
        if want_age and "age" not in state:
            state["age"] = torch.zeros(shape, dtype=torch.int32, device=p.device)

    def _differentiable_step(self, group, params, grads, amp_scale, found_inf):
        states = [self.state[p] for p in params]
        self._init_states(group, params, states, None, sparse=False)
        beta1, beta2 = group["betas"]
        torch_adam(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states], foreach=False, capturable=group["capturable"],
            differentiable=True, grad_scale=amp_scale, found_inf=found_inf,
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"],
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"])

    def _fast_step(self):
        return one_call_step(self)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                    maximize=bool(group["maximize"]))

    def _apply(self, group, work, device, *, grads=None, indices=None, masks=None,
               ages=None, grad_scale=1.0, consume_grad=False, compact_state=False,
               unscale=True):
        states = work.states
        steps = [s["step"] for s in states]
        lr, lr_tensor = self._lr_args(group, device)
        ops.adam_update_(work.contiguous_params, work.grads if grads is None else grads,
                         [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                         steps, lr=lr, lr_tensor=lr_tensor, indices=indices, masks=masks,
                         ages=ages,
                         max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states]
                         if group["amsgrad"] else None,
                         grad_scale=grad_scale, consume_grad=consume_grad,
                         compact_state=compact_state, increment_steps=True,
                         validate=False, **self._amp_kwargs(device, unscale),
                         **self._hyper(group))

    def _select_update(self, group, work, device, ks, residuals, approx, grad_scale=1.0,
                       scores=None):
        lr, lr_tensor = self._lr_args(group, device)
        ops.adam_select_update_(work.contiguous_params, work.grads,
                                [s["exp_avg"] for s in work.states],
                                [s["exp_avg_sq"] for s in work.states],
                                [s["step"] for s in work.states], ks, residuals,
                                approx=approx, lr=lr, lr_tensor=lr_tensor,
                                grad_scale=grad_scale, increment_steps=True,
                                score=fused_score(group["select"]),
                                scores=scores,
                                validate=False, **self._amp_kwargs(device),
                                **self._hyper(group))


class AdamW(Adam):
    """Drop-in torch.optim.AdamW: Adam with decoupled weight decay (default 0.01)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, master_weights=False, **incremental):
        if "decoupled_weight_decay" in incremental:
            raise TypeError("AdamW always decouples weight decay; use Adam to choose")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         master_weights=master_weights,
                         decoupled_weight_decay=True, **incremental)
