"""incrkern.ops.sgd_select_update_: per tensor the k largest |g| updated by SGD in one
call, against reference.select then reference.sgd_update_ (the chosen set exactly, the
params and momentum buffers to fp32 rounding, everything unchosen bit-identical, the
grads only read) and bit for bit against ops.select then ops.sgd_update_ (the op's
contract): the threshold stream (a k-th among zeros included), select's positions
below it and the fallback, every SGD option, mixed precision, bad input refused before
anything is written; and the optimizer's SGD step through it against the composed
route it replaces."""
import math

import pytest
import torch
from torch import nn

from helpers import hot_rows_steps
from incrkern import EXTENSION_LOADED, ops, reference
from test_fused import (BLOCK, SMALL, TILE_MAX, assert_close_nan, clone, grads_of, ks_for,
                        ks_of, same)

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="extension not built")

HYPERS = {
    "momentum": dict(lr=1e-2, momentum=0.9),
    "nesterov": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "dampening": dict(lr=3e-3, momentum=0.5, dampening=0.3, maximize=True, weight_decay=0.01),
    "plain": dict(lr=1e-2, weight_decay=0.1),  # no momentum: no buffers
}


def make(sizes, dtype, kind="normal", seed=0, buffers=True):
    """Params, gradients of grads_of's kind and (buffers) momentum buffers, nonzero so
    that every chosen element's buffer changes."""
    gen = torch.Generator().manual_seed(seed)
    x = dict(params=[], grads=[], bufs=[])
    for n in sizes:
        x["params"].append(torch.randn(n, generator=gen).to(dtype))
        x["grads"].append(grads_of(kind, n, gen).to(dtype))
        if buffers:
            x["bufs"].append((torch.randn(n, generator=gen) * 0.1).to(ops.math_dtype(dtype)))
    return x


def full(hyper):
    """The hyperparameters with sgd_update_'s defaults filled in (the reference's)."""
    return dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False), **hyper)


def run(x, ks, approx=False, first=None, **hyper):
    return ops.sgd_select_update_(x["params"], x["grads"], x["bufs"], ks, approx=approx,
                                  first_step=first, **hyper)


def check(x, ks, approx=False, first=None, **hyper):
    """The op on x, reference.sgd_update_ on a copy at the reference's exact set (approx,
    when the count is not k: at the set the op chose, which must be a whole top set);
    returns the counts."""
    hyper = full(hyper)
    assert hyper["momentum"] == 0 or x["bufs"], "momentum needs buffers"
    before = clone(x)
    counts = run(x, ks, approx, first, **hyper)
    assert counts.dtype == torch.int64 and counts.shape == (len(ks),)
    exact = reference.select(before["grads"], ks, "grad")
    keys = reference.select_scores(before["grads"], "grad")
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
    reference.sgd_update_(ref["params"], ref["grads"], ref["bufs"], indices,
                          first_step=first or (), **hyper)
    for i in range(len(ks)):
        unchosen = torch.ones(x["params"][i].numel(), dtype=torch.bool)
        unchosen[indices[i]] = False
        assert same(x["params"][i][unchosen], before["params"][i][unchosen]), "param moved"
        assert_close_nan(x["params"][i], ref["params"][i], before["params"][i])
        if x["bufs"]:
            assert same(x["bufs"][i][unchosen], before["bufs"][i][unchosen]), "buffer moved"
            assert_close_nan(x["bufs"][i], ref["bufs"][i])
        assert same(x["grads"][i], before["grads"][i]), "grads written"
    return counts


def same_elements(a, b):
    return (a == b) | (a.isnan() & b.isnan())


