"""The base class of incrkern's optimizers: torch.optim.Optimizer plus incremental
(sparse) updates.

A step, for each param group:
  1. validate every param and grad of every group (nothing is touched before this);
  2. gradient source: `.grad`, or an fp32 accumulator (`accumulate_steps` > 1: the
     mean of the last n grads), or the error-feedback residual (`select="accumulated"`);
  3. on an updating step, choose the indices (`density` < 1) by `select` over a
     tensor or the whole group (`scope`), now or from a kept mask (`mask`), or
     given beforehand (`set_mask`);
  4. one fused kernel call per device applies the update rule at those indices
     only (on the CPU from MASK_DENSITY on, through a bool mask of them: one
     streaming pass), reading (and, for accumulators, clearing) the gradient source.
Params with a sparse COO grad take their own path (`_sparse_step`): the candidates
are the elements present in the grad.
With the defaults (density 1, accumulate_steps 1) it is exactly the dense torch
optimizer: same math, same state keys, same state_dict. Adam's common incremental
step on the CPU skips steps 1 to 4 here for one C++ call (fast_step.py).
"""
import math

import torch
from torch.optim import Optimizer

from .. import ops
from .checks import _check_loaded_param_state, _check_lr, check_incremental_options
from .checks import checked_positions as _checked_positions
from .checks import stored_positions as _stored_positions
from .device_steps import check_capturable, skips_on_device
from .work import Work, contiguous


# From this density on, a CPU step updates through a bool mask (one streaming pass
# over every element, at the dense step's speed) instead of the chosen positions (a
# scattered access each, growing with the lines they touch): measured by
# bench/crossover_update.py (docs/design.md, "Choosing a path", and docs/measurements.md).
MASK_DENSITY = 0.1

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The fused select-and-update (ops.adam_select_update_) against select then update
# (by positions, or by mask from MASK_DENSITY on), per tensor, measured with
# bench/crossover_fused.py and the sparse benchmark's models (docs/measurements.md):
# on tensors of up to 2^18 elements the fused call wins at every density (no
# positions returned, no second op call); on larger ones it wins with error feedback
# at every density (the composed path accumulates, selects and updates in three
# passes) and with |grad| from FUSED_MIN_DENSITY on; below it the two measured alike.
FUSED_SMALL_NUMEL = 2 ** 18
FUSED_MIN_DENSITY = 0.001
# select="weight" on the CPU: from this density on the fused call (its threshold
# stream reads the keys |p| in the pass that updates them; below the stream's density
# it takes select's positions without the second op call). It measured faster than the
# masks and positions it replaces at every density from 0.001 to 0.9
# (docs/measurements-selects.md); 2.0 sends every step the composed way (the tests' way to it).
FUSED_WEIGHT_DENSITY = 0.0
# select="grad_sq" on the CPU: from this density on the fused call, its keys read from
# the Fisher after the Fisher's accumulate (in the one-call step, formed by the kernel as
# it reads them: docs/measurements-selects.md); 2.0 as above.
FUSED_GRAD_SQ_DENSITY = 0.0
# select="random" on the CPU: from this density on the fused call, its keys hashed
# from the indices (one seed drawn per call, as select draws it); 2.0 as above.
FUSED_RANDOM_DENSITY = 0.0
# scope="global" on the CPU (Adam or SGD, by |grad| or error feedback): from this density
# on the one C++ step over every tensor's blocks as one list (from the stream's density
# the global threshold stream, below it |g|'s tile lists, each on one band around the
# concatenation's k-th) instead of select(scope="global") then the update; 2.0 as above.
FUSED_GLOBAL_DENSITY = 0.0
# SGD (select="grad" or "accumulated") on the CPU: from this density on
# ops.sgd_select_update_ (the threshold stream from its densities on, select's positions
# or with error feedback the listing pass below them) instead of select then sgd_update_
# (docs/measurements-selects.md); 2.0 as above.
FUSED_SGD_DENSITY = 0.0


