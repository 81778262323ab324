"""SGD with incremental (sparse) updates."""
import torch
from torch.optim.sgd import sgd as torch_sgd

from .. import ops
from .base import IncrementalOptimizer
from .checks import _check_number, check_tensor_lr
from .fast_step import one_call_step


class SGD(IncrementalOptimizer):
    """Drop-in torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize).

    With the defaults it is torch's SGD: same math, state key `momentum_buffer`
    (created at the first step, only when momentum != 0) and state_dict.
    `momentum_correction=True` (with select="accumulated"): Deep Gradient
    Compression's local velocity and momentum factor masking.
    """

    _fused_rule = "sgd"
    _fused_selects = ("grad", "accumulated")  # |grad|, error feedback; accumulate_steps

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, momentum_correction=False, master_weights=False, **incremental):
        check_tensor_lr(lr, host_only_foreach=False)
        _check_number("learning rate", lr)
        _check_number("momentum value", momentum)
        _check_number("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=bool(differentiable), fused=fused,
                        momentum_correction=bool(momentum_correction),
                        master_weights=bool(master_weights))
        super().__init__(params, defaults, incremental)
        for group in self.param_groups:
            self._check_differentiable(group)
        if momentum_correction and (momentum == 0 or self.defaults["select"] != "accumulated"):
            raise ValueError("momentum_correction=True needs momentum > 0 and "
                             "select='accumulated'")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum_correction", False)
            group.setdefault("master_weights", False)

    def _init_states(self, group, params, states, ks, sparse):
        pass  # the momentum buffer is created at the first step, as torch does

    def _differentiable_step(self, group, params, grads, amp_scale, found_inf):
        states = [self.state[p] for p in params]
        buffers = [s.get("momentum_buffer") for s in states]
        torch_sgd(params, grads, buffers, foreach=False, grad_scale=amp_scale,
                  found_inf=found_inf, weight_decay=group["weight_decay"],
                  momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                  nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"] != 0:
            for s, buf in zip(states, buffers):
                s["momentum_buffer"] = buf

    def _fast_step(self):
        return one_call_step(self)

    def _momentum(self, group):
        # With momentum correction the velocity is kept (and masked) by the base class,
        # and what reaches the rule is the accumulated velocity: no second momentum.
        return 0.0 if group.get("momentum_correction") else float(group["momentum"])

    def _hyper(self, group):
        return dict(momentum=self._momentum(group), dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"]),
                    nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))

    def _buffers(self, group, work, indices=None, compact_state=False):
        """(momentum buffers, first-step flags) of the work's params: a buffer is made
        (zeros) at its param's first step, which the update then marks."""
        buffers, first = [], []
        if self._momentum(group) != 0:
            for i, (p, state) in enumerate(zip(work.params, work.states)):
                new = state.get("momentum_buffer") is None
                if new:
                    numel = indices[i].numel() if compact_state else None
                    shape = (numel,) if compact_state else p.shape
                    state["momentum_buffer"] = torch.zeros(
                        shape, dtype=ops.math_dtype(p.dtype), device=p.device)
                buffers.append(state["momentum_buffer"])
                first.append(new)
        else:
            first = [False] * len(work.params)
        return buffers, first

    def _fused_cuda(self):
        return ops.FUSED_SGD_CUDA

    def _select_update(self, group, work, device, ks, residuals, approx, grad_scale=1.0,
                       scores=None):
        buffers, first = self._buffers(group, work)
        lr, lr_tensor = self._lr_args(group, device)
        ops.sgd_select_update_(work.contiguous_params, work.grads, buffers, ks, lr=lr,
                               lr_tensor=lr_tensor, first_step=first, approx=approx,
                               residuals=residuals, grad_scale=grad_scale, validate=False,
                               **self._amp_kwargs(device), **self._hyper(group))

    def _apply(self, group, work, device, *, grads=None, indices=None, masks=None,
               ages=None, grad_scale=1.0, consume_grad=False, compact_state=False,
               unscale=True):
        buffers, first = self._buffers(group, work, indices, compact_state)
        lr, lr_tensor = self._lr_args(group, device)
        ops.sgd_update_(work.contiguous_params, work.grads if grads is None else grads,
                        buffers, lr=lr, lr_tensor=lr_tensor, first_step=first,
                        indices=indices, masks=masks, grad_scale=grad_scale,
                        consume_grad=consume_grad, compact_state=compact_state,
                        validate=False, **self._amp_kwargs(device, unscale),
                        **self._hyper(group))
