"""The base class of incrkern's optimizers: torch.optim.Optimizer plus incremental
(sparse) updates.

A step, for each param group:
  1. validate every param and grad of every group (nothing is touched before this);
  2. gradient source: `.grad`, or an fp32 accumulator (`accumulate_steps` > 1: the
     mean of the last n grads), or the error-feedback residual (`select="accumulated"`);
  3. on an updating step, choose the indices (`density` < 1) by `select` over a
     tensor or the whole group (`scope`), now or from a kept mask (`mask`);
  4. one fused kernel call per device applies the update rule at those indices
     only (on the CPU from MASK_DENSITY on, through a bool mask of them: one
     streaming pass), reading (and, for accumulators, clearing) the gradient source.
With the defaults (density 1, accumulate_steps 1) it is exactly the dense torch
optimizer: same math, same state keys, same state_dict.
"""
import math

import torch
from torch.optim import Optimizer

from .. import ops

SELECT_CHOICES = ("grad", "grad_sq", "weight", "accumulated", "random", "layer")
SCOPE_CHOICES = ("tensor", "global")
TOPK_CHOICES = ("exact", "approx")
BIAS_CORRECTION_CHOICES = ("tensor", "element")

# From this density on, a CPU step updates through a bool mask (one streaming pass
# over every element, at the dense step's speed) instead of the chosen positions (a
# scattered access each). bench/crossover_update.py, 1e7 fp32 on 2 cores: AdamW by
# positions 7.4 ms at 0.1 and 17.6 at 0.3, by mask 5.6 and 6.4 flat, plus 1.2 and
# 3.2 ms to build the mask from the positions; SGD-momentum 5.6 and 10.5 against
# 4.6 and 4.9. Below about 0.05 positions win (2.2 against 6.2 ms at 0.01).
MASK_DENSITY = 0.1

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The fused select-and-update (ops.adam_select_update_) against select then update
# (by positions, or by mask from MASK_DENSITY on), measured with
# bench/crossover_fused.py and bench/fused_optimizer_step.py (docs/design.md,
# "Choosing a path"): on tensors of up to 2^18 elements the fused call wins at every
# density (no positions returned, no second op call); on a 1e7 tensor the tile-fused
# stream wins only from about density 0.2 on, where select then update pays for a
# full read, a scattered or masked update and the mask built from the positions.
FUSED_SMALL_NUMEL = 2 ** 18
FUSED_MIN_DENSITY = 0.2


def use_fused(density, largest_numel):
    """Whether a step at `density` whose largest tensor has `largest_numel` elements
    takes the fused kernel."""
    return largest_numel <= FUSED_SMALL_NUMEL or density >= FUSED_MIN_DENSITY


# The group options every incrkern optimizer adds to torch's.
INCREMENTAL_DEFAULTS = dict(density=1.0, select="grad", scope="tensor", topk="exact",
                            accumulate_steps=1, mask="dynamic", bias_correction="tensor",
                            fisher_beta=0.99)


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_incremental_options(options):
    """Raises ValueError naming the first bad incremental option."""
    density = options["density"]
    if isinstance(density, bool) or not isinstance(density, (int, float)) or \
            not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    _check_choice("select", options["select"], SELECT_CHOICES)
    _check_choice("scope", options["scope"], SCOPE_CHOICES)
    _check_choice("topk", options["topk"], TOPK_CHOICES)
    _check_choice("bias_correction", options["bias_correction"], BIAS_CORRECTION_CHOICES)
    n = options["accumulate_steps"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"accumulate_steps must be an int >= 1, got {n!r}")
    mask = options["mask"]
    if not (mask in ("dynamic", "fixed") or
            (isinstance(mask, int) and not isinstance(mask, bool) and mask >= 1)):
        raise ValueError(f"mask must be 'dynamic', 'fixed' or an int N >= 1, got {mask!r}")
    beta = options["fisher_beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"fisher_beta must be a number in [0, 1), got {beta!r}")


def _check_number(name, value, low=0.0, high=None):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value} (expected {bound})")


