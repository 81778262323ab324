"""Typed wrappers over torch.ops.incrkern.*: they check every argument, raising a clear
ValueError / TypeError that names it before any tensor is touched, then run the
compiled kernel (CPU or CUDA) or, where there is none, the reference in
incrkern.reference. Fake (meta) kernels for torch.compile are registered here too."""
import math
import numbers
import os

import torch

from . import reference
from .reference import math_dtype
from ._extension import EXTENSION_LOADED, cuda_kernels_loaded
from ._op_checks import (CUDA_FLOAT_DTYPES, FLOAT_DTYPES, as_list, check_adam_numbers, check_amp,
                         check_length, check_lr, check_number, check_tensor, check_update)


def _kernel(name, device):
    """The compiled op for tensors on `device`, or None to use the reference."""
    if not EXTENSION_LOADED:
        return None
    if device.type == "cpu" or (device.type == "cuda" and cuda_kernels_loaded()):
        return getattr(torch.ops.incrkern, name)
    return None


def _dispatch(name, *args, **kwargs):
    """Runs op `name` on the compiled kernel for the first tensor's device, or on the
    reference when there is none."""
    first = args[0]
    if not first:
        return None
    kernel = _kernel(name, first[0].device)
    impl = kernel if kernel is not None else getattr(reference, name)
    return impl(*args, **kwargs)


def adam_update_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999,
                 eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False,
                 indices=None, masks=None, ages=None, max_exp_avg_sqs=None, grad_scale=1.0,
                 consume_grad=False, compact_state=False, lr_tensor=None,
                 increment_steps=False, amp_scale=None, found_inf=None, validate=True):
    """Adam (AdamW with decoupled_weight_decay=True) on every param, in place.

    With `indices` (one int64 tensor of flat positions per param, each position at
    most once, as incrkern.ops.select returns them; repeated positions give undefined
    results on CUDA) only those elements and their state change; with `masks` (bool,
    one per param) only where true.
    `compact_state`: the state tensors are k long, indexed by position in `indices`.
    `ages` (int32, like the state): per-element update counts used for the bias
    correction instead of `steps`, incremented where updated. `max_exp_avg_sqs` (like
    the state): AMSGrad, as torch.optim.Adam(amsgrad=True): each becomes the maximum
    (NaN-propagating, as torch.maximum) of itself and the new exp_avg_sq, and is the
    denominator's second moment; None: plain Adam. `steps` are float32
    scalars holding the update count this call applies, or, with
    `increment_steps=True`, the count before it: the op adds one first. Grads are read
    times `grad_scale`; `consume_grad` zeroes the grad entries that were read.

    Mixed precision, as torch's fused optimizers take it from torch.amp.GradScaler:
    `amp_scale` (the loss scale the grads carry) and `found_inf` (nonzero when they
    hold an inf or NaN), float32 scalars on the params' device. Grads are then read
    times fp32(grad_scale) * (1 / amp_scale), and a nonzero `found_inf` makes the call
    change nothing: no param, state, age, step or grad. On CUDA nothing is read back,
    except `found_inf` once when CPU `steps` are to be incremented.

    `validate=False` skips the Python-level checks, the index range check among them
    (on CUDA a device sync per tensor): for callers that built the arguments
    themselves, as incrkern.optim does. The compiled kernels still check every
    tensor's dtype, size and device, and the CPU kernel the index range; the CUDA
    kernel trusts the indices.
    """
    if validate:
        params = as_list("params", params)
        grads = as_list("grads", grads)
        exp_avgs = as_list("exp_avgs", exp_avgs)
        exp_avg_sqs = as_list("exp_avg_sqs", exp_avg_sqs)
        steps = as_list("steps", steps)
        indices = as_list("indices", indices, allow_none=True)
        masks = as_list("masks", masks, allow_none=True)
        ages = as_list("ages", ages, allow_none=True)
        max_exp_avg_sqs = as_list("max_exp_avg_sqs", max_exp_avg_sqs, allow_none=True)
        check_adam_numbers(params, lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale)
        check_update(params, grads, exp_avgs, exp_avg_sqs, steps, indices, masks, ages,
                      compact_state, "exp_avgs", max_exp_avg_sqs)
        check_amp(amp_scale, found_inf, params)
    lists = [params, grads, exp_avgs, exp_avg_sqs, steps, indices or [], masks or [],
             ages or [], max_exp_avg_sqs or []]
    _dispatch("adam_update_", *lists, lr=float(lr), beta1=float(beta1), beta2=float(beta2),
              eps=float(eps), weight_decay=float(weight_decay),
              decoupled_weight_decay=bool(decoupled_weight_decay), maximize=bool(maximize),
              grad_scale=float(grad_scale), consume_grad=bool(consume_grad),
              compact_state=bool(compact_state), lr_tensor=lr_tensor,
              increment_steps=bool(increment_steps), amp_scale=amp_scale, found_inf=found_inf)


