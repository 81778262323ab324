"""Pure-torch implementations of every incrkern op.

They are the oracle the kernel tests compare against, and the path every op takes
when the compiled extension is not available. They are written with plain torch
ops, independently of csrc/, and favour clarity over speed. Arguments are assumed
valid: incrkern.ops checks them before calling either implementation.
"""
import math

import torch


def math_dtype(dtype):
    """The dtype optimizer state, accumulators and update math use for a param or grad
    of `dtype`: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(i, numel, indices, masks, compact_state, device):
    """(elements, state slots) updated in tensor i: index tensors, or None for all."""
    if indices:
        elements = indices[i]
        slots = torch.arange(elements.numel(), device=device) if compact_state else elements
        return elements, slots
    if masks:
        elements = masks[i].reshape(-1).nonzero().squeeze(1)
        return elements, elements
    return None, None


def _gather(flat, where):
    return flat if where is None else flat[where]


def _scatter(flat, where, values):
    if where is None:
        flat.copy_(values)
    else:
        flat[where] = values.to(flat.dtype)


def amp_factor(factor, amp_scale, mdtype=torch.float32, square=False):
    """`factor` times 1 / amp_scale (its square with square=True) in the math dtype, as
    the kernels fold the mixed-precision unscale; `factor` without a scale."""
    if amp_scale is None:
        return factor
    dtype = torch.float64 if mdtype == torch.float64 else torch.float32
    inv = torch.tensor(1.0, dtype=dtype) / amp_scale.detach().cpu().reshape(()).to(dtype)
    if square:
        inv = inv * inv
    return float(torch.tensor(factor, dtype=dtype) * inv)


def amp_skips(found_inf):
    """Whether a mixed-precision call changes nothing (found_inf set)."""
    return found_inf is not None and bool(found_inf.item() != 0)


def _read_grad(i, grads, elements, mdtype, grad_scale, consume_grad):
    flat = grads[i].view(-1)
    g = _gather(flat, elements).to(mdtype) * grad_scale
    if consume_grad:
        _scatter(flat, elements, torch.zeros_like(g))
    return g


# ----------------------------------------------------------------------------------
# update family


@torch.no_grad()
def adam_update_(params, grads, exp_avgs, exp_avg_sqs, steps, indices=(), masks=(), ages=(),
                 max_exp_avg_sqs=(), *, lr, beta1, beta2, eps, weight_decay,
                 decoupled_weight_decay, maximize, grad_scale=1.0, consume_grad=False,
                 compact_state=False, lr_tensor=None, increment_steps=False, amp_scale=None,
                 found_inf=None):
    if amp_skips(found_inf):
        return
    if lr_tensor is not None:
        lr = lr_tensor.item()
    if increment_steps:
        for s in steps:
            s.add_(1)
    for i, p in enumerate(params):
        mdtype = math_dtype(p.dtype)
        elements, slots = _positions(i, p.numel(), indices, masks, compact_state, p.device)
        flat_p = p.view(-1)
        param = _gather(flat_p, elements).to(mdtype)
        grad = _read_grad(i, grads, elements, mdtype, amp_factor(grad_scale, amp_scale, mdtype),
                          consume_grad)
        m_flat, v_flat = exp_avgs[i].view(-1), exp_avg_sqs[i].view(-1)
        m, v = _gather(m_flat, slots).clone(), _gather(v_flat, slots).clone()
        if maximize:
            grad = -grad
        if weight_decay != 0:
            if decoupled_weight_decay:
                param = param * (1 - lr * weight_decay)
            else:
                grad = grad + weight_decay * param
        m = m.lerp(grad, 1 - beta1)
        v = v * beta2 + (1 - beta2) * grad * grad
        if ages:
            age_flat = ages[i].view(-1)
            age = _gather(age_flat, slots) + 1
            _scatter(age_flat, slots, age)
            step = age.to(torch.float64)
            step_size = (lr / (1 - beta1 ** step)).to(mdtype)
            bc2_sqrt = (1 - beta2 ** step).sqrt().to(mdtype)
        else:
            step = steps[i].item()
            step_size = lr / (1 - beta1 ** step)
            bc2_sqrt = math.sqrt(1 - beta2 ** step)
        second = v
        if max_exp_avg_sqs:  # AMSGrad
            vmax_flat = max_exp_avg_sqs[i].view(-1)
            second = torch.maximum(_gather(vmax_flat, slots), v)
            _scatter(vmax_flat, slots, second)
        denom = second.sqrt() / bc2_sqrt + eps
        param = param - step_size * (m / denom)
        _scatter(flat_p, elements, param)
        _scatter(m_flat, slots, m)
        _scatter(v_flat, slots, v)


@torch.no_grad()
def sgd_update_(params, grads, momentum_buffers, indices=(), masks=(), first_step=(), *, lr,
                momentum, dampening, weight_decay, nesterov, maximize, grad_scale=1.0,
                consume_grad=False, compact_state=False, lr_tensor=None, amp_scale=None,
                found_inf=None):
    if amp_skips(found_inf):
        return
    if lr_tensor is not None:
        lr = lr_tensor.item()
    for i, p in enumerate(params):
        mdtype = math_dtype(p.dtype)
        elements, slots = _positions(i, p.numel(), indices, masks, compact_state, p.device)
        flat_p = p.view(-1)
        param = _gather(flat_p, elements).to(mdtype)
        d_p = _read_grad(i, grads, elements, mdtype, amp_factor(grad_scale, amp_scale, mdtype),
                         consume_grad)
        if maximize:
            d_p = -d_p
        if weight_decay != 0:
            d_p = d_p + weight_decay * param
        if momentum != 0:
            buf_flat = momentum_buffers[i].view(-1)
            if first_step and first_step[i]:
                buf = d_p.clone()
            else:
                buf = _gather(buf_flat, slots) * momentum + (1 - dampening) * d_p
            _scatter(buf_flat, slots, buf)
            d_p = d_p + momentum * buf if nesterov else buf
        _scatter(flat_p, elements, param - lr * d_p)


# ----------------------------------------------------------------------------------
# accumulate family


@torch.no_grad()
def accumulate_(accs, grads, alpha=1.0, sq_accs=(), sq_alpha=1.0, sq_decay=1.0,
                amp_scale=None, found_inf=None):
    """acc += alpha * g; sq = sq_decay * sq + sq_alpha * g * g (accumulators in the
    grad's math dtype), each product rounded on its own as the kernels do. Mixed
    precision: alpha and sq_alpha times 1 / amp_scale and its square."""
    if amp_skips(found_inf):
        return
    for i, g in enumerate(grads):
        if accs:
            acc = accs[i].view(-1)
            grad = g.reshape(-1).to(acc.dtype)
            acc.add_(grad * amp_factor(alpha, amp_scale, acc.dtype))
        if sq_accs:
            sq = sq_accs[i].view(-1)
            grad = g.reshape(-1).to(sq.dtype)
            sq.copy_(sq * sq_decay + amp_factor(sq_alpha, amp_scale, sq.dtype, True) * grad * grad)


# ----------------------------------------------------------------------------------
# select family

_INT64_MAX = 0x7FFFFFFFFFFFFFFF
_M32 = 0xFFFFFFFF


def _order_key(score):
    """A signed int64 that orders like the float score (in float64): -0 == +0, every
    NaN above +inf. Used with a stable descending sort, ties go to the lowest index."""
    v = score.to(torch.float64) + 0.0  # -0 + 0 = +0
    b = v.view(torch.int64)
    key = torch.where(b >= 0, b, b ^ _INT64_MAX)
    return torch.where(v.isnan(), torch.full_like(key, _INT64_MAX), key)


def _mul32(h, c):
    """(h * c) mod 2^32 for int64 tensors h < 2^32, without int64 overflow."""
    lo = (h & 0xFFFF) * c
    hi = (((h >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h):
    if isinstance(h, int):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & _M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _M32
        return h ^ (h >> 16)
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def random_scores(seed, tensor, numel, device="cpu"):
    """The "random" score of every element of tensor number `tensor`: a uint32 hash
    of (seed, tensor, index), as an int64 tensor (the kernels compute the same)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    lo, hi = s & _M32, s >> 32
    kt = _fmix32(lo ^ _fmix32((hi + (tensor & _M32) * 0x9E3779B9) & _M32))
    kt2 = _fmix32(kt ^ 0x6A09E667)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    h = _fmix32((i & _M32) ^ kt)
    return _fmix32((h + _mul32(i >> 32, 0x9E3779B9) + kt2) & _M32)


def select_scores(tensors, score, residuals=(), weights=(), seed=0):
    """One int64 order key per element of each tensor (flattened): larger = chosen first."""
    keys = []
    for i, t in enumerate(tensors):
        if score == "random":
            keys.append(random_scores(seed, i, t.numel(), t.device))
            continue
        if score == "grad":
            s = t.reshape(-1).abs()
        elif score == "grad_sq":
            s = t.reshape(-1)
        elif score == "weight":
            s = weights[i].reshape(-1).abs()
        elif score == "accumulated":
            r = residuals[i].reshape(-1)
            s = (r + t.reshape(-1).to(r.dtype)).abs()
        else:
            raise ValueError(f"unknown score {score!r}")
        keys.append(_order_key(s))
    return keys


def _top_positions(keys, k):
    """Ascending positions of the k largest keys, ties to the lowest position."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    order = torch.sort(keys, descending=True, stable=True).indices[:k]
    return order.sort().values


@torch.no_grad()
def topk(x, k, approx=False):
    return _top_positions(_order_key(x.reshape(-1)), k)


@torch.no_grad()
def select(tensors, ks, score="grad", global_scope=False, approx=False, residuals=(),
           weights=(), seed=0):
    keys = select_scores(tensors, score, residuals, weights, seed)
    if not global_scope:
        return [_top_positions(key, k) for key, k in zip(keys, ks)]
    if not keys:
        return []
    chosen = _top_positions(torch.cat(keys), ks[0])
    out, start = [], 0
    for key in keys:
        end = start + key.numel()
        mask = (chosen >= start) & (chosen < end)
        out.append(chosen[mask] - start)
        start = end
    return out