def _contiguous(tensors):
    """The tensors themselves where contiguous, contiguous copies of the others (a
    param's copy is written back after the step)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


class IncrementalOptimizer(Optimizer):
    """Shared machinery of incrkern.optim.SGD / Adam / AdamW.

    Subclasses implement `_init_state(group, p, k, sparse)` (creates what is missing:
    k-long when k is given, param-sized otherwise; or `_init_states` over a list) and
    `_apply(group, work, device, ...)` (the fused kernel call).

    A step costs a few attribute reads per param in Python (about 1 µs); lists are
    built once per step and passed down, never re-derived per param (a model's
    thousand small tensors otherwise spend more time here than in the kernels).
    """

    def __init__(self, params, defaults, incremental):
        options = dict(INCREMENTAL_DEFAULTS)
        unknown = set(incremental) - set(options)
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        options.update(incremental)
        check_incremental_options(options)
        if options["mask"] == "fixed" and options["select"] == "accumulated":
            raise ValueError("mask='fixed' cannot be combined with select='accumulated': "
                             "the residual of unchosen elements would never be applied")
        defaults = dict(defaults, **options)
        super().__init__(params, defaults)

    # -- groups and state_dict ---------------------------------------------------------

    def add_param_group(self, param_group):
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise TypeError(f"params must be floating point tensors, got {p.dtype}")
        for key in INCREMENTAL_DEFAULTS:
            if key in param_group:
                check_incremental_options(dict(INCREMENTAL_DEFAULTS, **{key: param_group[key]}))
        super().add_param_group(param_group)
        param_group.setdefault("accumulated_calls", 0)
        param_group.setdefault("updates", 0)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("accumulated_calls", 0)
            group.setdefault("updates", 0)

    def load_state_dict(self, state_dict):
        """As torch's, but floating state keeps the optimizer's own dtype (fp32 for
        bf16/fp16 params) instead of being rounded to the param's dtype."""
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved_state.get(pid, {}).items():
                if key == "step" or not torch.is_tensor(value):
                    continue
                dtype = value.dtype
                if value.is_floating_point():
                    dtype = ops.math_dtype(p.dtype)
                self.state[p][key] = value.to(device=p.device, dtype=dtype,
                                              memory_format=torch.contiguous_format,
                                              copy=True)
            state = self.state.get(p)
            if state and "step" in state:  # a copy: never share a counter with the source
                state["step"] = self._place_step(state["step"], p).clone()

    @property
    def accumulating(self):
        """True when the next step() only accumulates gradients and updates no param."""
        return any(g["accumulated_calls"] + 1 < g["accumulate_steps"] for g in self.param_groups)

    # -- the step --------------------------------------------------------------------------

    def _place_step(self, step, p):
        """Update counts live on the CPU (read on the host, as torch does) unless the
        group is capturable, when they live on the param's device."""
        capturable = any(g.get("capturable", False) for g in self.param_groups
                         if any(q is p for q in g["params"]))
        device = p.device if capturable else torch.device("cpu")
        if not torch.is_tensor(step):
            step = torch.tensor(float(step))
        return step.to(device=device, dtype=torch.float32)

    def _params_with_grad(self, group, gi):
        """(params, grads, device) of the group's params that have a gradient, each
        checked before anything runs; device is None when they are on several."""
        params, grads = [], []
        device, mixed = None, False
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            dtype, d = p.dtype, p.device
            # Cheapest tests first: dtypes and layouts are singletons; a device is
            # built on each access, so it is read once.
            if (g.dtype is not dtype or g.layout is not torch.strided or dtype.is_complex
                    or g.shape != p.shape or g.device != d
                    or (dtype is torch.float64 and d.type == "cuda")):
                self._bad_grad(f"param_groups[{gi}]['params'][{i}]", p, g)
            if device is None:
                device = d
            elif not mixed and d != device:
                mixed = True
            params.append(p)
            grads.append(g)
        return params, grads, None if mixed else device

    @staticmethod
    def _bad_grad(where, p, g):
        if g.layout != torch.strided:
            raise RuntimeError(f"{where}: sparse gradients are not supported")
        if g.shape != p.shape:
            raise RuntimeError(f"{where}: grad has shape {tuple(g.shape)}, param "
                               f"{tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"{where}: grad has dtype {g.dtype}, param {p.dtype}")
        if g.device != p.device:
            raise RuntimeError(f"{where}: grad is on {g.device}, param on {p.device}")
        if p.is_complex():
            raise RuntimeError(f"{where}: complex params are not supported")
        raise RuntimeError(f"{where}: float64 params are supported on the CPU only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked before any is touched: a step that raises changes nothing.
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            _check_number("lr", lr)
        plans = [(group, *self._params_with_grad(group, gi))
                 for gi, group in enumerate(self.param_groups)]
        for group, params, grads, device in plans:
            if params:
                self._step_group(group, self._by_device(params, grads, device))
        return loss

    def _is_dense(self, group):
        return (group["density"] >= 1.0 and group["accumulate_steps"] == 1
                and group["select"] != "accumulated")

    def _step_group(self, group, by_device):
        if self._is_dense(group):
            self._dense_step(group, by_device)
        else:
            self._incremental_step(group, by_device)

    def _lr_args(self, group, device):
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return float(lr.item()), lr.detach().to(device=device, dtype=torch.float32)
        return float(lr), None

    @staticmethod
    def _by_device(params, grads, device):
        """[(device, params, contiguous grads)], one entry per device. A
        non-contiguous grad is copied once: the ops index every tensor by flat
        position, so no flat view is made (a view per param cost 1 ms per 1000)."""
        if device is not None:
            return [(device, params, _contiguous(grads))]
        out = {}
        for p, g in zip(params, grads):
            ps, gs = out.setdefault(p.device, ([], []))
            ps.append(p)
            gs.append(g)
        return [(d, ps, _contiguous(gs)) for d, (ps, gs) in out.items()]

    def _init_states(self, group, params, states, ks, sparse):
        """Creates the state a step needs where it is missing (`ks`: k-long state)."""
        for i, p in enumerate(params):
            self._init_state(group, p, None if ks is None else ks[i], sparse)

    def _dense_step(self, group, by_device):
        state = self.state
        for device, ps, grads in by_device:
            states = [state[p] for p in ps]
            self._init_states(group, ps, states, None, sparse=False)
            work = _Work(ps, grads, states)
            self._apply(group, work, device)
            work.write_back()

    # -- incremental (sparse) steps --------------------------------------------------

    def _buffer(self, p, key):
        """A per-param fp32 (fp64 for fp64 params) buffer of the param's size, created
        zeroed on first use: grad_acc, residual, fisher, velocity."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros(p.shape, dtype=ops.math_dtype(p.dtype), device=p.device)
        return state[key]

    def _check_incremental(self, group, by_device):
        """Checks that need the whole group, before anything is touched."""
        if group["scope"] == "global" and len(by_device) > 1:
            raise RuntimeError("scope='global' needs all params of a group on one device, got "
                               + ", ".join(sorted(str(d) for d, _, _ in by_device)))
        if group.get("momentum_correction") and group["accumulate_steps"] != 1:
            raise RuntimeError("momentum_correction=True does not combine with "
                               "accumulate_steps > 1")

    def _accumulate(self, group, params, grads):
        """Every step() call: fold this call's grads into the buffers the update reads."""
        n = group["accumulate_steps"]
        if group["select"] == "accumulated":
            if group.get("momentum_correction"):
                # DGC: a local velocity u = m u + g, accumulated into the residual.
                velocity = [self._buffer(p, "velocity") for p in params]
                torch._foreach_mul_(velocity, float(group["momentum"]))
                ops.accumulate_(velocity, grads, 1.0)
                ops.accumulate_([self._buffer(p, "residual") for p in params], velocity, 1.0)
            else:
                ops.accumulate_([self._buffer(p, "residual") for p in params], grads, 1.0 / n)
        elif n > 1:
            ops.accumulate_([self._buffer(p, "grad_acc") for p in params], grads, 1.0)
        if group["select"] == "grad_sq":
            beta = float(group["fisher_beta"])
            ops.accumulate_([], grads, 1.0, [self._buffer(p, "fisher") for p in params],
                            sq_alpha=1.0 - beta, sq_decay=beta)

    def _select(self, group, params, states, sources, param_views):
        """Indices to update in each param, or None for all of them."""
        density = float(group["density"])
        mask = group["mask"]
        select = group["select"]
        if select == "layer":
            return self._select_layers(group, params, states)
        if density >= 1.0:
            return None
        if mask == "fixed":
            keep = all("indices" in s for s in states)
        elif mask == "dynamic":
            keep = False
        else:
            keep = group["updates"] % mask != 0 and all("indices" in s for s in states)
        if keep:
            return [s["indices"].long() for s in states]
        score, tensors, weights = "grad", sources, None
        if select == "grad_sq":
            score, tensors = "grad_sq", [s["fisher"] for s in states]
        elif select == "weight":
            score, weights = "weight", param_views
        elif select == "random":
            score = "random"
        indices = ops.select(tensors, density, score=score, scope=group["scope"],
                             approx=group["topk"] == "approx", weights=weights,
                             validate=False)
        if mask != "dynamic":
            # Kept as int32 where positions fit: with k-long fp32 moments a fixed mask
            # then costs 12 bytes per chosen element instead of 16.
            for s, idx, p in zip(states, indices, params):
                s["indices"] = idx.to(torch.int32) if p.numel() < 2 ** 31 else idx
        return indices

    def _select_layers(self, group, params, states):
        """select='layer': whole tensors, drawn at random until they hold a `density`
        fraction of the group's elements; every other tensor stays frozen."""
        mask = group["mask"]
        reselect = (mask == "dynamic" or "layer_chosen" not in states[0]
                    or (isinstance(mask, int) and group["updates"] % mask == 0))
        if not reselect:
            chosen = [bool(s["layer_chosen"]) for s in states]
        else:
            total = sum(p.numel() for p in params)
            target = math.ceil(float(group["density"]) * total)
            order = torch.randperm(len(params)).tolist()
            chosen, taken = [False] * len(params), 0
            for i in order:
                if taken >= target and any(chosen):
                    break
                chosen[i] = True
                taken += params[i].numel()
            for s, c in zip(states, chosen):
                s["layer_chosen"] = torch.tensor(c)
        return [None if c else torch.empty(0, dtype=torch.int64, device=p.device)
                for p, c in zip(params, chosen)]

    def _fused_eligible(self, group, by_device):
        """Whether a step of this group can select and update in one kernel call
        (_select_update): CPU, |grad| or error feedback per tensor, reselected at every
        update, one bias correction per tensor, no accumulation over calls, fp32, bf16
        or fp16 params, and the cost model's choice (use_fused)."""
        if (type(self)._select_update is IncrementalOptimizer._select_update
                or len(by_device) != 1 or by_device[0][0].type != "cpu"
                or group["select"] not in ("grad", "accumulated")
                or group["scope"] != "tensor" or group["mask"] != "dynamic"
                or group["bias_correction"] != "tensor" or group["accumulate_steps"] != 1
                or group.get("momentum_correction")):
            return False
        params = by_device[0][1]
        if any(p.dtype not in _FUSED_DTYPES for p in params):
            return False
        return use_fused(float(group["density"]), max(p.numel() for p in params))

    def _select_update(self, group, work, device, ks, residuals, approx):
        """The fused kernel call (subclasses that have one): select by |grad| (or
        |residual + grad|) and update, per tensor."""
        raise NotImplementedError

    def _fused_step(self, group, by_device):
        (device, ps, grads), = by_device
        states = [self.state[p] for p in ps]
        self._init_states(group, ps, states, None, sparse=True)
        residuals = None
        if group["select"] == "accumulated":
            residuals = [self._buffer(p, "residual") for p in ps]
        density = float(group["density"])
        ks = [ops.density_k(density, p.numel()) for p in ps]
        work = _Work(ps, grads, states)
        self._select_update(group, work, device, ks, residuals, group["topk"] == "approx")
        work.write_back()
        group["updates"] += 1

    def _incremental_step(self, group, by_device):
        self._check_incremental(group, by_device)
        if self._fused_eligible(group, by_device):
            self._fused_step(group, by_device)
            return
        for _, ps, grads in by_device:
            self._accumulate(group, ps, grads)
        group["accumulated_calls"] += 1
        if group["accumulated_calls"] < group["accumulate_steps"]:
            return
        group["accumulated_calls"] = 0
        n = group["accumulate_steps"]
        select = group["select"]
        state = self.state
        for device, ps, grads in by_device:
            states = [state[p] for p in ps]
            if select == "accumulated":
                sources = [s["residual"] for s in states]
                scale, consume = 1.0, True
            elif n > 1:
                sources = [s["grad_acc"] for s in states]
                scale, consume = 1.0 / n, True
            else:
                sources, scale, consume = grads, 1.0, False
            work = _Work(ps, sources, states)
            indices = self._select(group, ps, states, sources, work.param_views)
            partial = indices is not None
            if select == "layer":  # whole tensors: a dense update of the chosen ones
                chosen = [i for i, idx in enumerate(indices) if idx is None]
                work = _Work([ps[i] for i in chosen], [sources[i] for i in chosen],
                             [states[i] for i in chosen])
                indices = None
            self._update(group, work, device, indices, scale, consume)
            if n > 1 and select != "accumulated" and partial:
                torch._foreach_zero_(sources)  # the unchosen part of the mean is spent too
            if group.get("momentum_correction") and indices is not None:
                for s, idx in zip(states, indices):  # momentum factor masking (flat positions)
                    s["velocity"].view(-1).index_fill_(0, idx, 0.0)
            work.write_back()
        group["updates"] += 1

    def _update(self, group, work, device, indices, grad_scale, consume_grad):
        compact = group["mask"] == "fixed" and indices is not None
        self._init_states(group, work.params, work.states,
                          [idx.numel() for idx in indices] if compact else None,
                          sparse=indices is not None)
        ages = None
        if indices is not None and all("age" in s for s in work.states):
            ages = [s["age"] for s in work.states]
        masks = None
        if (indices is not None and not compact and ages is None and device.type == "cpu"
                and float(group["density"]) >= MASK_DENSITY):
            masks = [torch.zeros(p.numel(), dtype=torch.bool, device=device)
                     .index_fill_(0, i, True) for p, i in zip(work.params, indices)]
            indices = None
        self._apply(group, work, device, grads=work.grads, indices=indices, masks=masks,
                    ages=ages, grad_scale=grad_scale, consume_grad=consume_grad,
                    compact_state=compact)


class _Work:
    """The tensors one kernel call works on: contiguous params (copies for
    non-contiguous ones, written back afterwards: an in-place kernel never updates a
    temporary silently), their contiguous grads and their state dicts."""

    def __init__(self, params, grads, states):
        self.params = params
        self.param_views = _contiguous(params)
        self.grads = grads
        self.states = states

    def write_back(self):
        for p, v in zip(self.params, self.param_views):
            if v is not p:
                p.copy_(v)