def _check_sgd(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum,
               dampening, weight_decay, grad_scale):
    """SGD's numbers, and its buffers and first-step flags counted against the params."""
    check_lr(lr, lr_tensor, params)
    check_number("momentum", momentum, 0.0)
    check_number("dampening", dampening)
    check_number("weight_decay", weight_decay, 0.0)
    check_number("grad_scale", grad_scale)
    if momentum != 0 and len(momentum_buffers) != len(params):
        raise ValueError("momentum != 0 needs one momentum buffer per param")
    if first_step is not None and len(first_step) != len(params):
        raise ValueError(f"first_step has {len(first_step)} entries, expected {len(params)}")


def sgd_update_(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0,
                weight_decay=0.0, nesterov=False, maximize=False, first_step=None,
                indices=None, masks=None, grad_scale=1.0, consume_grad=False,
                compact_state=False, lr_tensor=None, amp_scale=None, found_inf=None,
                validate=True):
    """SGD (momentum, dampening, nesterov, weight decay, maximize) in place.

    `momentum_buffers` may be empty when momentum == 0. `first_step[i]` marks a buffer
    that is new: it takes the gradient as it is, as torch.optim.SGD does. `indices`,
    `masks`, `grad_scale`, `consume_grad`, `compact_state`, `lr_tensor`, `amp_scale`,
    `found_inf`, `validate`: as adam_update_.
    """
    if validate:
        params = as_list("params", params)
        grads = as_list("grads", grads)
        momentum_buffers = as_list("momentum_buffers", momentum_buffers, allow_none=True)
        indices = as_list("indices", indices, allow_none=True)
        masks = as_list("masks", masks, allow_none=True)
        _check_sgd(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum,
                   dampening, weight_decay, grad_scale)
        check_update(params, grads, momentum_buffers, None, [], indices, masks, [],
                      compact_state, "momentum_buffers")
        check_amp(amp_scale, found_inf, params)
    first_step = [False] * len(params) if first_step is None else [bool(f) for f in first_step]
    _dispatch("sgd_update_", params, grads, momentum_buffers or [], indices or [], masks or [],
              first_step, lr=float(lr), momentum=float(momentum), dampening=float(dampening),
              weight_decay=float(weight_decay), nesterov=bool(nesterov),
              maximize=bool(maximize), grad_scale=float(grad_scale),
              consume_grad=bool(consume_grad), compact_state=bool(compact_state),
              lr_tensor=lr_tensor, amp_scale=amp_scale, found_inf=found_inf)


# ----------------------------------------------------------------------------------
# accumulate family


