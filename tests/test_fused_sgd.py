"""incrkern.ops.sgd_select_update_: per tensor the k largest |g| (error feedback:
|r + g|) updated by SGD in one call, against reference.select then
reference.sgd_update_ (the chosen set exactly, the params and momentum buffers to fp32
rounding, everything unchosen bit-identical, the grads only read, the residuals
bit-identical) and bit for bit against ops.select then ops.sgd_update_ (the op's
contract): the threshold stream (a k-th among zeros included), select's positions
below it, error feedback's listing pass and the fallback, every SGD option, mixed
precision, bad input refused before anything is written; and the optimizer's SGD step
through it against the composed route it replaces."""
import math

import pytest
import torch
from torch import nn

import incrkern
from helpers import hot_rows_steps
from incrkern import EXTENSION_LOADED, ops, reference
from test_fused import (BLOCK, TILE_MAX, assert_close_nan, clone, grads_of, ks_of, same,
                        small_cases)

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="extension not built")

HYPERS = {
    "momentum": dict(lr=1e-2, momentum=0.9),
    "nesterov": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "dampening": dict(lr=3e-3, momentum=0.5, dampening=0.3, maximize=True, weight_decay=0.01),
    "plain": dict(lr=1e-2, weight_decay=0.1),  # no momentum: no buffers
}


def make(sizes, dtype, kind="normal", seed=0, buffers=True, residual=False):
    """Params, gradients of grads_of's kind, (buffers) momentum buffers, nonzero so
    that every chosen element's buffer changes, and (residual) error feedback's
    residuals."""
    gen = torch.Generator().manual_seed(seed)
    x = dict(params=[], grads=[], bufs=[], r=[])
    for n in sizes:
        x["params"].append(torch.randn(n, generator=gen).to(dtype))
        x["grads"].append(grads_of(kind, n, gen).to(dtype))
        if buffers:
            x["bufs"].append((torch.randn(n, generator=gen) * 0.1).to(ops.math_dtype(dtype)))
        if residual:
            x["r"].append((torch.randn(n, generator=gen) * 0.5).to(ops.math_dtype(dtype)))
    return x


def full(hyper):
    """The hyperparameters with sgd_update_'s defaults filled in (the reference's)."""
    return dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False), **hyper)


def run(x, ks, approx=False, first=None, **hyper):
    return ops.sgd_select_update_(x["params"], x["grads"], x["bufs"], ks, approx=approx,
                                  first_step=first, residuals=x["r"] or None, **hyper)


def composed(x, ks, approx=False, first=None, **hyper):
    """The op's contract on x: (error feedback: accumulate_) select, then sgd_update_."""
    amp = dict(amp_scale=hyper.pop("amp_scale", None), found_inf=hyper.pop("found_inf", None))
    sources = x["grads"]
    if x["r"]:
        ops.accumulate_(x["r"], x["grads"], 1.0, **amp)
        sources, amp["amp_scale"] = x["r"], None
    indices = ops.select(sources, ks, score="grad", approx=approx)
    ops.sgd_update_(x["params"], sources, x["bufs"], indices=indices, first_step=first,
                    consume_grad=bool(x["r"]), **amp, **hyper)


