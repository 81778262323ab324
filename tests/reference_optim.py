"""A for-loop implementation of the incremental optimizers' semantics in plain torch,
written from docs/design.md ("Semantics"), not from incrkern.optim: the oracle of test_optim_incremental.

Selection: exact top-k by a stable descending sort (ties to the lowest index), over a
tensor or the concatenation of the group. Updates: incrkern.reference's pure-torch
update ops at the chosen indices.
"""
import math

import torch

from incrkern import reference


def topk_lowest_index(scores, k):
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


class ReferenceOptimizer:
    def __init__(self, params, kind, hyper, *, density=1.0, select="grad", scope="tensor",
                 mask="dynamic", accumulate_steps=1, bias_correction="tensor",
                 fisher_beta=0.99, amsgrad=False):
        self.params = list(params)
        self.kind, self.hyper = kind, dict(hyper)
        self.amsgrad = amsgrad
        self.density, self.select, self.scope = density, select, scope
        self.mask, self.n = mask, accumulate_steps
        self.bias_correction, self.fisher_beta = bias_correction, fisher_beta
        self.calls = 0
        self.updates = 0
        self.state = [dict() for _ in self.params]

    def _zeros(self, p, n=None):
        return torch.zeros(p.numel() if n is None else n, dtype=torch.float32)

    def _choose(self, sources):
        if self.select == "grad_sq":
            scores = [s["fisher"] for s in self.state]
        elif self.select == "weight":
            scores = [p.detach().reshape(-1).abs() for p in self.params]
        elif self.select == "random":
            return reference.select([s for s in sources], self.density, score="random",
                                    scope=self.scope, seed=self.seed)
        else:
            scores = [src.abs() for src in sources]
        if self.scope == "tensor":
            return [topk_lowest_index(sc, math.ceil(self.density * sc.numel()))
                    for sc in scores]
        flat = torch.cat(scores)
        chosen = topk_lowest_index(flat, math.ceil(self.density * flat.numel()))
        out, start = [], 0
        for sc in scores:
            inside = chosen[(chosen >= start) & (chosen < start + sc.numel())]
            out.append(inside - start)
            start += sc.numel()
        return out

    @torch.no_grad()
    def step(self, seed=None):
        self.seed = seed
        grads = [p.grad.reshape(-1).float() for p in self.params]
        for s, g in zip(self.state, grads):
            if self.select == "accumulated":
                s["residual"] = s.get("residual", self._zeros(g)) + g * (1.0 / self.n)
            elif self.n > 1:
                s["grad_acc"] = s.get("grad_acc", self._zeros(g)) + g
            if self.select == "grad_sq":
                f = s.get("fisher", self._zeros(g))
                s["fisher"] = f * self.fisher_beta + (1 - self.fisher_beta) * g * g
        self.calls += 1
        if self.calls < self.n:
            return
        self.calls = 0
        if self.select == "accumulated":
            sources, scale, consume = [s["residual"] for s in self.state], 1.0, True
        elif self.n > 1:
            sources, scale, consume = [s["grad_acc"] for s in self.state], 1.0 / self.n, True
        else:
            sources, scale, consume = [g.clone() for g in grads], 1.0, False
        if self.density >= 1:
            indices = None
        elif (self.mask == "fixed" and "indices" in self.state[0]) or (
                isinstance(self.mask, int) and self.updates % self.mask != 0):
            indices = [s["indices"] for s in self.state]
        else:
            indices = self._choose(sources)
            for s, idx in zip(self.state, indices):
                s["indices"] = idx
        compact = self.mask == "fixed" and indices is not None
        flat_params = [p.detach().view(-1) for p in self.params]
        for i, (p, s) in enumerate(zip(flat_params, self.state)):
            n_state = indices[i].numel() if compact else p.numel()
            if self.kind == "sgd":
                first = "momentum_buffer" not in s and self.hyper["momentum"] != 0
                if first:
                    s["momentum_buffer"] = self._zeros(p, n_state)
                reference.sgd_update_(
                    [p], [sources[i]], [s["momentum_buffer"]] if self.hyper["momentum"] else [],
                    [indices[i]] if indices is not None else [], [], [first],
                    grad_scale=scale, consume_grad=consume, compact_state=compact,
                    **self.hyper)
            else:
                if "exp_avg" not in s:
                    s["exp_avg"], s["exp_avg_sq"] = self._zeros(p, n_state), self._zeros(p, n_state)
                    s["step"] = torch.tensor(0.0)
                    if self.bias_correction == "element" and indices is not None:
                        s["age"] = torch.zeros(n_state, dtype=torch.int32)
                    if self.amsgrad:
                        s["max_exp_avg_sq"] = self._zeros(p, n_state)
                s["step"] += 1
                reference.adam_update_(
                    [p], [sources[i]], [s["exp_avg"]], [s["exp_avg_sq"]], [s["step"]],
                    [indices[i]] if indices is not None else [], [],
                    [s["age"]] if "age" in s and indices is not None else [],
                    [s["max_exp_avg_sq"]] if self.amsgrad else [],
                    grad_scale=scale, consume_grad=consume, compact_state=compact,
                    **self.hyper)
        if self.n > 1 and self.select != "accumulated":
            for s in self.state:
                s["grad_acc"].zero_()
        self.updates += 1