def accumulate_(accs, grads, alpha=1.0, sq_accs=None, *, sq_alpha=None, sq_decay=1.0,
                amp_scale=None, found_inf=None):
    """In place over many tensors: ``acc += alpha * g`` for every accumulator in `accs`
    and ``sq = sq_decay * sq + sq_alpha * g * g`` for every one in `sq_accs`.

    Either list may be empty (or None): a Fisher EMA passes only `sq_accs`, with
    sq_decay=beta and sq_alpha=1-beta. `sq_alpha` defaults to `alpha`. Grads are
    float32, bfloat16 or float16 (float64 on the CPU); accumulators are float32
    (float64 for float64 grads), contiguous, with the grad's number of elements.
    `amp_scale`, `found_inf` (mixed precision): alpha and sq_alpha are taken times
    1 / amp_scale and its square, and a nonzero found_inf changes nothing (see
    adam_update_).
    """
    grads = as_list("grads", grads)
    accs = as_list("accs", accs, allow_none=True)
    sq_accs = as_list("sq_accs", sq_accs, allow_none=True)
    check_number("alpha", alpha)
    if sq_alpha is None:
        sq_alpha = alpha
    check_number("sq_alpha", sq_alpha)
    check_number("sq_decay", sq_decay)
    n = len(grads)
    check_length("accs", accs, n, may_be_empty=True)
    check_length("sq_accs", sq_accs, n, may_be_empty=True)
    check_amp(amp_scale, found_inf, grads)
    if grads:
        device = grads[0].device
        dtypes = CUDA_FLOAT_DTYPES if device.type == "cuda" else FLOAT_DTYPES
    for i, g in enumerate(grads):
        # One cheap test per tensor; the detailed checks (which raise) only on failure,
        # so that a call over many small tensors costs little more than the kernel.
        gdtype, numel = g.dtype, g.numel()
        if g.device != device or gdtype not in dtypes or not g.is_contiguous():
            check_tensor(f"grads[{i}]", g, device=device, dtypes=dtypes)
        math = math_dtype(gdtype)
        for name, lst in (("accs", accs), ("sq_accs", sq_accs)):
            if lst:
                a = lst[i]
                if (a.dtype != math or a.numel() != numel or a.device != device
                        or not a.is_contiguous()):
                    check_tensor(f"{name}[{i}]", a, device=device, dtypes=(math,),
                                  numel=numel)
    if not grads or not (accs or sq_accs):
        return
    kernel = _kernel("accumulate_", grads[0].device)
    impl = kernel if kernel is not None else reference.accumulate_
    impl(accs, grads, float(alpha), sq_accs, float(sq_alpha), float(sq_decay),
         amp_scale=amp_scale, found_inf=found_inf)


if EXTENSION_LOADED:

    @torch.library.register_fake("incrkern::accumulate_")
    def _accumulate_fake(*args, **kwargs):
        return None


# ----------------------------------------------------------------------------------
# select family


SCORES = ("grad", "grad_sq", "weight", "accumulated", "random")
SCOPES = ("tensor", "global")

#: Approximate mode: the count returned lies within max(1, APPROX_COUNT_TOLERANCE * k)
#: of k, and every chosen score is >= (1 - APPROX_VALUE_TOLERANCE) times the true k-th
#: score (the CPU kernel only returns whole top sets, so there it is >= the k-th).
APPROX_COUNT_TOLERANCE = 0.01
APPROX_VALUE_TOLERANCE = 1e-3


def _check_k_int(name, k, numel):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 0 or k > numel:
        raise ValueError(f"{name} must be in [0, {numel}], got {k}")
    return int(k)


def density_k(density, numel):
    """The k of a density: ceil(density * numel), at most numel."""
    return min(numel, math.ceil(density * numel))


def _check_select_dtype(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    dtypes = CUDA_FLOAT_DTYPES if device.type == "cuda" else FLOAT_DTYPES
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}, expected one of "
                        + ", ".join(str(d) for d in dtypes))