def fused_options(group, scope="tensor"):
    """Whether the group's options let the fused select-and-update step it: |grad|,
    error feedback, |weight|, the Fisher or at random per tensor (or in `scope`),
    reselected at every update, one bias correction per tensor, no AMSGrad (the fused
    kernel keeps no max_exp_avg_sq), no momentum correction; with accumulate_steps,
    |grad| only (error feedback accumulates a scaled gradient)."""
    return (group["select"] in ("grad", "accumulated", "weight", "grad_sq", "random")
            and group["scope"] == scope
            and group["mask"] == "dynamic" and group["bias_correction"] == "tensor"
            and (group["accumulate_steps"] == 1 or group["select"] == "grad")
            and not group.get("momentum_correction") and not group.get("amsgrad"))


def accumulation_target(group):
    """(state buffer, alpha) that each step() call adds its grads to, times alpha:
    the residual (grad / n) with error feedback, grad_acc with accumulate_steps = n >
    1; None when the grads go straight to the update. Error feedback with momentum
    correction accumulates a velocity first (_accumulate)."""
    if group["select"] == "accumulated":
        return "residual", 1.0 / group["accumulate_steps"]
    if group["accumulate_steps"] > 1:
        return "grad_acc", 1.0
    return None


# The selects whose fused step is the CPU's only, each with the name of its density
# constant above (read when a step runs, so that a test can set it).
_KEYED_DENSITY = {"weight": "FUSED_WEIGHT_DENSITY", "grad_sq": "FUSED_GRAD_SQ_DENSITY",
                  "random": "FUSED_RANDOM_DENSITY"}


def fused_score(select):
    """The fused kernel's score for a group's `select` (|grad| for "grad" and
    "accumulated", whose residual the kernel adds)."""
    return select if select in _KEYED_DENSITY else "grad"


def use_fused(density, numel, select="grad", rule="adam"):
    """Whether a tensor of `numel` elements stepped at `density` with this `select`
    takes the fused kernel of its optimizer's `rule` ("adam" or "sgd")."""
    if rule == "sgd":
        return density >= FUSED_SGD_DENSITY
    if select in _KEYED_DENSITY:
        return density >= globals()[_KEYED_DENSITY[select]]
    return (numel <= FUSED_SMALL_NUMEL or select == "accumulated"
            or density >= FUSED_MIN_DENSITY)


# The group options every incrkern optimizer adds to torch's.
INCREMENTAL_DEFAULTS = dict(density=1.0, select="grad", scope="tensor", topk="exact",
                            accumulate_steps=1, mask="dynamic", bias_correction="tensor",
                            fisher_beta=0.99)


SPARSE_GRAD_OPTIONS = dict(select="grad", scope="tensor", mask="dynamic", accumulate_steps=1)


def _present_elements(grad):
    """Flat positions (int64, ascending) and values of the elements present in a
    sparse COO gradient (whole rows of a hybrid one), duplicate indices summed."""
    g = grad.coalesce()
    sparse_dim = g.sparse_dim()
    indices, values = g.indices(), g.values()
    rows = torch.zeros(indices.shape[1], dtype=torch.int64, device=g.device)
    for d in range(sparse_dim):
        rows = rows * g.shape[d] + indices[d]
    row_size = math.prod(g.shape[sparse_dim:])
    positions = rows.unsqueeze(1) * row_size + torch.arange(row_size, device=g.device)
    return positions.reshape(-1), values.reshape(-1)


