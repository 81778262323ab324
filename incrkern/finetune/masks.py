"""Calibrated sparse fine-tuning masks: which elements of each param to train.

A mask is a dict {param: int64 tensor of flat positions, ascending}, the form
`incrkern.optim.*(mask=...)`, `optimizer.set_mask` and `save_delta(masks=...)` take.
The positions are the top-k of a score computed over a few calibration batches:

- `fish_mask`: the empirical Fisher diagonal, sum over batches of g^2 (FISH masks,
  Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks").
- `sift_mask`: the gradient magnitude (SIFT, Song et al. 2023, "Sparse is Enough in
  Fine-tuning Pre-trained Large Language Models"). By default |sum of g|, the
  gradient of the whole calibration loss, as SIFT takes it; `reduce="sum_abs"` sums
  |g| per batch instead, which keeps elements whose gradient changes sign.
- `random_mask`: uniform positions, the usual baseline.

The top-k is incrkern.ops.select: exact, ties to the lowest position.
"""
import itertools

import torch

from .. import ops

SCOPES = ("tensor", "global")
SIFT_REDUCES = ("abs_sum", "sum_abs")


def trainable_params(model_or_params):
    """The params that require grad, of a module or an iterable of tensors."""
    if isinstance(model_or_params, torch.nn.Module):
        params = model_or_params.parameters()
    elif isinstance(model_or_params, torch.Tensor):
        params = [model_or_params]
    else:
        params = model_or_params
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating point tensor")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("model_or_params holds no param that requires grad")
    seen = set()
    unique = []
    for p in params:  # a tied param is one param
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _check_mask_args(density, scope, num_batches):
    if isinstance(density, bool) or not isinstance(density, (int, float)) or \
            not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    if num_batches is not None and (isinstance(num_batches, bool)
                                    or not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be None or an int >= 1, got {num_batches!r}")


def gradient_scores(model_or_params, batches, loss_fn, reduce, num_batches=None):
    """{param: fp32 score} over the calibration batches (the first `num_batches`).

    loss_fn(batch) returns the scalar loss of one batch (a closure over the model).
    reduce: "sq_sum" sum of g^2, "sum_abs" sum of |g|, "abs_sum" |sum of g|.
    Each param's `.grad` is set aside and put back afterwards.
    """
    params = trainable_params(model_or_params)
    scores = [torch.zeros(p.shape, dtype=ops.math_dtype(p.dtype), device=p.device)
              for p in params]
    saved = [p.grad for p in params]
    count = 0
    try:
        for batch in itertools.islice(batches, num_batches):
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn(batch) must return a one-element loss tensor")
            loss.backward()
            grads = [p.grad for p in params]
            with torch.no_grad():
                for s, g in zip(scores, grads):
                    if g is None:
                        continue  # a param the loss does not reach scores 0
                    g = g.to(s.dtype)
                    if reduce == "sq_sum":
                        s.addcmul_(g, g)
                    elif reduce == "sum_abs":
                        s.add_(g.abs())
                    else:
                        s.add_(g)
            count += 1
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    if count == 0:
        raise ValueError("batches gave no calibration batch")
    if reduce == "abs_sum":
        for s in scores:
            s.abs_()
    return dict(zip(params, scores))


def top_mask(scores, density, scope="tensor"):
    """{param: int64 positions} of the `density` fraction of largest scores, per
    tensor (ceil(density * numel) each) or over all params together (scope="global")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    params = list(scores)
    by_device = {}
    for p in params:
        by_device.setdefault(scores[p].device, []).append(p)
    if scope == "global" and len(by_device) > 1:
        raise RuntimeError("scope='global' needs every param on one device")
    masks = {}
    for ps in by_device.values():
        # the scores are >= 0, so |score| ("grad") ranks them as they are
        chosen = ops.select([scores[p] for p in ps], float(density), score="grad",
                            scope=scope)
        masks.update(zip(ps, chosen))
    return {p: masks[p] for p in params}


def fish_mask(model_or_params, batches, loss_fn, density, *, scope="tensor",
              num_batches=None):
    """FISH mask: the largest entries of sum over calibration batches of g^2.

    batches: an iterable of whatever loss_fn takes; loss_fn(batch) -> scalar loss.
    scope "tensor": ceil(density * numel) positions per param; "global": that
    fraction of all params' elements together. Returns {param: int64 positions}.
    """
    _check_mask_args(density, scope, num_batches)
    scores = gradient_scores(model_or_params, batches, loss_fn, "sq_sum", num_batches)
    return top_mask(scores, density, scope)


def sift_mask(model_or_params, batches, loss_fn, density, *, scope="tensor",
              num_batches=None, reduce="abs_sum"):
    """SIFT mask: the largest gradient magnitudes over the calibration batches.

    reduce "abs_sum" (default): |sum of g| (the gradient of the whole calibration
    loss, as SIFT); "sum_abs": sum of |g|. Otherwise as `fish_mask`.
    """
    _check_mask_args(density, scope, num_batches)
    if reduce not in SIFT_REDUCES:
        raise ValueError(f"reduce must be one of {', '.join(map(repr, SIFT_REDUCES))}, "
                         f"got {reduce!r}")
    scores = gradient_scores(model_or_params, batches, loss_fn, reduce, num_batches)
    return top_mask(scores, density, scope)


def random_mask(model_or_params, density, *, scope="tensor", generator=None):
    """Uniformly drawn positions (reproducible from `generator` or torch's seed)."""
    _check_mask_args(density, scope, None)
    params = trainable_params(model_or_params)
    chosen = ops.select([p.detach() for p in params], float(density), score="random",
                        scope=scope, generator=generator)
    return dict(zip(params, chosen))


def mask_density(masks):
    """The fraction of the masked params' elements the masks hold."""
    total = sum(p.numel() for p in masks)
    return sum(idx.numel() for idx in masks.values()) / max(total, 1)