def topk(x, k, *, approx=False):
    """Indices into x.reshape(-1) of the k largest values, in ascending index order.

    Exact (approx=False): the same set as torch.topk, ties broken towards the lowest
    index, deterministic and the same on CPU and CUDA. NaN ranks above +inf; -0 and
    +0 are equal. k may be 0 or x.numel(). approx=True: see `select`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    _check_select_dtype("x", x, x.device)
    k = _check_k_int("k", k, x.numel())
    x = x.contiguous()
    kernel = _kernel("topk", x.device)
    impl = kernel if kernel is not None else reference.topk
    return impl(x, k, bool(approx))


def _select_args(tensors, k, score, scope, residual, weights, generator, validate):
    """select's and select_mask's arguments checked: (tensors, ks, residual, weights,
    seed), the random score's seed drawn from the generator."""
    if validate:
        tensors = as_list("tensors", tensors)
        residual = as_list("residual", residual, allow_none=True)
        weights = as_list("weights", weights, allow_none=True)
    else:
        tensors = list(tensors)
        residual = [] if residual is None else list(residual)
        weights = [] if weights is None else list(weights)
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    if score == "accumulated":
        check_length("residual", residual, len(tensors))
    elif residual:
        raise ValueError("residual is only used with score='accumulated'")
    if score == "weight":
        check_length("weights", weights, len(tensors))
    elif weights:
        raise ValueError("weights is only used with score='weight'")
    if tensors and validate:
        device = tensors[0].device
        for i, t in enumerate(tensors):
            _check_select_dtype(f"tensors[{i}]", t, device)
            if residual:
                r = residual[i]
                allowed = (torch.float32, torch.float64) if t.dtype == torch.float64 \
                    else (torch.float32,)
                check_tensor(f"residual[{i}]", r.contiguous(), device=device, dtypes=allowed,
                              numel=t.numel())
            if weights:
                _check_select_dtype(f"weights[{i}]", weights[i], device)
                if weights[i].numel() != t.numel():
                    raise ValueError(f"weights[{i}] has {weights[i].numel()} elements, "
                                     f"expected {t.numel()}")
    numels = [t.numel() for t in tensors]
    global_scope = scope == "global"
    if isinstance(k, bool):
        raise TypeError("k must be an int, a list of ints or a float density, got bool")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k as a density must be in (0, 1], got {k}")
        ks = [density_k(k, sum(numels))] if global_scope else \
            [density_k(k, n) for n in numels]
    elif isinstance(k, numbers.Integral):
        if global_scope:
            ks = [_check_k_int("k", k, sum(numels))]
        else:
            ks = [_check_k_int("k", k, n) for n in numels]
    elif isinstance(k, (list, tuple)):
        if global_scope:
            raise ValueError("k as a list needs scope='tensor'; give one total for 'global'")
        if len(k) != len(tensors):
            raise ValueError(f"k has {len(k)} entries, expected {len(tensors)}")
        ks = [_check_k_int(f"k[{i}]", ki, n) for i, (ki, n) in enumerate(zip(k, numels))]
    else:
        raise TypeError(f"k must be an int, a list of ints or a float, got {type(k).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not tensors:
        return [], ks, residual, weights, 0
    return tensors, ks, residual, weights, _random_seed(generator) if score == "random" else 0


def _random_seed(generator):
    """The "random" score's seed, one draw from `generator` (None: the default CPU one)."""
    gen_device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))


def select(tensors, k, *, score="grad", scope="tensor", approx=False, residual=None,
           weights=None, generator=None, validate=True):
    """Indices (int64, ascending) of the chosen elements of each tensor (flattened).

    k: an int (per tensor for scope="tensor", the total for scope="global"), a list of
    ints (one per tensor, scope="tensor"), or a float density in (0, 1] meaning
    ceil(density * numel) per tensor, or of the total numel for scope="global".
    score: "grad" |t|; "grad_sq" t itself (the caller's EMA of g^2); "weight"
    |weights[i]| (`tensors` give the shapes); "accumulated" |residual[i] + t| (the
    residuals in float32, or float64 for float64 tensors); "random" a uniform key
    per element, drawn from `generator` (torch.Generator, None: the default one).
    scope="global": the k largest over the concatenation of all tensors, ties broken
    towards the lowest position in the concatenation, returned split per tensor.
    approx=True: the k-th score is estimated and one pass keeps the elements above
    it. The count lies within max(1, 1% of k) of k and every chosen score is at least
    (1 - 1e-3) times the true k-th score (APPROX_COUNT_TOLERANCE,
    APPROX_VALUE_TOLERANCE); when the estimate misses by more, the exact selection
    runs instead. On the CPU the estimate is a band from a 64K-element sample and the
    one pass usually pins the exact answer anyway (approx then only accepts a band
    that misses k by less than the tolerance); on CUDA it stops the radix select
    after one of its three digits when the elements above the k-th's 11-bit bucket
    are within the tolerance, else after two (a 22-bit boundary of the key).
    validate=False skips the per-tensor Python checks (dtype, device, residual and
    weight sizes), for callers that built the lists themselves; the kernel's own
    checks still run.
    """
    tensors, ks, residual, weights, seed = _select_args(
        tensors, k, score, scope, residual, weights, generator, validate)
    if not tensors:
        return []
    kernel, tensors, residual, weights = _select_kernel(tensors, residual, weights)
    return list(kernel(tensors, ks, score, scope == "global", bool(approx), residual, weights,
                       seed))


