"""The update kernels (incrkern.ops.adam_update_ / sgd_update_) against the pure-torch
reference: every dtype, edge sizes, each form (dense, indices, masks, compact state,
ages) and option, unchosen elements bit-identical, bad arguments refused before
anything is written."""
from math import prod as math_prod

import pytest
import torch

from incrkern import ops, reference
from helpers import (CUDA_DTYPES, DTYPES, assert_param_close, assert_state_close, cuda_copy,
                     needs_ext)

SIZES = [0, 1, 3, 4, 5, 17, 1030]
FORMS = ["dense", "indices", "masks", "compact"]


# ----------------------------------------------------------------------------------
# inputs


def _k_values(n):
    """Indices counts worth trying for a tensor of n elements: 0, 1, some, all."""
    return sorted({0, min(1, n), n // 3, n})


def make_inputs(sizes, dtype, form, *, grad_fp32=False, with_ages=False, ks=None,
                device="cpu", offset=0, momentum_state=True, state1=True, amsgrad=False):
    """Random params, grads, state and positions for one call. `offset` > 0 makes every
    tensor a view at that storage offset (off the vectorised path). `amsgrad`: AMSGrad's
    max_exp_avg_sqs too (s2), some above the new exp_avg_sq, some below."""
    math = ops.math_dtype(dtype)
    gdtype = math if grad_fp32 else dtype

    def tensor(n, dt, fn=torch.randn):
        return fn(n + offset, device=device).to(dt)[offset:]

    shapes = [s if isinstance(s, tuple) else (s,) for s in sizes]
    sizes = [math_prod(s) for s in shapes]
    params = [tensor(n, dtype).view(s) for n, s in zip(sizes, shapes)]
    grads = [tensor(n, gdtype).view(s) for n, s in zip(sizes, shapes)]
    indices, masks = [], []
    for i, n in enumerate(sizes):
        if form in ("indices", "compact"):
            k = ks[i] if ks is not None else _k_values(n)[i % len(_k_values(n))]
            indices.append(torch.randperm(n, device=device)[:k])  # unique, unsorted
        elif form == "masks":
            masks.append((torch.rand(n, device=device) < 0.4).view(shapes[i]))
    state_sizes = [ix.numel() for ix in indices] if form == "compact" else sizes
    s0 = [tensor(n, math) * 0.1 for n in state_sizes] if momentum_state else []
    s1 = [tensor(n, math, torch.rand) * 0.01 for n in state_sizes] if state1 else None
    ages = [torch.randint(0, 5, (n,), dtype=torch.int32, device=device)
            for n in state_sizes] if with_ages else []
    s2 = [tensor(n, math, torch.rand) * 0.02 for n in state_sizes] if amsgrad else []
    return dict(params=params, grads=grads, s0=s0, s1=s1, indices=indices, masks=masks,
                ages=ages, s2=s2)


def clone_inputs(x):
    out = {}
    for key, v in x.items():
        out[key] = None if v is None else [t.clone() for t in v]
    return out


def chosen(x, i):
    """Bool mask of the elements of tensor i an update may change."""
    n = x["params"][i].numel()
    if x["indices"]:
        m = torch.zeros(n, dtype=torch.bool)
        m[x["indices"][i].cpu()] = True
        return m
    if x["masks"]:
        return x["masks"][i].cpu().reshape(-1).clone()
    return torch.ones(n, dtype=torch.bool)


# ----------------------------------------------------------------------------------
# runners: the kernel (through incrkern.ops) and the reference on the same inputs


def run_adam(x, use_reference=False, *, steps=None, **kw):
    steps = steps or [torch.tensor(3.0) for _ in x["params"]]
    kw.setdefault("lr", 1e-2)
    if use_reference:
        args = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                    decoupled_weight_decay=False, maximize=False)
        args.update(kw)
        reference.adam_update_(x["params"], x["grads"], x["s0"], x["s1"], steps,
                               x["indices"], x["masks"], x["ages"], x["s2"], **args)
    else:
        ops.adam_update_(x["params"], x["grads"], x["s0"], x["s1"], steps,
                         indices=x["indices"] or None, masks=x["masks"] or None,
                         ages=x["ages"] or None, max_exp_avg_sqs=x["s2"] or None, **kw)


def run_sgd(x, use_reference=False, **kw):
    kw.setdefault("lr", 1e-2)
    if use_reference:
        args = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False)
        args.update(kw)
        first = args.pop("first_step", None) or [False] * len(x["params"])
        reference.sgd_update_(x["params"], x["grads"], x["s0"], x["indices"], x["masks"],
                              first, **args)
    else:
        ops.sgd_update_(x["params"], x["grads"], x["s0"], indices=x["indices"] or None,
                        masks=x["masks"] or None, **kw)