# ----------------------------------------------------------------------------------
# against the reference


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "student_t", "sparse", "zeros", "ties", "special"])
def test_small_tensors(dtype, kind):
    for n in SMALL:
        for k in ks_for(n) + [n // 2, math.ceil(0.3 * n)]:
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
def test_many_tensors_on_two_threads():
    """One-thread tensors side by side and large ones over both threads, in one call,
    at densities on both sides of the stream's."""
    sizes = [1000, BLOCK + 17, 3, 2 * BLOCK + 1, 40_000, 17, TILE_MAX + 1]
    densities = [0.3, 0.2, 0.5, 0.01, 0.05, 1.0, 0.1]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(make(sizes, torch.bfloat16, "sparse", seed=7), ks_of(sizes, densities),
              **HYPERS["momentum"])
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
    """The positional fallback, forced before the counting pass or after it (a band
    the counts refute)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    for n in (BLOCK - 5, 2 * BLOCK + 3):
        for approx in (False, True):
            check(make([n], torch.float32, "lognormal", seed=n), [n // 5], approx=approx,
                  **HYPERS["nesterov"])


@needs_ext
def test_mixed_precision_and_lr_tensor():
    """grad_scale and GradScaler's scale (a power of two: |g| orders as |g / scale|),
    lr as a tensor; a nonzero found_inf changes nothing and counts 0."""
    sizes = [2 * BLOCK + 1, 500]
    for density in (0.005, 0.2):
        x = make(sizes, torch.float32, "normal", seed=11)
        composed = clone(x)
        ks = ks_of(sizes, [density] * 2)
        amp = dict(amp_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
        hyper = dict(HYPERS["nesterov"], lr=0.0, lr_tensor=torch.tensor(0.05), grad_scale=0.5)
        assert run(x, ks, **amp, **hyper).tolist() == ks
        indices = ops.select(composed["grads"], ks, score="grad")
        ops.sgd_update_(composed["params"], composed["grads"], composed["bufs"],
                        indices=indices, **amp, **hyper)
        for key in ("params", "bufs"):
            assert all(same(a, b) for a, b in zip(x[key], composed[key])), key
    x = make(sizes, torch.float32, "normal", seed=12)
    before = clone(x)
    counts = run(x, ks_of(sizes, [0.3, 0.3]), amp_scale=torch.tensor(2.0),
                 found_inf=torch.tensor(1.0), **HYPERS["momentum"])
    assert counts.tolist() == [0, 0]
    for key in ("params", "bufs", "grads"):
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key


# ----------------------------------------------------------------------------------
# the contract: select then sgd_update_, bit for bit


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["student_t", "sparse", "ties", "special"])
def test_the_same_as_select_then_update(dtype, kind):
    sizes = [2 * BLOCK + 11, 3000, 1]
    for density in (0.003, 0.03, 0.3, 0.9):
        for first in (False, True):
            x = make(sizes, dtype, kind, seed=5)
            composed = clone(x)
            ks = ks_of(sizes, [density] * 3)
            hyper = HYPERS["nesterov"]
            assert run(x, ks, first=[first] * 3, **hyper).tolist() == ks
            indices = ops.select(composed["grads"], ks, score="grad")
            ops.sgd_update_(composed["params"], composed["grads"], composed["bufs"],
                            indices=indices, first_step=[first] * 3, **hyper)
            for key in ("params", "bufs"):
                for a, b in zip(x[key], composed[key]):
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
    ]
    for change, error, message in cases:
        args = dict(params=x["params"], grads=x["grads"], bufs=x["bufs"], ks=[5, 5], **hyper)
        args.update(change)
        with pytest.raises(error, match=message):
            ops.sgd_select_update_(args.pop("params"), args.pop("grads"), args.pop("bufs"),
                                   args.pop("ks"), **args)
    # The kernel's own checks, past the wrapper.
    op = torch.ops.incrkern.sgd_select_update_
    base = (x["params"], x["grads"], x["bufs"], [5, 5], [False, False], False, 1e-2, 0.9,
            0.0, 0.0, False, False)
    for args, message in (
            ((*base[:3], [5, 51], *base[4:]), r"ks\[1\] must be in \[0, 50\], got 51"),
            ((*base[:3], [5], *base[4:]), "ks has 1 entries, expected 2"),
            ((x["params"], [x["grads"][0], x["grads"][1].double()], *base[2:]),
             r"grads\[1\] has dtype Double, expected"),
            ((*base[:2], x["bufs"][:1], *base[3:]), "momentum_buffers has 1 tensors"),
            ((*base[:4], [True], *base[5:]), "first_step has 1 entries, expected 2")):
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    for key in ("params", "grads", "bufs"):
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key


@needs_ext
def test_opcheck():
    x = make([1000, 3], torch.float32)
    torch.library.opcheck(torch.ops.incrkern.sgd_select_update_,
                          (x["params"], x["grads"], x["bufs"], [10, 1], [False, True], False,
                           1e-2, 0.9, 0.0, 0.0, False, False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_composes_select_and_update():
    """On CUDA the wrapper composes select and sgd_update_: the CPU kernel's result."""
    x = make([3 * BLOCK, 700], torch.float32, "student_t", seed=9)
    on_gpu = {key: [t.cuda() for t in ts] for key, ts in clone(x).items()}
    ks = ks_of([3 * BLOCK, 700], [0.05, 0.05])
    run(x, ks, **HYPERS["nesterov"])
    run(on_gpu, ks, **HYPERS["nesterov"])
    for key in ("params", "bufs"):
        for cpu, gpu in zip(x[key], on_gpu[key]):
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------
# the optimizer


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.003, 0.03, 0.1, 0.5, 0.95])
@pytest.mark.parametrize("options", [dict(momentum=0.9, nesterov=True, weight_decay=0.1),
                                     dict(momentum=0.0, maximize=True),
                                     dict(momentum=0.5, dampening=0.2, topk="approx")])
def test_optimizer_route_matches_the_composed_one(dtype, density, options, monkeypatch):
    """An SGD step with select="grad" on the CPU takes ops.sgd_select_update_; the
    same steps with select then sgd_update_ (by positions, or by select_mask's masks
    from MASK_DENSITY on: FUSED_SGD_DENSITY 2) leave the same params and buffers, bit
    for bit, on tensors past one block (one an embedding's gradient of hot rows) and
    small ones, from the buffers' first step on."""
    from incrkern.optim import base
    import incrkern
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
        assert calls == ["sgd_select_update_" if fused else "sgd_update_"] * 3
        results.append((params, opt))
    (p0, o0), (p1, o1) = results
    for a, b in zip(p0, p1):
        assert same(a.detach(), b.detach())
        s0, s1 = o0.state[a], o1.state[b]
        assert set(s0) == set(s1)
        if "momentum_buffer" in s0:
            assert same(s0["momentum_buffer"], s1["momentum_buffer"])