def _select_kernel(tensors, residual, weights):
    """(select's kernel for the tensors' device, tensors, residual, weights): the
    compiled one takes non-contiguous tensors and copies them itself; the reference,
    where there is none, gets contiguous ones."""
    kernel = _kernel("select", tensors[0].device)
    if kernel is not None:
        return kernel, tensors, residual, weights
    return (reference.select, [t.contiguous() for t in tensors],
            [r.contiguous() for r in residual], [w.contiguous() for w in weights])


def select_mask(tensors, k, *, score="grad", scope="tensor", residual=None, weights=None,
                generator=None, out=None, validate=True):
    """The chosen elements of each tensor as a flat bool mask of its numel: True exactly
    at the positions `select` (exact) returns for the same arguments (scope="global":
    over the concatenation), the random score's seed drawn from `generator` the same
    way. out: contiguous bool tensors of each tensor's numel to write (and return), so
    that a caller stepping every iteration does not fault in fresh pages each time.

    The optimizers' masked update (from a density of about 0.1) takes this instead of
    the positions: on the CPU one pass counts the keys near the k-th and a second writes
    the mask, where the positions of half a tensor cost 8 bytes each to write and merge.
    Other devices and float64 tensors mark the positions select returns."""
    tensors = as_list("tensors", tensors) if validate else list(tensors)
    if out is not None:  # checked before the random score's seed is drawn
        out = as_list("out", out)
        check_length("out", out, len(tensors))
        for i, (m, t) in enumerate(zip(out, tensors)):
            check_tensor(f"out[{i}]", m, device=t.device, dtypes=(torch.bool,),
                          numel=t.numel())
    tensors, ks, residual, weights, seed = _select_args(
        tensors, k, score, scope, residual, weights, generator, validate)
    if out is None:
        out = [torch.empty(t.numel(), dtype=torch.bool, device=t.device) for t in tensors]
    if not tensors:
        return []
    if tensors[0].device.type == "cpu" and EXTENSION_LOADED:
        torch.ops.incrkern.select_mask_(out, tensors, ks, score, residual, weights, seed,
                                        scope == "global")
        return out
    kernel, tensors, residual, weights = _select_kernel(tensors, residual, weights)
    chosen = kernel(tensors, ks, score, scope == "global", False, residual, weights, seed)
    for m, c in zip(out, chosen):
        m.view(-1).zero_().index_fill_(0, c, True)
    return out

if EXTENSION_LOADED:

    @torch.library.register_fake("incrkern::topk")
    def _topk_fake(x, k, approx=False):
        if approx:
            return x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)
        return x.new_empty(k, dtype=torch.int64)

    @torch.library.register_fake("incrkern::select")
    def _select_fake(tensors, ks, score, global_scope, approx, residuals, weights, seed=0):
        if global_scope or approx:
            ctx = torch.library.get_ctx()
            return [t.new_empty(ctx.new_dynamic_size(), dtype=torch.int64) for t in tensors]
        return [t.new_empty(k, dtype=torch.int64) for t, k in zip(tensors, ks)]

    @torch.library.register_fake("incrkern::select_mask_")
    def _select_mask_fake(masks, tensors, ks, score, residuals, weights, seed=0,
                          global_scope=False):
        return None


# ----------------------------------------------------------------------------------
# fused select-and-update


