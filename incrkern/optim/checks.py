"""Checks of the optimizers' arguments and of a loaded state: each raises an error that
names the argument, before anything is touched."""
import torch

SELECT_CHOICES = ("grad", "grad_sq", "weight", "accumulated", "random", "layer")
SCOPE_CHOICES = ("tensor", "global")
TOPK_CHOICES = ("exact", "approx")
BIAS_CORRECTION_CHOICES = ("tensor", "element")


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
        raise ValueError(f"mask must be 'dynamic', 'fixed' or an int N >= 1 (the constructor "
                         f"also takes a dict {{param: positions}}), got {mask!r}")
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


def check_tensor_lr(lr, *, foreach=None, capturable=False, host_only_foreach=True):
    """torch.optim's checks of a Tensor lr, with its messages (torch's own tests match
    them). `host_only_foreach`: the optimizer refuses a Tensor lr with foreach=True
    and capturable=False, as torch's Adam does (its SGD does not)."""
    if not isinstance(lr, torch.Tensor):
        return
    if host_only_foreach and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and "
                         "foreach=True")
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


# State tensors that a fixed mask keeps k long (one entry per kept index).
COMPACT_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "age")
# Scalars and flags: no size to check.
UNSIZED_STATE_KEYS = ("step", "layer_chosen", "indices")


def _check_loaded_param_state(where, state, numel, compact):
    indices = state.get("indices")
    if indices is not None:
        if not torch.is_tensor(indices) or indices.dtype not in (torch.int32, torch.int64) \
                or indices.dim() != 1:
            raise ValueError(f"{where}: indices must be a 1-D int32 or int64 tensor")
        if indices.numel():
            low, high = (int(v) for v in torch.aminmax(indices))
            if low < 0 or high >= numel:
                raise ValueError(f"{where}: indices hold positions outside [0, {numel}), "
                                 f"from {low} to {high}: a state_dict of another model?")
            if torch.unique(indices).numel() != indices.numel():
                raise ValueError(f"{where}: indices hold a position more than once")
    for key, value in state.items():
        if key in UNSIZED_STATE_KEYS or not torch.is_tensor(value):
            continue
        expected = numel
        if compact and indices is not None and key in COMPACT_STATE_KEYS:
            expected = indices.numel()
        if value.numel() != expected:
            raise ValueError(f"{where}: {key} has {value.numel()} elements, expected "
                             f"{expected}: a state_dict of another model?")


# The options a param with a sparse gradient needs: candidates are the present
# elements of this step's gradient alone, chosen by |g|.
def _check_lr(lr):
    """step()'s check of a group's lr. A tensor's value is not read: on CUDA a read
    waits for the device, and a CUDA graph cannot capture it; the kernels read it
    (docs/design.md, Note [a tensor lr is never read on the host])."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError("lr must be a number or a one-element floating point tensor, "
                             f"got a tensor of shape {tuple(lr.shape)} and dtype {lr.dtype}")
    else:
        _check_number("lr", lr)


def stored_positions(idx, p):
    # Kept as int32 where positions fit: with k-long fp32 moments a fixed mask then
    # costs 12 bytes per chosen element instead of 16.
    return idx.to(torch.int32) if p.numel() < 2 ** 31 else idx.to(torch.int64)


def checked_positions(name, idx, p):
    """`idx` as a fixed mask's stored positions (sorted, on p's device), or a
    ValueError/TypeError naming `name`."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of positions, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.device != p.device:
        raise ValueError(f"{name} is on {idx.device}, its param on {p.device}")
    idx = idx.sort().values
    if idx.numel():
        low, high = int(idx[0]), int(idx[-1])
        if low < 0 or high >= p.numel():
            raise ValueError(f"{name} holds positions outside [0, {p.numel()}): "
                             f"{low if low < 0 else high}")
        if bool((idx[1:] == idx[:-1]).any()):
            raise ValueError(f"{name} holds a position twice")
    return stored_positions(idx, p)