def check(x, ks, approx=False, first=None, kernel=run, **hyper):
    """The op on x (or `kernel`, called as run), reference.sgd_update_ on a copy at the
    reference's exact set (approx, when the count is not k: at the set the op chose,
    which must be a whole top set); returns the counts."""
    hyper = full(hyper)
    assert hyper["momentum"] == 0 or x["bufs"], "momentum needs buffers"
    before = clone(x)
    counts = kernel(x, ks, approx, first, **hyper)
    assert counts.dtype == torch.int64 and counts.shape == (len(ks),)
    exact = reference.select(before["grads"], ks, "accumulated" if x["r"] else "grad",
                             residuals=before["r"])
    keys = reference.select_scores(before["grads"], "accumulated" if x["r"] else "grad",
                                   residuals=before["r"])
    indices = []
    for i, k in enumerate(ks):
        got = exact[i]
        if approx and int(counts[i]) != k:
            assert x["bufs"], "the changed set shows in the buffers"
            changed = ~same_elements(x["bufs"][i], before["bufs"][i])
            got = changed.nonzero().squeeze(1)
            if changed.any() and (~changed).any():
                assert keys[i][changed].min() > keys[i][~changed].max()
        assert int(counts[i]) == got.numel()
        indices.append(got)
    ref = clone(before)
    if x["r"]:
        reference.accumulate_(ref["r"], ref["grads"], 1.0)
    reference.sgd_update_(ref["params"], ref["r"] or ref["grads"], ref["bufs"], indices,
                          first_step=first or (), consume_grad=bool(x["r"]), **hyper)
    for i in range(len(ks)):
        unchosen = torch.ones(x["params"][i].numel(), dtype=torch.bool)
        unchosen[indices[i]] = False
        assert same(x["params"][i][unchosen], before["params"][i][unchosen]), "param moved"
        assert_close_nan(x["params"][i], ref["params"][i], before["params"][i])
        if x["bufs"]:
            assert same(x["bufs"][i][unchosen], before["bufs"][i][unchosen]), "buffer moved"
            assert_close_nan(x["bufs"][i], ref["bufs"][i])
        assert same(x["grads"][i], before["grads"][i]), "grads written"
        if x["r"]:
            assert same(x["r"][i], ref["r"][i]), "residual"
    return counts


def same_elements(a, b):
    return (a == b) | (a.isnan() & b.isnan())


# ----------------------------------------------------------------------------------
# against the reference


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "student_t", "sparse", "zeros", "ties", "special"])
def test_small_tensors(dtype, kind):
    for n, k in small_cases():
        check(make([n, 33], dtype, kind, seed=n + k), [min(k, n), min(33, k)],
              **HYPERS["momentum"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "rows", "sparse", "zeros"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.97])
def test_large_tensor(dtype, kind, density):
    """Past one block: the threshold stream over every thread from the stream density
    on (a k-th among zeros, "sparse" and "zeros", counts them), select's positions
    below it."""
    n = 3 * BLOCK + 5
    check(make([n], dtype, kind, seed=int(density * 1000)), [math.ceil(density * n)],
          **HYPERS["nesterov"])


@needs_ext
@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK + 3, TILE_MAX - 3, TILE_MAX + 5])
@pytest.mark.parametrize("density", [0.02, 0.05, 0.5])
def test_block_edges(n, density):
    """Tensors that select on one thread (up to 2^20 elements when they stream) and
    those that run over every thread, on either side of each limit."""
    check(make([n], torch.float32, "student_t", seed=n), [math.ceil(density * n)],
          **HYPERS["dampening"])


@needs_ext
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("first", [False, True])
def test_every_option(hyper, first):
    """Momentum (a new buffer at the first step takes the gradient as it is), nesterov,
    dampening, weight decay, maximize, and no momentum at all (no buffers)."""
    sizes = [2 * BLOCK + 7, 1000, 17]
    for density in (0.003, 0.06, 0.7):
        x = make(sizes, torch.float32, "student_t", seed=7, buffers=hyper != "plain")
        check(x, ks_of(sizes, [density] * 3), first=[first] * 3 if x["bufs"] else None,
              **HYPERS[hyper])


@needs_ext
@pytest.mark.parametrize("residual", [False, True])
def test_many_tensors_on_two_threads(residual):
    """One-thread tensors side by side and large ones over both threads, in one call,
    at densities on both sides of the stream's."""
    sizes = [1000, BLOCK + 17, 3, 2 * BLOCK + 1, 40_000, 17, TILE_MAX + 1]
    densities = [0.3, 0.2, 0.5, 0.01, 0.05, 1.0, 0.1]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(make(sizes, torch.bfloat16, "sparse", seed=7, residual=residual),
              ks_of(sizes, densities), **HYPERS["momentum"])
    finally:
        torch.set_num_threads(saved)