# ----------------------------------------------------------------------------------
# comparisons


def compare(kernel, ref, before, compact=False, consume=False):
    """The kernel's results against the reference's, and everything unchosen untouched."""
    def flat(d, key, i):
        return d[key][i].reshape(-1)

    for i in range(len(kernel["params"])):
        sel = chosen(before, i)
        assert_param_close(kernel["params"][i], ref["params"][i])
        assert torch.equal(flat(kernel, "params", i)[~sel], flat(before, "params", i)[~sel])
        g = flat(kernel, "grads", i)
        assert torch.equal(g[~sel], flat(before, "grads", i)[~sel])
        if consume:
            assert (g[sel] == 0).all()
        else:
            assert torch.equal(g, flat(before, "grads", i))
        for key in ("s0", "s1", "s2", "ages"):
            if not kernel[key]:
                continue
            assert_state_close(kernel[key][i], ref[key][i])
            if not compact:
                assert torch.equal(flat(kernel, key, i)[~sel], flat(before, key, i)[~sel])


def check(run, x, compact=False, **kw):
    """run (run_adam or run_sgd) on x through the kernel and on a copy through the
    reference; compares them. Returns the inputs as they were before."""
    before = clone_inputs(x)
    ref = clone_inputs(x)
    if compact:
        kw["compact_state"] = True
    run(x, **kw)
    run(ref, use_reference=True, **kw)
    compare(x, ref, before, compact=compact, consume=kw.get("consume_grad", False))
    return before


def check_adam(x, compact=False, **kw):
    return check(run_adam, x, compact, **kw)


def check_sgd(x, compact=False, **kw):
    return check(run_sgd, x, compact, **kw)


# ----------------------------------------------------------------------------------
# Adam / AdamW


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_forms(dtype, form, decoupled):
    x = make_inputs(SIZES, dtype, form)
    check_adam(x, compact=form == "compact", weight_decay=0.1,
               decoupled_weight_decay=decoupled)


