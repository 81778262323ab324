"""The optimizer step inside backward: each param is updated as soon as its
gradient is complete, and its dense gradient freed at once, so backward holds one
param's gradient at a time instead of the whole model's (torch's
optimizer-in-backward recipe, with one optimizer per param).

With an incrkern optimizer and a fixed or given mask, a param's step reads only
its chosen entries of the gradient; its state stays k-long. scope="global"
selection needs every param at once, so inside backward give the positions
instead (a global fish_mask / sift_mask, through `mask=`).
"""
import torch
from torch.optim import Optimizer


class OptimizerInBackward(Optimizer):
    """Steps `optimizer_factory([p])` for every trainable param `p` of `model` from
    a post-accumulate-grad hook, then sets `p.grad = None`.

    It is itself a torch Optimizer whose `param_groups` are the per-param
    optimizers' own group dicts, so an LR scheduler built on it sets their
    learning rates. `step()` and `zero_grad()` do nothing (the work happened in
    backward); call them as in an ordinary loop. `state_dict()` holds every
    per-param optimizer's. Gradient accumulation over several backward calls needs
    the optimizer's own (`accumulate_steps=n` for incrkern's): each backward steps.
    `remove()` takes the hooks off.
    """

    def __init__(self, model_or_params, optimizer_factory):
        if isinstance(model_or_params, torch.nn.Module):
            params = list(model_or_params.parameters())
        else:
            params = list(model_or_params)
        seen, unique = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        if not unique:
            raise ValueError("model_or_params holds no param that requires grad")
        optimizers = []
        for p in unique:
            opt = optimizer_factory([p])
            if not isinstance(opt, Optimizer):
                raise TypeError(f"optimizer_factory must return a torch Optimizer, got "
                                f"{type(opt).__name__}")
            optimizers.append(opt)
        super().__init__(unique, {})
        self.optimizers = dict(zip(unique, optimizers))
        self.param_groups = [g for opt in optimizers for g in opt.param_groups]
        self._handles = [p.register_post_accumulate_grad_hook(self._step_param)
                         for p in unique]

    def _step_param(self, p):
        self.optimizers[p].step()
        p.grad = None

    def step(self, closure=None):
        """Nothing to do: every param stepped during backward. Runs the closure."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none=True):
        """Nothing to do: backward left every grad None."""

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict):
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state_dict holds {len(saved)} optimizers, expected "
                             f"{len(self.optimizers)}")
        for opt, s in zip(self.optimizers.values(), saved):
            opt.load_state_dict(s)
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def optimizer_in_backward(model_or_params, optimizer_factory):
    """OptimizerInBackward(model_or_params, optimizer_factory)."""
    return OptimizerInBackward(model_or_params, optimizer_factory)