@needs_ext
@pytest.mark.parametrize("density", [0.05, 0.4])
def test_approx(density):
    """approx=True: the count and set within the contract (exact when the band holds
    the k-th, a whole top set otherwise), as adam_select_update_'s."""
    n = 2 * BLOCK + 9
    for kind in ("normal", "ties", "sparse"):
        check(make([n], torch.float32, kind, seed=3), [math.ceil(density * n)], approx=True,
              **HYPERS["momentum"])


@needs_ext
@pytest.mark.parametrize("when", ["before", "after"])
def test_forced_fallback(monkeypatch, when):
    """The positional fallback, forced before the counting (or, with a residual below
    the stream's density, listing) pass or after it (a band the counts refute)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    for n in (BLOCK - 5, 2 * BLOCK + 3):
        for approx in (False, True):
            for k, residual in ((n // 5, False), (n // 5, True), (n // 150, True)):
                check(make([n], torch.float32, "lognormal", seed=n, residual=residual), [k],
                      approx=approx, **HYPERS["nesterov"])


@needs_ext
def test_mixed_precision_and_lr_tensor():
    """grad_scale and GradScaler's scale (a power of two: |g| orders as |g / scale|;
    with a residual, g / scale is added to it), lr as a tensor, against the composed
    route bit for bit; a nonzero found_inf changes nothing and counts 0."""
    sizes = [2 * BLOCK + 1, 500]
    for density in (0.005, 0.2):
        for residual in (False, True):
            x = make(sizes, torch.float32, "normal", seed=11, residual=residual)
            y = clone(x)
            ks = ks_of(sizes, [density] * 2)
            amp = dict(amp_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
            hyper = dict(HYPERS["nesterov"], lr=0.0, lr_tensor=torch.tensor(0.05),
                         grad_scale=0.5)
            assert run(x, ks, **amp, **hyper).tolist() == ks
            composed(y, ks, **amp, **hyper)
            for key in ("params", "bufs", "r"):
                assert all(same(a, b) for a, b in zip(x[key], y[key])), (residual, key)
    x = make(sizes, torch.float32, "normal", seed=12, residual=True)
    before = clone(x)
    counts = run(x, ks_of(sizes, [0.3, 0.3]), amp_scale=torch.tensor(2.0),
                 found_inf=torch.tensor(1.0), **HYPERS["momentum"])
    assert counts.tolist() == [0, 0]
    for key in ("params", "bufs", "grads", "r"):
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "rows", "sparse", "zeros", "special"])
def test_error_feedback(dtype, kind):
    """residuals: the score |r + g|, the chosen updated by that sum and their residual
    zeroed, every other residual holding it. Past one block: the listing pass below the
    stream's density (a k-th among zeros, where r + g is mostly zeros, by select's
    positions), the threshold stream from it, fp64 by positions; one thread below."""
    sizes = [3 * BLOCK + 5, 3000, 1, 0]
    for density in (0.0, 0.001, 0.01, 0.1, 0.5, 1.0):
        x = make(sizes, dtype, kind, seed=int(density * 1000) + 1, residual=True)
        if kind in ("sparse", "zeros"):  # a residual where the gradient is nonzero
            x["r"] = [r * (g != 0) for r, g in zip(x["r"], x["grads"])]
        check(x, ks_of(sizes, [density] * 4), **HYPERS["nesterov"])


@needs_ext
@pytest.mark.parametrize("density", [0.004, 0.05, 0.4])
def test_error_feedback_approx(density):
    """approx=True with residuals: the listing pass's and the stream's band, within
    the contract."""
    n = 2 * BLOCK + 9
    for kind in ("normal", "ties", "rows"):
        check(make([n, 900], torch.float32, kind, seed=4, residual=True),
              ks_of([n, 900], [density] * 2), approx=True, **HYPERS["dampening"])


# ----------------------------------------------------------------------------------
# the contract: select then sgd_update_, bit for bit


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["student_t", "sparse", "ties", "special"])
@pytest.mark.parametrize("residual", [False, True])
def test_the_same_as_select_then_update(dtype, kind, residual):
    sizes = [2 * BLOCK + 11, 3000, 1]
    for density in (0.003, 0.03, 0.3, 0.9):
        for first in (False, True):
            x = make(sizes, dtype, kind, seed=5, residual=residual)
            y = clone(x)
            ks = ks_of(sizes, [density] * 3)
            hyper = HYPERS["nesterov"]
            assert run(x, ks, first=[first] * 3, **hyper).tolist() == ks
            composed(y, ks, first=[first] * 3, **hyper)
            for key in ("params", "bufs", "r"):
                for a, b in zip(x[key], y[key]):
                    assert same(a, b), (density, first, key)


# ----------------------------------------------------------------------------------
# arguments


@needs_ext
def test_bad_input_touches_nothing():
    x = make([100, 50], torch.float32)
    before = clone(x)
    hyper = dict(lr=1e-2, momentum=0.9)
    cases = [
        (dict(ks=[5]), ValueError, "ks must be a list of 2 ints"),
        (dict(ks=[5, 51]), ValueError, r"ks\[1\] must be in \[0, 50\], got 51"),
        (dict(ks=[5, 2.0]), TypeError, r"ks\[1\] must be an int"),
        (dict(bufs=x["bufs"][:1]), ValueError, "momentum != 0 needs one momentum buffer"),
        (dict(bufs=[x["bufs"][0], torch.zeros(49)]), ValueError,
         r"momentum_buffers\[1\] has 49 elements"),
        (dict(grads=[x["grads"][0], torch.zeros(50, dtype=torch.float64)]), TypeError,
         r"grads\[1\] has dtype torch.float64"),
        (dict(first_step=[True]), ValueError, "first_step has 1 entries, expected 2"),
        (dict(momentum=-0.5), ValueError, "momentum must be in"),
        (dict(lr="0.1"), TypeError, "lr must be a number"),
        (dict(residuals=[torch.zeros(100)]), ValueError, "residuals has 1 tensors, expected 2"),
        (dict(residuals=[torch.zeros(100), torch.zeros(50, dtype=torch.float64)]), TypeError,
         r"residuals\[1\] has dtype torch.float64"),
    ]
    for change, error, message in cases:
        args = dict(params=x["params"], grads=x["grads"], bufs=x["bufs"], ks=[5, 5], **hyper)
        args.update(change)
        with pytest.raises(error, match=message):
            ops.sgd_select_update_(args.pop("params"), args.pop("grads"), args.pop("bufs"),
                                   args.pop("ks"), **args)
    # The kernel's own checks, past the wrapper.
    op = torch.ops.incrkern.sgd_select_update_
    base = (x["params"], x["grads"], x["bufs"], [5, 5], [], [False, False], False, 1e-2, 0.9,
            0.0, 0.0, False, False)
    for args, message in (
            ((*base[:3], [5, 51], *base[4:]), r"ks\[1\] must be in \[0, 50\], got 51"),
            ((*base[:3], [5], *base[4:]), "ks has 1 entries, expected 2"),
            ((x["params"], [x["grads"][0], x["grads"][1].double()], *base[2:]),
             r"grads\[1\] has dtype Double, expected"),
            ((*base[:2], x["bufs"][:1], *base[3:]), "momentum_buffers has 1 tensors"),
            ((*base[:4], [torch.zeros(100)], *base[5:]), "residuals has 1 tensors"),
            ((*base[:4], [torch.zeros(100), torch.zeros(49)], *base[5:]),
             r"residuals\[1\] must be a contiguous Float tensor of 50"),
            ((*base[:5], [True], *base[6:]), "first_step has 1 entries, expected 2")):
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    for key in ("params", "grads", "bufs"):
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key


@needs_ext
def test_opcheck():
    x = make([1000, 3], torch.float32, residual=True)
    for residuals in ([], x["r"]):
        torch.library.opcheck(torch.ops.incrkern.sgd_select_update_,
                              (x["params"], x["grads"], x["bufs"], [10, 1], residuals,
                               [False, True], False, 1e-2, 0.9, 0.0, 0.0, False, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True], ids=["composed", "kernel"])
def test_cuda_as_the_cpu_kernel(fused, monkeypatch):
    """On CUDA the wrapper composes (accumulate_) select and sgd_update_, or with
    FUSED_SGD_CUDA runs the CUDA kernel: the CPU kernel's result."""
    monkeypatch.setattr(ops, "FUSED_SGD_CUDA", fused)
    sizes = [3 * BLOCK, 700]
    for residual in (False, True):
        x = make(sizes, torch.float32, "student_t", seed=9, residual=residual)
        on_gpu = {key: [t.cuda() for t in ts] for key, ts in clone(x).items()}
        ks = ks_of(sizes, [0.05, 0.05])
        run(x, ks, **HYPERS["nesterov"])
        run(on_gpu, ks, **HYPERS["nesterov"])
        for key in ("params", "bufs", "r"):
            for cpu, gpu in zip(x[key], on_gpu[key]):
                torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_cuda_optimizer_kernel_as_composed(select, monkeypatch):
    """incrkern.optim.SGD on a GPU with FUSED_SGD_CUDA (the kernel) and without (select
    then sgd_update_): the same params and state over three steps, bit for bit."""
    start, grads = hot_rows_steps(torch.float32)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(ops, "FUSED_SGD_CUDA", fused)
        params = [nn.Parameter(p.cuda()) for p in start]
        opt = incrkern.optim.SGD(params, lr=0.01, momentum=0.9, density=0.05, select=select)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.cuda()
            opt.step()
        results.append((params, opt))
    (p0, o0), (p1, o1) = results
    for a, b in zip(p0, p1):
        assert same(a.detach().cpu(), b.detach().cpu())
        for key in o0.state[a]:
            assert same(o0.state[a][key].cpu(), o1.state[b][key].cpu()), key