SHAPES = [(3, 5, 7), (0, 4), (1,), (2, 1, 3), (33, 31)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_shapes(dtype, form):
    # Params of any shape; indices are flat positions, masks have the param's shape.
    x = make_inputs(SHAPES, dtype, form, with_ages=form == "indices")
    check_adam(x, compact=form == "compact", decoupled_weight_decay=True, weight_decay=0.1)
    x = make_inputs(SHAPES, dtype, form, state1=False)
    check_sgd(x, compact=form == "compact", momentum=0.9, nesterov=True)


@pytest.mark.parametrize("form", ["dense", "indices", "masks"])
def test_adam_large_tensor(form):
    # 1000003: more than one parallel_for grain, not a multiple of 4.
    x = make_inputs([1000003], torch.float32, form, ks=[300001])
    check_adam(x, decoupled_weight_decay=True, weight_decay=0.01)


@pytest.mark.parametrize("k", [0, 1, 17])
@pytest.mark.parametrize("compact", [False, True])
def test_adam_indices_k(k, compact):
    form = "compact" if compact else "indices"
    x = make_inputs([17, 17], torch.float32, form, ks=[k, 17 - k])
    check_adam(x, compact=compact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_adam_options(dtype, form):
    # maximize, grad_scale, consume_grad and weight decay together.
    x = make_inputs(SIZES, dtype, form)
    check_adam(x, compact=form == "compact", maximize=True, grad_scale=0.25,
               consume_grad=True, weight_decay=0.05, lr=3e-3, beta1=0.8, beta2=0.99,
               eps=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("consume", [False, True])
def test_adam_fp32_grads(dtype, form, consume):
    x = make_inputs(SIZES, dtype, form, grad_fp32=True)
    assert x["grads"][1].dtype == torch.float32
    check_adam(x, compact=form == "compact", consume_grad=consume)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_adam_ages(dtype, form):
    # Per-element bias correction: every updated element's age goes up by one.
    x = make_inputs(SIZES, dtype, form, with_ages=True)
    before = check_adam(x, compact=form == "compact", decoupled_weight_decay=True,
                        weight_decay=0.01)
    for i in range(len(SIZES)):
        if form == "compact":
            assert torch.equal(x["ages"][i], before["ages"][i] + 1)
        else:
            sel = chosen(before, i)
            assert torch.equal(x["ages"][i], before["ages"][i] + sel.int())


def test_adam_ages_zero_equals_steps_one():
    # age 0 -> 1 gives the bias correction of a first step.
    x = make_inputs([33], torch.float32, "dense", with_ages=True)
    x["ages"][0].zero_()
    y = clone_inputs(x)
    y["ages"] = []
    run_adam(x, steps=[torch.tensor(7.0)])
    run_adam(y, steps=[torch.tensor(1.0)])
    torch.testing.assert_close(x["params"][0], y["params"][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", FORMS)
def test_adam_lr_tensor(form):
    x = make_inputs(SIZES, torch.float32, form)
    y = clone_inputs(x)
    lr = torch.tensor(2e-3)
    check_adam(x, compact=form == "compact", lr=0.5, lr_tensor=lr)
    # The same as lr given as a number (the float32 value the tensor holds).
    run_adam(y, lr=lr.item(), compact_state=form == "compact")
    for a, b in zip(x["params"], y["params"]):
        assert torch.equal(a, b)


def test_adam_steps_per_tensor():
    x = make_inputs([5, 9], torch.float32, "dense")
    check_adam(x, steps=[torch.tensor(1.0), torch.tensor(1000.0)])


def test_adam_matches_torch_optim():
    # density 1: the dense kernel is torch.optim.AdamW's single-tensor step.
    p = torch.randn(1001)
    q = p.clone().requires_grad_()
    opt = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
    m, v = torch.zeros(1001), torch.zeros(1001)
    for step in range(1, 6):
        g = torch.randn(1001)
        q.grad = g.clone()
        opt.step()
        ops.adam_update_([p], [g], [m], [v], [torch.tensor(float(step))], lr=1e-2,
                         weight_decay=0.1, decoupled_weight_decay=True)
    torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, opt.state[q]["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, opt.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-6)


def test_adam_unaligned_views():
    x = make_inputs(SIZES, torch.float32, "dense", offset=1)
    check_adam(x, decoupled_weight_decay=True, weight_decay=0.1)


# ----------------------------------------------------------------------------------
# AMSGrad: max_exp_avg_sqs (s2), lazy like the moments

AMSGRAD_VARIANTS = {
    "adam": dict(weight_decay=0.1),
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "options": dict(maximize=True, grad_scale=0.25, consume_grad=True, lr=3e-3, beta1=0.8,
                    beta2=0.99, eps=1e-6),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", list(AMSGRAD_VARIANTS))
def test_adam_amsgrad_forms(dtype, form, variant):
    # Where the old maximum is larger it stays (compare() also checks that unchosen
    # elements keep theirs bit-identical).
    x = make_inputs(SIZES, dtype, form, amsgrad=True, with_ages=variant == "adamw")
    check_adam(x, compact=form == "compact", **AMSGRAD_VARIANTS[variant])


@pytest.mark.parametrize("form", ["dense", "indices", "masks"])
def test_adam_amsgrad_large_tensor(form):
    x = make_inputs([1000003], torch.float32, form, ks=[300001], amsgrad=True)
    check_adam(x, decoupled_weight_decay=True, weight_decay=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_amsgrad_fp32_grads_unaligned(dtype):
    x = make_inputs(SIZES, dtype, "masks", grad_fp32=True, amsgrad=True)
    check_adam(x, consume_grad=True)
    x = make_inputs(SIZES, torch.float32, "dense", offset=1, amsgrad=True)
    check_adam(x)


def _with_specials(x):
    """NaN and inf in the grads and in the kept maxima, at the start of each tensor
    (within the first vector of the streaming loops) and at its end."""
    specials = [float("nan"), float("inf"), -float("inf")]
    for g, vmax in zip(x["grads"], x["s2"]):
        g, vmax = g.view(-1), vmax.view(-1)
        for j, value in enumerate(specials):
            if j < g.numel():
                g[j] = value
            if g.numel() > 2 * len(specials):
                g[-1 - j] = value
        if vmax.numel() > 3:
            vmax[3] = float("nan")
            vmax[-4] = float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_adam_amsgrad_nan_inf(dtype, form):
    # NaN propagates into the maximum from either side, as torch.maximum's does.
    x = make_inputs([1, 5, 17, 1030], dtype, form, amsgrad=True, ks=[1, 5, 9, 1030])
    _with_specials(x)
    ref = clone_inputs(x)
    compact = form == "compact"
    run_adam(x, compact_state=compact, weight_decay=0.1)
    run_adam(ref, use_reference=True, compact_state=compact, weight_decay=0.1)
    for key in ("params", "s0", "s1", "s2"):
        for a, b in zip(x[key], ref[key]):
            tol = dict(rtol=1e-5, atol=1e-6) if a.dtype in (torch.float32, torch.float64) \
                else {}
            torch.testing.assert_close(a, b, equal_nan=True, msg=key, **tol)
    nan_max = [bool(v.isnan().any()) for v in x["s2"]]
    assert nan_max[-1]  # the test has NaN maxima to compare


def test_adam_amsgrad_matches_torch_optim():
    # density 1: torch.optim.Adam(amsgrad=True)'s single-tensor step, a NaN gradient
    # included (it turns the elements' maxima to NaN, in torch too).
    p = torch.randn(1001)
    q = p.clone().requires_grad_()
    opt = torch.optim.Adam([q], lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False)
    m, v, vmax = torch.zeros(1001), torch.zeros(1001), torch.zeros(1001)
    for step in range(1, 8):
        g = torch.randn(1001) * (4.0 if step == 3 else 1.0)  # a large one, then smaller
        if step == 5:
            g[7] = float("nan")
        q.grad = g.clone()
        opt.step()
        ops.adam_update_([p], [g], [m], [v], [torch.tensor(float(step))], lr=1e-2,
                         weight_decay=0.1, max_exp_avg_sqs=[vmax])
    state = opt.state[q]
    for ours, theirs in ((p, q.detach()), (m, state["exp_avg"]), (v, state["exp_avg_sq"]),
                         (vmax, state["max_exp_avg_sq"])):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert vmax[7].isnan() and (vmax > v).any()


# ----------------------------------------------------------------------------------
# SGD

SGD_VARIANTS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": dict(momentum=0.8, nesterov=True, weight_decay=0.01),
    "first": dict(momentum=0.9, dampening=0.5, first_step=True),
    "maximize": dict(momentum=0.5, maximize=True, grad_scale=2.0, consume_grad=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sgd_forms(dtype, form, variant):
    kw = dict(SGD_VARIANTS[variant])
    if kw.pop("first_step", False):
        kw["first_step"] = [i % 2 == 0 for i in range(len(SIZES))]
    with_buffers = kw["momentum"] != 0
    x = make_inputs(SIZES, dtype, form, momentum_state=with_buffers, state1=False)
    check_sgd(x, compact=form == "compact", **kw)


def test_sgd_momentum_zero_keeps_buffers():
    # Buffers given with momentum 0 are neither needed nor written.
    x = make_inputs(SIZES, torch.float32, "indices", state1=False)
    before = check_sgd(x, momentum=0.0)
    for a, b in zip(x["s0"], before["s0"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_fp32_grads_and_lr_tensor(dtype):
    x = make_inputs(SIZES, dtype, "masks", grad_fp32=True, state1=False)
    check_sgd(x, momentum=0.9, lr=1.0, lr_tensor=torch.tensor(0.05), consume_grad=True)


def test_sgd_large_tensor():
    x = make_inputs([1000003], torch.float32, "indices", ks=[500001], state1=False)
    check_sgd(x, momentum=0.9, nesterov=True)


def test_sgd_matches_torch_optim():
    p = torch.randn(1001)
    q = p.clone().requires_grad_()
    opt = torch.optim.SGD([q], lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01,
                          foreach=False)
    buf = torch.zeros(1001)
    for step in range(5):
        g = torch.randn(1001)
        q.grad = g.clone()
        opt.step()
        ops.sgd_update_([p], [g], [buf], lr=1e-2, momentum=0.9, dampening=0.1,
                        weight_decay=0.01, first_step=[step == 0])
    torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf, opt.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# bad arguments: a clear error naming the argument, and nothing touched


def _adam_base():
    x = make_inputs([6, 7], torch.float32, "indices", ks=[2, 3])
    return dict(params=x["params"], grads=x["grads"], exp_avgs=x["s0"],
                exp_avg_sqs=x["s1"], steps=[torch.tensor(1.0), torch.tensor(1.0)],
                indices=x["indices"], lr=1e-2)


def _replace(kw, key, i, value):
    kw[key] = list(kw[key])
    kw[key][i] = value
    return kw


ADAM_BAD = [
    ("params-not-list", TypeError, "params", lambda kw: kw.update(params=kw["params"][0])),
    ("grads-length", ValueError, "grads", lambda kw: kw.update(grads=kw["grads"][:1])),
    ("grad-dtype", TypeError, r"grads\[1\]",
     lambda kw: _replace(kw, "grads", 1, torch.randn(7).half())),
    ("grad-numel", ValueError, r"grads\[1\]",
     lambda kw: _replace(kw, "grads", 1, torch.randn(8))),
    ("param-noncontig", ValueError, r"params\[1\]",
     lambda kw: _replace(kw, "params", 1, torch.randn(7, 2)[:, 0])),
    ("param-int", TypeError, r"params\[0\]",
     lambda kw: _replace(kw, "params", 0, torch.ones(6, dtype=torch.int64))),
    ("grad-device", ValueError, r"grads\[1\]",
     lambda kw: _replace(kw, "grads", 1, torch.empty(7, device="meta"))),
    ("exp-avg-numel", ValueError, r"exp_avgs\[1\]",
     lambda kw: _replace(kw, "exp_avgs", 1, torch.zeros(6))),
    ("exp-avg-sq-dtype", TypeError, r"exp_avg_sqs\[0\]",
     lambda kw: _replace(kw, "exp_avg_sqs", 0, torch.zeros(6, dtype=torch.float64))),
    ("steps-length", ValueError, "steps", lambda kw: kw.update(steps=kw["steps"][:1])),
    ("steps-dtype", ValueError, r"steps\[1\]",
     lambda kw: _replace(kw, "steps", 1, torch.tensor(1, dtype=torch.int64))),
    ("index-high", ValueError, r"indices\[1\]",
     lambda kw: _replace(kw, "indices", 1, torch.tensor([0, 7]))),
    ("index-negative", ValueError, r"indices\[1\]",
     lambda kw: _replace(kw, "indices", 1, torch.tensor([-1, 2]))),
    ("index-dtype", TypeError, r"indices\[0\]",
     lambda kw: _replace(kw, "indices", 0, torch.tensor([0, 1], dtype=torch.int32))),
    ("index-2d", ValueError, r"indices\[0\]",
     lambda kw: _replace(kw, "indices", 0, torch.tensor([[0, 1]]))),
    ("indices-and-masks", ValueError, "masks",
     lambda kw: kw.update(masks=[torch.ones(6, dtype=torch.bool), torch.ones(7, dtype=torch.bool)])),
    ("mask-dtype", TypeError, r"masks\[0\]",
     lambda kw: kw.update(indices=None, masks=[torch.ones(6), torch.ones(7, dtype=torch.bool)])),
    ("mask-numel", ValueError, r"masks\[1\]",
     lambda kw: kw.update(indices=None, masks=[torch.ones(6, dtype=torch.bool),
                                               torch.ones(6, dtype=torch.bool)])),
    ("compact-without-indices", ValueError, "compact_state",
     lambda kw: kw.update(indices=None, compact_state=True)),
    ("compact-state-numel", ValueError, r"exp_avgs\[0\]",
     lambda kw: kw.update(compact_state=True)),
    ("ages-dtype", TypeError, r"ages\[0\]",
     lambda kw: kw.update(ages=[torch.zeros(6, dtype=torch.int64), torch.zeros(7, dtype=torch.int32)])),
    ("ages-length", ValueError, "ages",
     lambda kw: kw.update(ages=[torch.zeros(6, dtype=torch.int32)])),
    ("max-exp-avg-sqs-length", ValueError, "max_exp_avg_sqs",
     lambda kw: kw.update(max_exp_avg_sqs=[torch.zeros(6)])),
    ("max-exp-avg-sq-numel", ValueError, r"max_exp_avg_sqs\[1\]",
     lambda kw: kw.update(max_exp_avg_sqs=[torch.zeros(6), torch.zeros(6)])),
    ("max-exp-avg-sq-dtype", TypeError, r"max_exp_avg_sqs\[0\]",
     lambda kw: kw.update(max_exp_avg_sqs=[torch.zeros(6).double(), torch.zeros(7)])),
    ("max-exp-avg-sqs-type", TypeError, "max_exp_avg_sqs",
     lambda kw: kw.update(max_exp_avg_sqs=torch.zeros(6))),
    ("lr-negative", ValueError, "lr", lambda kw: kw.update(lr=-1.0)),
    ("lr-type", TypeError, "lr", lambda kw: kw.update(lr="0.1")),
    ("lr-tensor-dtype", TypeError, "lr_tensor",
     lambda kw: kw.update(lr_tensor=torch.tensor(0.1, dtype=torch.float64))),
    ("beta1-range", ValueError, "beta1", lambda kw: kw.update(beta1=1.5)),
    ("beta2-type", TypeError, "beta2", lambda kw: kw.update(beta2=None)),
    ("beta2-one", ValueError, "beta2", lambda kw: kw.update(beta2=1.0)),
    ("eps-negative", ValueError, "eps", lambda kw: kw.update(eps=-1e-8)),
    ("grad-scale-type", TypeError, "grad_scale", lambda kw: kw.update(grad_scale="2")),
]


def _all_tensors(kw):
    out = []
    for v in kw.values():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                out.append(t)
    return out


def _sgd_base():
    x = make_inputs([6, 7], torch.float32, "dense", state1=False)
    return dict(params=x["params"], grads=x["grads"], momentum_buffers=x["s0"], lr=1e-2,
                momentum=0.9)


SGD_BAD = [
    ("momentum-without-buffers", ValueError, "momentum",
     lambda kw: kw.update(momentum_buffers=None)),
    ("buffer-numel", ValueError, r"momentum_buffers\[1\]",
     lambda kw: _replace(kw, "momentum_buffers", 1, torch.zeros(8))),
    ("buffer-dtype", TypeError, r"momentum_buffers\[0\]",
     lambda kw: _replace(kw, "momentum_buffers", 0, torch.zeros(6).half())),
    ("first-step-length", ValueError, "first_step", lambda kw: kw.update(first_step=[True])),
    ("momentum-negative", ValueError, "momentum", lambda kw: kw.update(momentum=-0.5)),
    ("weight-decay-type", TypeError, "weight_decay", lambda kw: kw.update(weight_decay="0")),
    ("index-high", ValueError, r"indices\[0\]",
     lambda kw: kw.update(indices=[torch.tensor([6]), torch.tensor([0])])),
    ("grads-length", ValueError, "grads", lambda kw: kw.update(grads=kw["grads"][:1])),
]


BAD_CALLS = [
    pytest.param(ops.adam_update_, _adam_base,
                 ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"), m, e, s,
                 id=f"adam-{name}") for name, e, s, m in ADAM_BAD
] + [
    pytest.param(ops.sgd_update_, _sgd_base, ("params", "grads", "momentum_buffers"),
                 m, e, s, id=f"sgd-{name}") for name, e, s, m in SGD_BAD
]


@pytest.mark.parametrize("op,base,positional,mutate,exc,match", BAD_CALLS)
def test_bad_arguments_touch_nothing(op, base, positional, mutate, exc, match):
    """op(*kw[positional], **rest, consume_grad=True) raises exc and writes nothing."""
    kw = base()
    mutate(kw)
    tensors = _all_tensors(kw)
    before = [t.clone() for t in tensors]
    args = [kw.pop(k) for k in positional]
    kw["consume_grad"] = True
    with pytest.raises(exc, match=match):
        op(*args, **kw)
    for t, t0 in zip(tensors, before):
        assert torch.equal(t, t0)


@needs_ext
def test_kernel_refuses_out_of_range_indices():
    # The compiled op checks positions itself too, before writing anything.
    kw = _adam_base()
    kw["indices"][1] = torch.tensor([1, 7])
    tensors = _all_tensors(kw)
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=r"indices\[1\]"):
        torch.ops.incrkern.adam_update_(kw["params"], kw["grads"], kw["exp_avgs"],
                                        kw["exp_avg_sqs"], kw["steps"], kw["indices"], [], [],
                                        [], 1e-2, 0.9, 0.999, 1e-8, 0.0, True, False,
                                        consume_grad=True)
    for t, t0 in zip(tensors, before):
        assert torch.equal(t, t0)


@needs_ext
@pytest.mark.parametrize("bad,match", [
    ([torch.zeros(6), torch.zeros(6)], r"max_exp_avg_sqs\[1\]"),
    ([torch.zeros(6)], "max_exp_avg_sqs has 1"),
])
def test_kernel_refuses_bad_max_exp_avg_sqs(bad, match):
    kw = _adam_base()
    tensors = _all_tensors(kw) + bad
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.incrkern.adam_update_(
            kw["params"], kw["grads"], kw["exp_avgs"], kw["exp_avg_sqs"], kw["steps"],
            kw["indices"], [], [], bad, 1e-2, 0.9, 0.999, 1e-8, 0.0, True, False,
            consume_grad=True)
    for t, t0 in zip(tensors, before):
        assert torch.equal(t, t0)


# ----------------------------------------------------------------------------------
# opcheck: schema, fake kernel, functionalisation


@needs_ext
@pytest.mark.parametrize("form", ["dense", "indices", "masks"])
def test_adam_opcheck(form):
    x = make_inputs([5, 3], torch.float32, form, ks=[2, 3])
    args = (x["params"], x["grads"], x["s0"], x["s1"], [torch.tensor(2.0)] * 2,
            x["indices"], x["masks"], [], [], 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False)
    torch.library.opcheck(torch.ops.incrkern.adam_update_.default, args,
                          {"consume_grad": True})


@needs_ext
def test_adam_opcheck_compact_ages():
    x = make_inputs([5, 3], torch.bfloat16, "compact", ks=[2, 1], with_ages=True,
                    grad_fp32=True)
    args = (x["params"], x["grads"], x["s0"], x["s1"], [torch.tensor(2.0)] * 2,
            x["indices"], [], x["ages"], [], 1e-2, 0.9, 0.999, 1e-8, 0.0, False, True)
    torch.library.opcheck(torch.ops.incrkern.adam_update_.default, args,
                          {"compact_state": True, "lr_tensor": torch.tensor(1e-3)})


@needs_ext
@pytest.mark.parametrize("form", ["dense", "masks", "compact"])
def test_adam_amsgrad_opcheck(form):
    x = make_inputs([5, 3], torch.float32, form, ks=[2, 3], amsgrad=True)
    args = (x["params"], x["grads"], x["s0"], x["s1"], [torch.tensor(2.0)] * 2,
            x["indices"], x["masks"], [], x["s2"], 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False)
    torch.library.opcheck(torch.ops.incrkern.adam_update_.default, args,
                          {"consume_grad": True, "compact_state": form == "compact"})


@needs_ext
def test_sgd_opcheck():
    x = make_inputs([5, 3], torch.float32, "indices", ks=[2, 3], state1=False)
    args = (x["params"], x["grads"], x["s0"], x["indices"], [], [True, False], 1e-2, 0.9,
            0.1, 0.01, False, False)
    torch.library.opcheck(torch.ops.incrkern.sgd_update_.default, args,
                          {"consume_grad": True})


# ----------------------------------------------------------------------------------
# CUDA against CPU (the same rules; the GPU contracts a*b+c into fused multiply-adds)


def _to_cuda(x, offset=0):
    """x on the GPU; params, grads and state at storage offset `offset`, as
    make_inputs built them on the CPU."""
    shifted = ("params", "grads", "s0", "s1", "s2")
    return {k: None if v is None else [cuda_copy(t, offset if k in shifted else 0) for t in v]
            for k, v in x.items()}


def _compare_devices(gpu, cpu, compact, before=None):
    for i in range(len(cpu["params"])):
        assert_param_close(gpu["params"][i].cpu(), cpu["params"][i],
                           before[i] if before else None)
        assert torch.equal(gpu["grads"][i].cpu(), cpu["grads"][i])
        for key in ("s0", "s1", "s2", "ages"):
            if cpu[key]:
                assert_state_close(gpu[key][i].cpu(), cpu[key][i])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", FORMS + ["ages"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("grad_fp32", [False, True])
def test_adam_cuda_matches_cpu(dtype, form, offset, grad_fp32):
    if grad_fp32 and dtype == torch.float32:
        pytest.skip("fp32 grads are the param dtype")
    # Many small tensors (more than one table of slots) and one spanning several
    # launches' worth of 64K-element chunks.
    sizes = SIZES + [3] * 70 + [65536 * 330 + 7]
    form_ = "dense" if form == "ages" else form
    x = make_inputs(sizes, dtype, form_, offset=offset, grad_fp32=grad_fp32,
                    with_ages=form == "ages")
    g = _to_cuda(x, offset)
    kw = dict(decoupled_weight_decay=True, weight_decay=0.01, grad_scale=0.5,
              consume_grad=True)
    steps = [torch.tensor(3.0).cuda() if i % 2 else torch.tensor(3.0) for i in range(len(sizes))]
    kw["compact_state"] = form == "compact"
    before = [p.clone() for p in x["params"]]
    run_adam(x, steps=[torch.tensor(3.0)] * len(sizes), **kw)
    run_adam(g, steps=steps, lr_tensor=torch.tensor(1e-2, device="cuda"), **kw)
    torch.cuda.synchronize()
    _compare_devices(g, x, form == "compact", before)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", FORMS + ["ages"])
@pytest.mark.parametrize("offset", [0, 1])
def test_adam_amsgrad_cuda_matches_cpu(dtype, form, offset):
    sizes = SIZES + [3] * 70 + [65536 * 33 + 7]
    form_ = "dense" if form == "ages" else form
    x = make_inputs(sizes, dtype, form_, offset=offset, with_ages=form == "ages",
                    amsgrad=True)
    _with_specials(x)
    g = _to_cuda(x, offset)
    kw = dict(weight_decay=0.01, grad_scale=0.5, consume_grad=True,
              compact_state=form == "compact")
    run_adam(x, **kw)
    run_adam(g, steps=[torch.tensor(3.0, device="cuda") for _ in sizes], **kw)
    torch.cuda.synchronize()
    for key in ("params", "grads", "s0", "s1", "s2", "ages"):
        for a, b in zip(g[key], x[key]):
            tol = {} if a.dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5,
                                                                             atol=1e-6)
            torch.testing.assert_close(a.cpu(), b, equal_nan=True, msg=key, **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sgd_cuda_matches_cpu(dtype, form, variant):
    kw = dict(SGD_VARIANTS[variant])
    sizes = SIZES + [3] * 40 + [65536 * 5 + 3]
    if kw.pop("first_step", False):
        kw["first_step"] = [i % 2 == 0 for i in range(len(sizes))]
    x = make_inputs(sizes, dtype, form, momentum_state=kw["momentum"] != 0, state1=False)
    g = _to_cuda(x)
    kw["compact_state"] = form == "compact"
    run_sgd(x, **kw)
    run_sgd(g, **kw)
    torch.cuda.synchronize()
    _compare_devices(g, x, form == "compact")


@pytest.mark.cuda
def test_sgd_cuda_momentum_zero_keeps_buffers():
    x = _to_cuda(make_inputs(SIZES, torch.float32, "indices", state1=False))
    before = [t.clone() for t in x["s0"]]
    run_sgd(x, momentum=0.0, consume_grad=True)
    torch.cuda.synchronize()
    for a, b in zip(x["s0"], before):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_cuda_first_param_empty(form, opt):
    # An empty tensor's data pointers are null: they must not turn the call's
    # state, positions or masks off for the params after it.
    sizes = [0, 1030, 5]
    x = make_inputs(sizes, torch.float32, form, ks=[0, 300, 5], state1=opt == "adam")
    g = _to_cuda(x)
    if opt == "adam":
        kw = dict(compact_state=form == "compact", weight_decay=0.01)
        run_adam(x, **kw)
        run_adam(g, steps=[torch.tensor(3.0, device="cuda") for _ in sizes], **kw)
    else:
        kw = dict(compact_state=form == "compact", momentum=0.9, first_step=[True, False, False])
        run_sgd(x, **kw)
        run_sgd(g, **kw)
    torch.cuda.synchronize()
    _compare_devices(g, x, form == "compact")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("compact", [False, True])
def test_cuda_indexed_update_many_positions(dtype, compact):
    # 2e6 positions: several thousand-position blocks per tensor, over more than
    # one launch.
    sizes = [3_000_001, 17, 1_000_000]
    ks = [2_000_000, 9, 1_000_000]
    form = "compact" if compact else "indices"
    x = make_inputs(sizes, dtype, form, ks=ks, with_ages=True)
    g = _to_cuda(x)
    kw = dict(compact_state=compact, decoupled_weight_decay=True, weight_decay=0.01,
              consume_grad=True)
    run_adam(x, **kw)
    run_adam(g, steps=[torch.tensor(3.0) for _ in sizes], **kw)
    torch.cuda.synchronize()
    _compare_devices(g, x, compact)