# Whether adam_select_update_ on CUDA runs its kernel (csrc/fused/fused_cuda.cu) or
# composes select and adam_update_ (the same result, bit for bit). False, or
# INCRKERN_FUSED_CUDA=0 when incrkern is imported, picks the composed path, which the
# tests and the profile compare the kernel with.
FUSED_CUDA = os.environ.get("INCRKERN_FUSED_CUDA", "1") == "1"
# The same for sgd_select_update_'s CUDA kernel (the Adam kernel's pass with SGD's
# rule), off until a GPU has run its tests: INCRKERN_FUSED_SGD_CUDA=1 turns it on.
FUSED_SGD_CUDA = os.environ.get("INCRKERN_FUSED_SGD_CUDA", "0") == "1"


def _has_kernel(name, device):
    if device.type == "cuda" and not {"adam_select_update_": FUSED_CUDA,
                                      "sgd_select_update_": FUSED_SGD_CUDA}.get(name, True):
        return False
    return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"incrkern::{name}", "CPU" if device.type == "cpu" else "CUDA")


def _checked_ks(ks, params, grads):
    """A fused op's ks (one int per param, in [0, numel]) as ints, and its grads checked
    to have their params' dtypes."""
    if not isinstance(ks, (list, tuple)) or len(ks) != len(params):
        raise ValueError(f"ks must be a list of {len(params)} ints")
    ks = [_check_k_int(f"ks[{i}]", k, p.numel()) for i, (k, p) in enumerate(zip(ks, params))]
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype}, expected the param's {p.dtype}")
    return ks


def _checked_residuals(residuals, params):
    """Error feedback's residuals (None: none) as a list: none, or one per param of its
    math dtype and size, on its device."""
    residuals = as_list("residuals", residuals, allow_none=True)
    check_length("residuals", residuals, len(params), may_be_empty=True)
    for i, r in enumerate(residuals):
        check_tensor(f"residuals[{i}]", r, device=params[i].device,
                      dtypes=(math_dtype(params[i].dtype),), numel=params[i].numel())
    return residuals