class IncrementalOptimizer(Optimizer):
    """Shared machinery of incrkern.optim.SGD / Adam / AdamW.

    Subclasses implement `_init_state(group, p, k, sparse)` (creates what is missing:
    k-long when k is given, param-sized otherwise; or `_init_states` over a list) and
    `_apply(group, work, device, ...)` (the fused kernel call).

    A step costs a few attribute reads per param in Python; lists are built once per
    step and passed down, never re-derived per param (a model's thousand small
    tensors otherwise spend more time here than in the kernels; docs/design.md,
    "Measurements").
    """

    _counts_steps = False  # a subclass keeping a `step` tensor per param sets it
    _fused_rule = "adam"  # whose fused kernel _select_update calls (use_fused's rule)
    # The selects that kernel takes (the keyed ones on the CPU only).
    _fused_selects = ("grad", "accumulated", "weight", "grad_sq", "random")
    # scope="global" groups select through this callable(group, params, tensors,
    # score, weights) -> indices when set: incrkern.distributed.ShardedOptimizer's
    # selection agreed across ranks, on local shards.
    _global_select = None
    # select="layer" counts a param's elements with this callable(param) when set:
    # ShardedOptimizer's full tensors' sizes, so that every rank draws the same layers.
    _layer_numel = None
    # torch.amp.GradScaler then hands step() its loss scale and inf flag (attributes
    # grad_scale and found_inf) instead of unscaling the grads and reading the flag:
    # the kernels unscale as they read, and skip on the device (_amp_kwargs).
    _step_supports_amp_scaling = True
    _amp = (None, None)  # (amp_scale, found_inf) while a step runs

    def __init__(self, params, defaults, incremental):
        preset = None
        if isinstance(incremental.get("mask"), dict):
            # A precomputed mask is a fixed mask whose positions are given, not chosen
            # at the first step: the group keeps mask="fixed", the positions live in
            # each param's state as `indices` (and so in the state_dict).
            preset = incremental["mask"]
            incremental = dict(incremental, mask="fixed")
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
        if preset is not None:
            self.set_mask(preset)

    # -- precomputed masks ---------------------------------------------------------------

    def set_mask(self, masks):
        """Gives the positions each param trains, in place of a selection.

        masks: {param: 1-D int32/int64 tensor of flat positions} (e.g. from
        incrkern.finetune.fish_mask). Every param of a group that gets a mask needs
        one, the group needs mask="fixed" (the constructor's `mask={...}` sets it)
        and not select="layer", and no param may have optimizer state yet. Positions
        are sorted; duplicates or positions outside the param raise. The state is
        then as a fixed mask's: `indices` and k-long moments. Nothing is changed
        unless every mask is valid.
        """
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict {{param: index tensor}}, got "
                            f"{type(masks).__name__}")
        where = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                where[id(p)] = (gi, i)
        checked, groups = [], set()
        for p, idx in masks.items():
            if not isinstance(p, torch.Tensor) or id(p) not in where:
                raise ValueError("masks has a key that is not a param of this optimizer")
            gi, i = where[id(p)]
            name = f"masks[param_groups[{gi}]['params'][{i}]]"
            checked.append((p, _checked_positions(name, idx, p)))
            groups.add(gi)
        given = {id(p) for p, _ in checked}
        for gi in sorted(groups):
            group = self.param_groups[gi]
            if group["mask"] != "fixed" or group["select"] == "layer":
                raise ValueError(f"param_groups[{gi}]: a given mask needs mask='fixed' and "
                                 f"a select other than 'layer', got mask={group['mask']!r}, "
                                 f"select={group['select']!r}")
            for i, p in enumerate(group["params"]):
                if id(p) not in given:
                    raise ValueError(f"masks: param_groups[{gi}]['params'][{i}] has no mask; "
                                     f"a group's params get masks all or none")
                if self.state.get(p):
                    raise RuntimeError(f"param_groups[{gi}]['params'][{i}] already has "
                                       f"optimizer state: set the mask before the first step")
        for p, idx in checked:
            self.state[p]["indices"] = idx

    def _has_given_mask(self, group):
        """A fixed-mask group whose positions are kept: sparse whatever its density."""
        params = group["params"]
        return (group["mask"] == "fixed" and bool(params)
                and "indices" in self.state.get(params[0], ()))

    # -- groups and state_dict ---------------------------------------------------------

    def add_param_group(self, param_group):
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError(f"complex params are not supported, got {p.dtype}")
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
        bf16/fp16 params) instead of being rounded to the param's dtype, and the
        state's sizes and kept indices are checked against the params first (the
        kernels trust the indices on CUDA): a bad state_dict raises and changes
        nothing."""
        saved_state = state_dict["state"]
        self._check_loaded_state(state_dict)
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

    def _check_loaded_state(self, state_dict):
        """Raises ValueError, naming the param, where a saved state does not fit it:
        kept `indices` that are not 1-D int32/int64 distinct positions in [0, numel),
        or state tensors of neither the param's size nor (fixed mask) the number of
        kept indices. Group count and sizes are left to torch's own check."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"])
                for s, g in zip(saved_groups, self.param_groups)):
            return
        saved_state = state_dict["state"]
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            compact = saved.get("mask", group["mask"]) == "fixed"
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                state = saved_state.get(pid)
                if state:
                    where = (f"state_dict['state'][{pid!r}] (param_groups[{gi}]"
                             f"['params'][{i}], {p.numel()} elements)")
                    _check_loaded_param_state(where, state, p.numel(), compact)

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
                if g.layout is torch.sparse_coo:  # checked and stepped on their own
                    self._saw_sparse_grad = True
                    continue
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
        if g.layout not in (torch.strided, torch.sparse_coo):
            raise RuntimeError(f"{where}: {g.layout} gradients are not supported (sparse "
                               "COO ones are)")
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
        for group in self.param_groups:
            _check_lr(group["lr"])
            self._check_differentiable(group)
        if self._fast_step():
            return loss
        self._saw_sparse_grad = False
        plans = [(group, *self._params_with_grad(group, gi))
                 for gi, group in enumerate(self.param_groups)]
        sparse_plans = [(group, self._params_with_sparse_grad(group, gi))
                        for gi, group in enumerate(self.param_groups)
                        ] if self._saw_sparse_grad else []
        if self._counts_steps:
            self._check_unshared_steps([params for _, params, _, _ in plans]
                                       + [[p for p, _ in pairs] for _, pairs in sparse_plans])
        # No stream captures before CUDA is initialized: is_initialized reads a flag,
        # where is_available makes calls (the build, the environment, the device count).
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            check_capturable(self, plans, sparse_plans)
        amp_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not skips_on_device(self, plans, sparse_plans, found_inf):
            if found_inf.item():  # on the host: free for a CPU flag, one sync for a GPU's
                return loss
            found_inf = None
        self._amp = (amp_scale, found_inf)
        try:
            for group, params, grads, device in plans:
                if params:
                    self._step_group(group, self._by_device(params, grads, device))
            for group, pairs in sparse_plans:
                if pairs:
                    self._sparse_step(group, pairs)
        finally:
            self._amp = (None, None)
        return loss

    def _fast_step(self):
        """Steps every group at once, in C++, when the step is the plain case
        (subclasses that can); False when nothing was touched."""
        return False

    def _amp_kwargs(self, device, unscale=True):
        """The mixed-precision arguments of a kernel call on `device`: the loss scale
        when it reads the scaled grads (`unscale`; not for residuals and accumulators,
        which hold unscaled sums), and the inf flag when the kernels skip on it."""
        amp_scale, found_inf = self._amp
        if amp_scale is None and found_inf is None:
            return {}
        amp_scale = amp_scale if unscale else None
        return dict(amp_scale=None if amp_scale is None else amp_scale.to(device),
                    found_inf=None if found_inf is None else found_inf.to(device))

    def _check_unshared_steps(self, params_per_group):
        """A `step` tensor shared by two params would count one update per param on
        the CPU (the kernel increments each listed counter) and one in all on CUDA:
        refused, before anything runs. Compared by identity, cheaper than a data_ptr()
        call per param on every step; the error path alone walks the groups to name
        the params."""
        state = self.state
        ptrs = [id(s["step"]) for params in params_per_group
                for s in map(state.get, params) if s and "step" in s]
        if len(set(ptrs)) == len(ptrs):
            return
        owners = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                s = state.get(p)
                if p.grad is None or not s or "step" not in s:
                    continue
                where = f"param_groups[{gi}]['params'][{i}]"
                first = owners.setdefault(id(s["step"]), where)
                if first != where:
                    raise RuntimeError(f"{first} and {where} share one state['step'] tensor: "
                                       "each param needs its own update count")

    def _is_dense(self, group):
        return (group["density"] >= 1.0 and group["accumulate_steps"] == 1
                and group["select"] != "accumulated" and not self._has_given_mask(group))

    def _check_differentiable(self, group):
        if group.get("differentiable") and group.get("master_weights"):
            raise ValueError("differentiable=True does not combine with master_weights=True")
        if group.get("differentiable") and not self._is_dense(group):
            raise ValueError(
                "differentiable=True steps with torch's own differentiable ops (the "
                "kernels are not): it needs the dense defaults, density=1.0 with no "
                "accumulate_steps, error feedback or given mask")

    def _step_group(self, group, by_device):
        if group.get("differentiable"):
            for _, ps, grads in by_device:
                if any(p.dtype not in (torch.float32, torch.float64) for p in ps):
                    raise RuntimeError("differentiable=True takes float32 or float64 params "
                                       "(bf16/fp16 params keep fp32 state here, which "
                                       "torch's differentiable step does not mix)")
            amp_scale, found_inf = self._amp
            with torch.enable_grad():
                for _, ps, grads in by_device:
                    self._differentiable_step(group, ps, grads, amp_scale, found_inf)
        elif self._is_dense(group):
            self._dense_step(group, by_device)
        else:
            self._incremental_step(group, by_device)

    def _lr_args(self, group, device):
        """(lr, lr_tensor) for an update op. A tensor lr goes to the kernel as a tensor
        on the params' device, its value unread here (lr=0.0 is then ignored), except
        a CPU tensor for CUDA params: read on the host, it costs no device sync."""
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            return float(lr), None
        if lr.device.type == "cpu" and device.type != "cpu":
            return float(lr), None
        return 0.0, lr.detach().to(device=device, dtype=torch.float32)

    @staticmethod
    def _by_device(params, grads, device):
        """[(device, params, contiguous grads)], one entry per device. A
        non-contiguous grad is copied once: the ops index every tensor by flat
        position, so no flat view is made (docs/measurements.md)."""
        if device is not None:
            return [(device, params, contiguous(grads))]
        out = {}
        for p, g in zip(params, grads):
            ps, gs = out.setdefault(p.device, ([], []))
            ps.append(p)
            gs.append(g)
        return [(d, ps, contiguous(gs)) for d, (ps, gs) in out.items()]

    def _differentiable_step(self, group, params, grads, amp_scale, found_inf):
        """differentiable=True (subclasses): the step by torch.optim's functional
        single-tensor implementation, which autograd records."""
        raise NotImplementedError

    def _init_states(self, group, params, states, ks, sparse):
        """Creates the state a step needs where it is missing (`ks`: k-long state)."""
        for i, p in enumerate(params):
            self._init_state(group, p, None if ks is None else ks[i], sparse)

    def _dense_step(self, group, by_device):
        state = self.state
        for device, ps, grads in by_device:
            states = [state[p] for p in ps]
            self._init_states(group, ps, states, None, sparse=False)
            work = Work(ps, grads, states, self._masters(group, ps))
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
        amp = self._amp_kwargs(grads[0].device) if grads else {}
        if group["select"] == "accumulated" and group.get("momentum_correction"):
            # DGC: a local velocity u = m u + g, accumulated into the residual.
            velocity = [self._buffer(p, "velocity") for p in params]
            torch._foreach_mul_(velocity, float(group["momentum"]))
            ops.accumulate_(velocity, grads, 1.0, **amp)
            ops.accumulate_([self._buffer(p, "residual") for p in params], velocity, 1.0,
                            **self._amp_kwargs(grads[0].device, unscale=False))
        elif (target := accumulation_target(group)) is not None:
            buffer, alpha = target
            ops.accumulate_([self._buffer(p, buffer) for p in params], grads, alpha, **amp)
        if group["select"] == "grad_sq":
            self._accumulate_fisher(group, params, grads)

    def _accumulate_fisher(self, group, params, grads):
        """fisher = fisher_beta * fisher + (1 - fisher_beta) * g^2, per param; returns
        the Fisher buffers (select="grad_sq"'s scores)."""
        beta = float(group["fisher_beta"])
        fishers = [self._buffer(p, "fisher") for p in params]
        amp = self._amp_kwargs(grads[0].device) if grads else {}
        ops.accumulate_([], grads, 1.0, fishers, sq_alpha=1.0 - beta, sq_decay=beta, **amp)
        return fishers

    def _select(self, group, params, states, sources, contiguous_params):
        """Indices to update in each param, or None for all of them."""
        density = float(group["density"])
        mask = group["mask"]
        select = group["select"]
        if select == "layer":
            return self._select_layers(group, params, states)
        if mask == "fixed":
            keep = all("indices" in s for s in states)
        elif mask == "dynamic":
            keep = False
        else:
            keep = group["updates"] % mask != 0 and all("indices" in s for s in states)
        if keep:
            return [s["indices"].long() for s in states]
        if density >= 1.0:
            return None
        score, tensors, weights = _scores(select, states, sources, contiguous_params)
        if group["scope"] == "global" and self._global_select is not None:
            indices = self._global_select(group, params, tensors, score, weights)
        else:
            indices = ops.select(tensors, density, score=score, scope=group["scope"],
                                 approx=group["topk"] == "approx", weights=weights,
                                 validate=False)
        if mask != "dynamic":
            for s, idx, p in zip(states, indices, params):
                s["indices"] = _stored_positions(idx, p)
        return indices

    def _select_masks(self, group, states, sources, contiguous_params, device):
        """Per param a flat bool mask of the elements to update, where the update takes
        one (a CPU step from MASK_DENSITY on, reselected every step, no per-element
        ages, no momentum correction, which clears the chosen positions of its
        velocity) and ops.select_mask makes it; None otherwise (_select's positions).
        The masks are views of one buffer kept between steps."""
        density = float(group["density"])
        if (device.type != "cpu" or not ops.EXTENSION_LOADED
                or not MASK_DENSITY <= density < 1.0 or group["mask"] != "dynamic"
                or group["select"] == "layer"
                or group["scope"] == "global" and self._global_select is not None
                or group.get("momentum_correction")
                or group.get("bias_correction") == "element"):
            return None
        score, tensors, weights = _scores(group["select"], states, sources, contiguous_params)
        numels = [t.numel() for t in tensors]
        total = sum(numels)
        buffers = self.__dict__.setdefault("_mask_buffers", {})
        buffer = buffers.get(device)
        if buffer is None or buffer.numel() < total:
            buffer = buffers[device] = torch.empty(total, dtype=torch.bool, device=device)
        out = list(buffer[:total].split(numels))
        return ops.select_mask(tensors, density, score=score, scope=group["scope"],
                               weights=weights, out=out, validate=False)

    def _select_layers(self, group, params, states):
        """select='layer': whole tensors, drawn at random until they hold a `density`
        fraction of the group's elements; every other tensor stays frozen."""
        mask = group["mask"]
        reselect = (mask == "dynamic" or "layer_chosen" not in states[0]
                    or (isinstance(mask, int) and group["updates"] % mask == 0))
        if not reselect:
            chosen = [bool(s["layer_chosen"]) for s in states]
        else:
            numels = [p.numel() for p in params] if self._layer_numel is None else \
                [self._layer_numel(p) for p in params]
            target = math.ceil(float(group["density"]) * sum(numels))
            order = torch.randperm(len(params)).tolist()
            chosen, taken = [False] * len(params), 0
            for i in order:
                if taken >= target and any(chosen):
                    break
                chosen[i] = True
                taken += numels[i]
            for s, c in zip(states, chosen):
                s["layer_chosen"] = torch.tensor(c)
        return [None if c else torch.empty(0, dtype=torch.int64, device=p.device)
                for p, c in zip(params, chosen)]

    def _fused_eligible(self, group, by_device):
        """Whether a step of this group can select and update in one kernel call
        (_select_update): CPU (or CUDA with ops.FUSED_CUDA), |grad| or error feedback
        per tensor, reselected at every update, one bias correction per tensor, no
        AMSGrad (the fused kernel keeps no max_exp_avg_sq), fp32, bf16 or fp16 params.
        With accumulate_steps, the last call's accumulate joins the kernel's pass
        (|grad| only: error feedback accumulates a scaled gradient). Which tensors then
        take it is the cost model's choice (use_fused, per tensor)."""
        cpu = by_device and by_device[0][0].type == "cpu"
        if (type(self)._select_update is IncrementalOptimizer._select_update
                or len(by_device) != 1
                or not (cpu or (by_device[0][0].type == "cuda" and self._fused_cuda()))
                or not fused_options(group) or group["select"] not in self._fused_selects
                or group["select"] in _KEYED_DENSITY and not cpu):  # CPU kernels only
            return False
        return all(p.dtype in _FUSED_DTYPES for p in by_device[0][1])

    def _fused_cuda(self):
        """Whether the fused kernel's CUDA form is on (read at each step)."""
        return ops.FUSED_CUDA

    def _select_update(self, group, work, device, ks, residuals, approx, grad_scale=1.0,
                       scores=None):
        """The fused kernel call (subclasses that have one): select by |grad| (or
        |residual + grad|, |weight|, or the given scores: the Fisher) and update with
        the gradient times grad_scale, per tensor."""
        raise NotImplementedError

    def _fused_step(self, group, device, ps, grads):
        """The fused kernel over these params. With accumulate_steps = n > 1 the
        accumulated gradient joins as the kernel's residual: it selects by
        |acc + grad| and updates with the mean (acc + grad) / n; the unchosen part of
        the sum is spent like the chosen one."""
        states = [self.state[p] for p in ps]
        self._init_states(group, ps, states, None, sparse=True)
        n = group["accumulate_steps"]
        residuals, grad_scale, scores = None, 1.0, None
        if group["select"] == "grad_sq":
            scores = self._accumulate_fisher(group, ps, grads)
        elif group["select"] == "accumulated":
            residuals = [self._buffer(p, "residual") for p in ps]
        elif n > 1:
            residuals, grad_scale = [self._buffer(p, "grad_acc") for p in ps], 1.0 / n
        density = float(group["density"])
        ks = [ops.density_k(density, p.numel()) for p in ps]
        work = Work(ps, grads, states, self._masters(group, ps))
        self._select_update(group, work, device, ks, residuals, group["topk"] == "approx",
                            grad_scale, scores)
        if n > 1:
            torch._foreach_zero_(residuals)
        work.write_back()

    def _incremental_step(self, group, by_device):
        self._check_incremental(group, by_device)
        fused = None  # (device, params, grads) for the fused kernel, at an update
        if (group["accumulated_calls"] + 1 >= group["accumulate_steps"]
                and self._fused_eligible(group, by_device)):
            (device, ps, grads), = by_device
            density = float(group["density"])
            # On a GPU the fused call wins at every size: it saves the composed path's
            # count, scan and compaction passes and its indexed update's launches.
            take = [device.type == "cuda"
                    or use_fused(density, p.numel(), group["select"], self._fused_rule)
                    for p in ps]
            fused = (device, [p for p, t in zip(ps, take) if t],
                     [g for g, t in zip(grads, take) if t])
            by_device = [(device, [p for p, t in zip(ps, take) if not t],
                          [g for g, t in zip(grads, take) if not t])]
        by_device = [(device, ps, grads) for device, ps, grads in by_device if ps]
        for _, ps, grads in by_device:
            self._accumulate(group, ps, grads)
        group["accumulated_calls"] += 1
        if group["accumulated_calls"] < group["accumulate_steps"]:
            return
        group["accumulated_calls"] = 0
        if fused and fused[1]:
            self._fused_step(group, *fused)
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
            unscale = sources is grads  # residuals and accumulators hold unscaled sums
            masters = self._masters(group, ps)
            work = Work(ps, sources, states, masters)
            masks = self._select_masks(group, states, sources, work.contiguous_params, device)
            indices = None if masks is not None else \
                self._select(group, ps, states, sources, work.contiguous_params)
            partial = indices is not None or masks is not None
            if select == "layer":  # whole tensors: a dense update of the chosen ones
                chosen = [i for i, idx in enumerate(indices) if idx is None]
                work = Work([ps[i] for i in chosen], [sources[i] for i in chosen],
                             [states[i] for i in chosen],
                             None if masters is None else [masters[i] for i in chosen])
                indices = None
            self._update(group, work, device, indices, scale, consume, unscale, masks)
            if n > 1 and select != "accumulated" and partial:
                torch._foreach_zero_(sources)  # the unchosen part of the mean is spent too
            if group.get("momentum_correction") and indices is not None:
                for s, idx in zip(states, indices):  # momentum factor masking (flat positions)
                    s["velocity"].view(-1).index_fill_(0, idx, 0.0)
            work.write_back()
        group["updates"] += 1

    # -- sparse (COO) gradients -----------------------------------------------------

    def _params_with_sparse_grad(self, group, gi):
        """[(param, grad)] of the group's params whose grad is sparse COO, each checked,
        with the group's options, before anything runs."""
        pairs = []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None or g.layout is not torch.sparse_coo:
                continue
            where = f"param_groups[{gi}]['params'][{i}]"
            if (g.shape != p.shape or g.dtype is not p.dtype or g.device != p.device
                    or p.dtype.is_complex
                    or (p.dtype is torch.float64 and p.device.type == "cuda")):
                self._bad_grad(where, p, g)
            for key, needed in SPARSE_GRAD_OPTIONS.items():
                if group[key] != needed:
                    raise RuntimeError(
                        f"{where}: a sparse gradient needs {key}={needed!r}, the group has "
                        f"{key}={group[key]!r} (a param group of its own can set it)")
            pairs.append((p, g))
        return pairs

    def _sparse_step(self, group, pairs):
        """Lazy update from sparse COO grads, as torch.optim.SparseAdam: the candidates
        are the elements present in the coalesced grad (duplicates summed), `density`
        of them by |g| are updated, every other element and its state stay as they
        are. The chosen values go through a zeroed param-sized scratch gradient that
        the update op consumes (zeroes again where it read): O(k) work per step."""
        density = float(group["density"])
        approx = group["topk"] == "approx"
        for p, g in pairs:
            positions, values = _present_elements(g)
            k = min(values.numel(), math.ceil(density * values.numel()))
            if k < values.numel():
                chosen = ops.topk(values.abs(), k, approx=approx)
                positions, values = positions[chosen], values[chosen]
            masters = self._masters(group, [p])
            target = p if masters is None or masters[0] is None else masters[0]
            scratch = self._sparse_scratch(target)
            scratch.view(-1).index_copy_(0, positions, values.to(target.dtype))
            work = Work([p], [scratch], [self.state[p]], masters)
            try:
                self._init_states(group, work.params, work.states, None, sparse=True)
                ages = [work.states[0]["age"]] if "age" in work.states[0] else None
                self._apply(group, work, p.device, grads=[scratch], indices=[positions],
                            ages=ages, consume_grad=True)
            except BaseException:
                scratch.view(-1).index_fill_(0, positions, 0)
                raise
            work.write_back()

    def _masters(self, group, params):
        """With master_weights=True: per param its fp32 master weight (state key
        "master_weight", made from the param at its first step), or None for an
        fp32/fp64 param; without, None."""
        if not group.get("master_weights"):
            return None
        state, masters = self.state, []
        for p in params:
            if p.dtype not in (torch.bfloat16, torch.float16):
                masters.append(None)
                continue
            s = state[p]
            if "master_weight" not in s:
                s["master_weight"] = p.detach().to(
                    torch.float32, memory_format=torch.contiguous_format, copy=True)
            masters.append(s["master_weight"])
        return masters

    def _sparse_scratch(self, p):
        """A zeroed gradient of p's size, dtype and device, shared by every param of
        that dtype and device (each update zeroes what it wrote): no state_dict entry,
        at most the largest such param's size."""
        buffers = self.__dict__.setdefault("_sparse_scratch_buffers", {})
        key = (p.device, p.dtype)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < p.numel():
            buffer = buffers[key] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        return buffer[:p.numel()].view(p.shape)

    def _update(self, group, work, device, indices, grad_scale, consume_grad, unscale,
                masks=None):
        compact = group["mask"] == "fixed" and indices is not None
        self._init_states(group, work.params, work.states,
                          [idx.numel() for idx in indices] if compact else None,
                          sparse=indices is not None or masks is not None)
        ages = None
        if indices is not None and all("age" in s for s in work.states):
            ages = [s["age"] for s in work.states]
        if (indices is not None and not compact and ages is None and device.type == "cpu"
                and float(group["density"]) >= MASK_DENSITY):
            masks = [torch.zeros(p.numel(), dtype=torch.bool, device=device)
                     .index_fill_(0, i, True) for p, i in zip(work.params, indices)]
            indices = None
        self._apply(group, work, device, grads=work.grads, indices=indices, masks=masks,
                    ages=ages, grad_scale=grad_scale, consume_grad=consume_grad,
                    compact_state=compact, unscale=unscale)


def _scores(select, states, sources, contiguous_params):
    """(score, tensors, weights) of ops.select for a group's `select` option."""
    if select == "grad_sq":
        return "grad_sq", [s["fisher"] for s in states], None
    if select == "weight":
        return "weight", sources, contiguous_params
    if select == "random":
        return "random", sources, None
    return "grad", sources, None