# ----------------------------------------------------------------------------------
# the optimizer


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.003, 0.03, 0.1, 0.5, 0.95])
@pytest.mark.parametrize("options", [dict(momentum=0.9, nesterov=True, weight_decay=0.1),
                                     dict(momentum=0.0, maximize=True),
                                     dict(momentum=0.5, dampening=0.2, topk="approx"),
                                     dict(momentum=0.9, select="accumulated"),
                                     dict(momentum=0.9, accumulate_steps=2)])
def test_optimizer_route_matches_the_composed_one(dtype, density, options, monkeypatch):
    """An SGD step on the CPU by |grad|, with error feedback or accumulate_steps takes
    ops.sgd_select_update_; the same steps with select then sgd_update_ (by positions,
    or by select_mask's masks from MASK_DENSITY on: FUSED_SGD_DENSITY 2) leave the same
    params and state, bit for bit, on tensors past one block (one an embedding's
    gradient of hot rows) and small ones, from the buffers' first step on."""
    from incrkern.optim import base, fast_step
    monkeypatch.setattr(fast_step, "ENABLED", False)  # test_fast_step_sgd holds it to this
    start, grads = hot_rows_steps(dtype)
    calls, results = [], []
    for name in ("sgd_select_update_", "sgd_update_"):
        monkeypatch.setattr(ops, name, lambda *a, _name=name, _real=getattr(ops, name), **k:
                            calls.append(_name) or _real(*a, **k))
    for fused in (True, False):
        calls.clear()
        monkeypatch.setattr(base, "FUSED_SGD_DENSITY", 0.0 if fused else 2.0)
        params = [nn.Parameter(p.clone()) for p in start]
        opt = incrkern.optim.SGD(params, lr=0.01, density=density, **options)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        updates = len(grads) // options.get("accumulate_steps", 1)
        assert calls == ["sgd_select_update_" if fused else "sgd_update_"] * updates
        results.append((params, opt))
    (p0, o0), (p1, o1) = results
    for a, b in zip(p0, p1):
        assert same(a.detach(), b.detach())
        s0, s1 = o0.state[a], o1.state[b]
        assert set(s0) == set(s1)
        for key in s0:  # the momentum buffer, the residual or grad_acc
            assert same(s0[key], s1[key]), key