def adam_select_update_(params, grads, exp_avgs, exp_avg_sqs, steps, ks, residuals=None, *,
                        approx=False, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                        decoupled_weight_decay=False, maximize=False, grad_scale=1.0,
                        lr_tensor=None, increment_steps=False, amp_scale=None, found_inf=None,
                        score="grad", scores=None, generator=None, validate=True):
    """Selects and updates in one call: per param, the ks[i] elements of largest
    |grads[i]| get the Adam update (as adam_update_), the rest and their state stay
    bit-identical. score="weight" (no residuals) selects by |params[i]| instead, as
    ``select(..., score="weight", weights=params)`` then ``adam_update_``: each param's
    score is read before its update. score="grad_sq" (no residuals) selects by the
    given `scores` (one per param, fp32 or fp64 as a residual: the optimizer's Fisher,
    never negative), as ``select(scores, ks, score="grad_sq")`` then ``adam_update_``
    with the grads; a negative score ranks by its magnitude. score="random" (no
    residuals) chooses by a hash of each element's index, its seed drawn from
    `generator` as select draws it: the same set as ``select(..., score="random",
    generator=...)`` given the same generator state. Returns an int64 tensor: the count updated per param (on the
    params' device with the CUDA kernel, which reads nothing back; on the CPU otherwise).

    The same result as ``select(grads, ks, score="grad")`` then ``adam_update_(...,
    indices=...)``: exact mode takes the k largest, ties to the lowest index (NaN above
    +inf, -0 == +0). With `residuals` (error feedback: fp32, fp64 for fp64 params) the
    score is |r + g|; the chosen elements are updated with u = r + g and their residual
    becomes 0, every other residual becomes r + g (as ``accumulate_`` then select on
    the residual then ``adam_update_(consume_grad=True)``). Grads have the param's dtype.
    Mixed precision (`amp_scale`, `found_inf`, as adam_update_): without residuals the
    update reads g times fp32(grad_scale) * (1 / amp_scale); with them the residual
    takes r + g / amp_scale (as accumulate_ adds it) and the update reads that sum times
    grad_scale; the scores are |g| (the order of |g / amp_scale| for a power-of-two
    scale, which GradScaler's are) or that sum. A nonzero found_inf changes nothing and
    counts 0.

    approx=True (large tensors, beyond 2^18 elements): a band [L, H] on the k-th score
    comes from a sample and one pass updates every element above H and keeps those in
    the band; when the band holds the k-th score the answer is exact (count k, the
    usual case: the band has four standard deviations of margin); when more than k
    scores lie above H, all of them are updated (count > k); when fewer than k lie at or
    above L, all of those are (count < k). Every updated score is >= L, a lower bound of
    the k-th score. Small tensors are always exact.

    On the CPU this is one kernel (csrc/fused/fused_cpu.cpp). On CUDA, with FUSED_CUDA,
    it is the selection's histogram passes then one pass that updates where the
    selection holds (csrc/fused/fused_cuda.cu); approx=True there is select's
    approximate mode (k +- 1%, the boundary bucket's width), not the band. Elsewhere
    the wrapper composes ``select`` and ``adam_update_``, with the same result as the
    kernel of the same device.
    """
    if validate:
        lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                     steps=steps)
        params, grads, exp_avgs, exp_avg_sqs, steps = (
            as_list(name, value) for name, value in lists.items())
        check_adam_numbers(params, lr, lr_tensor, beta1, beta2, eps, weight_decay, grad_scale)
        check_update(params, grads, exp_avgs, exp_avg_sqs, steps, [], [], [], False,
                      "exp_avgs")
        ks = _checked_ks(ks, params, grads)
        residuals = _checked_residuals(residuals, params)
        check_amp(amp_scale, found_inf, params)
        if score not in ("grad", "weight", "grad_sq", "random"):
            raise ValueError(f"score must be 'grad', 'weight', 'grad_sq' or 'random', got "
                             f"{score!r}")
        if score != "grad" and residuals:
            raise ValueError(f"score={score!r} takes no residuals (error feedback selects by "
                             "|r + g|)")
        scores = as_list("scores", scores, allow_none=True)
        if score != "grad_sq" and scores:
            raise ValueError(f"scores are for score='grad_sq' only, got {len(scores)} with "
                             f"score={score!r}")
        if score == "grad_sq":
            check_length("scores", scores, len(params))
            for i, s in enumerate(scores):
                check_tensor(f"scores[{i}]", s, device=params[i].device,
                              dtypes=(math_dtype(params[i].dtype),), numel=params[i].numel())
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
    residuals = list(residuals or [])
    scores = list(scores or [])
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay),
                 decoupled_weight_decay=bool(decoupled_weight_decay), maximize=bool(maximize),
                 grad_scale=float(grad_scale), lr_tensor=lr_tensor,
                 increment_steps=bool(increment_steps), found_inf=found_inf)
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    device = params[0].device
    if _has_kernel("adam_select_update_", device) and (score == "grad" or device.type == "cpu"):
        return torch.ops.incrkern.adam_select_update_(
            params, grads, exp_avgs, exp_avg_sqs, steps, [int(k) for k in ks], residuals,
            bool(approx), amp_scale=amp_scale, score=score, scores=scores,
            seed=_random_seed(generator) if score == "random" else 0, **hyper)
    # No kernel for this device and score: select, then update at the positions.
    if residuals:
        accumulate_(residuals, grads, 1.0, amp_scale=amp_scale, found_inf=found_inf)
    sources = residuals or grads
    indices = select(scores if score == "grad_sq" else sources, [int(k) for k in ks],
                     score=score, approx=approx, weights=params if score == "weight" else None,
                     generator=generator, validate=False)
    adam_update_(params, sources, exp_avgs, exp_avg_sqs, steps, indices=indices,
                 consume_grad=bool(residuals), validate=False,
                 amp_scale=None if residuals else amp_scale, **hyper)
    counts = torch.tensor([int(i.numel()) for i in indices], dtype=torch.int64)
    if found_inf is not None:  # on found_inf's device: nothing is read back
        counts = counts.to(found_inf.device) * (found_inf == 0)
    return counts


def sgd_select_update_(params, grads, momentum_buffers, ks, *, lr, momentum=0.0,
                       dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                       first_step=None, approx=False, residuals=None, grad_scale=1.0,
                       lr_tensor=None, amp_scale=None, found_inf=None, validate=True):
    """SGD's select-and-update in one call: per param, the ks[i] elements of largest
    |grads[i]| get sgd_update_'s update (its arguments, `first_step` included), every
    other element and its momentum buffer stay bit-identical. The same result as
    ``select(grads, ks, score="grad")`` then ``sgd_update_(..., indices=...)``: exact
    mode takes the k largest, ties to the lowest index; approx=True is
    adam_select_update_'s (on tensors beyond 2^18 elements a count near k, every
    updated |g| at least a lower bound of the k-th). Grads have the param's dtype.
    `residuals` (error feedback) and mixed precision as adam_select_update_'s: the
    score |r + g|, the update by that sum, the chosen residuals zeroed and the others
    left holding it. Returns an int64 tensor: the count updated per param (on the CPU).

    On the CPU one kernel (csrc/fused/sgd_fused_cpu.cpp): from the threshold stream's
    densities on, a counting pass over |g| and then SGD's loop, which compares each
    |g| with the k-th as it reads it; select's positions below them (with residuals,
    adam_select_update_'s listing pass, which adds g to r as it reads). On CUDA with
    FUSED_SGD_CUDA, adam_select_update_'s passes with SGD's rule. Elsewhere the
    wrapper composes ``accumulate_``, ``select`` and ``sgd_update_``.
    """
    if validate:
        params = as_list("params", params)
        grads = as_list("grads", grads)
        momentum_buffers = as_list("momentum_buffers", momentum_buffers, allow_none=True)
        _check_sgd(params, grads, momentum_buffers, first_step, lr, lr_tensor, momentum,
                   dampening, weight_decay, grad_scale)
        check_update(params, grads, momentum_buffers, None, [], [], [], [], False,
                      "momentum_buffers")
        ks = _checked_ks(ks, params, grads)
        residuals = _checked_residuals(residuals, params)
        check_amp(amp_scale, found_inf, params)
    if not params:
        return torch.zeros(0, dtype=torch.int64)
    residuals = list(residuals or [])
    first_step = [False] * len(params) if first_step is None else [bool(f) for f in first_step]
    hyper = dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                 weight_decay=float(weight_decay), nesterov=bool(nesterov),
                 maximize=bool(maximize), grad_scale=float(grad_scale), lr_tensor=lr_tensor,
                 amp_scale=amp_scale, found_inf=found_inf)
    ks = [int(k) for k in ks]
    if _has_kernel("sgd_select_update_", params[0].device):
        return torch.ops.incrkern.sgd_select_update_(
            params, grads, list(momentum_buffers or []), ks, residuals, first_step,
            bool(approx), **hyper)
    if residuals:
        accumulate_(residuals, grads, 1.0, amp_scale=amp_scale, found_inf=found_inf)
        hyper["amp_scale"] = None
    sources = residuals or grads
    indices = select(sources, ks, score="grad", approx=approx, validate=False)
    sgd_update_(params, sources, momentum_buffers, indices=indices, first_step=first_step,
                consume_grad=bool(residuals), validate=False, **hyper)
    counts = torch.tensor([int(i.numel()) for i in indices], dtype=torch.int64)
    if found_inf is not None:  # on found_inf's device: nothing is read back
        counts = counts.to(found_inf.device) * (found_inf == 0)
    return counts


if EXTENSION_LOADED:

    @torch.library.register_fake("incrkern::sgd_select_update_")
    def _sgd_select_update_fake(params, *args, **kwargs):
        return torch.empty(len(params), dtype=torch.int64)

    @torch.library.register_fake("incrkern::adam_select_update_")
    def _adam_select_update_fake(params, *args, **kwargs):
        device = params[0].device if params and params[0].is_cuda else "cpu"
        return torch.empty(len(params), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------
# fake kernels: shapes only, for torch.compile and opcheck

if EXTENSION_LOADED:

    @torch.library.register_fake("incrkern::adam_update_")
    def _adam_update_fake(*args, **kwargs):
        return None

    @torch.library.register_fake("incrkern::sgd_update_")
    def _sgd_update_fake(*args, **kwargs):
        return None
