"""incrkern.ops.adam_select_update_(score="grad_sq"): select by given scores (the
optimizer's Fisher) and Adam update by the gradient in one call, against
reference.select(scores, score="grad_sq") then reference.adam_update_ (the checks of
test_fused.py): the chosen set exactly, the scores only read, everything unchosen
bit-identical; the threshold stream (with its k-th among zeros), the positions below
it and the fallback; bad input refused before anything is written."""
import math

import pytest
import torch

from incrkern import EXTENSION_LOADED, ops
from test_fused import (BLOCK, HYPERS, SMALL, check, clone, grads_of, ks_for, make, same)

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="extension not built")


def run_grad_sq(x, ks, approx=False, **hyper):
    before = [s.clone() for s in x["scores"]]
    counts = ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"], ks,
                                     approx=approx, score="grad_sq", scores=x["scores"],
                                     **hyper)
    assert all(same(a, b) for a, b in zip(x["scores"], before)), "scores written"
    return counts


def make_grad_sq(sizes, dtype, kind="normal", seed=0):
    """make()'s tensors with scores (fp32, fp64 for fp64 params) of the given structure
    (grads_of's kinds), squared as a Fisher is: never negative, a NaN keeping its sign,
    zeros where the structure has them."""
    x = make(sizes, dtype, "normal", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x["scores"] = [grads_of(kind, n, gen).to(ops.math_dtype(dtype)).square() for n in sizes]
    return x


def check_grad_sq(x, ks, approx=False, **hyper):
    return check(x, ks, approx=approx, kernel=run_grad_sq, score="grad_sq", **hyper)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "student_t", "sparse", "zeros", "ties", "special"])
def test_small_tensors(dtype, kind):
    for n in SMALL:
        for k in ks_for(n) + [n // 2, math.ceil(0.3 * n)]:
            check_grad_sq(make_grad_sq([n], dtype, kind, seed=n + k), [min(k, n)],
                          **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "rows", "sparse", "zeros"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.97])
def test_large_tensor(dtype, kind, density):
    """Past one block: the threshold stream over every thread from the stream density
    on (its counting pass and its loop read the scores; a k-th among zeros, "sparse"
    and "zeros", counts them), select's positions below it."""
    n = 3 * BLOCK + 5
    k = math.ceil(density * n)
    check_grad_sq(make_grad_sq([n], dtype, kind, seed=int(density * 1000)), [k],
                  **HYPERS["adam"])


@needs_ext
@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK + 3])
@pytest.mark.parametrize("density", [0.05, 0.5])
@pytest.mark.parametrize("kind", ["student_t", "sparse"])
def test_block_edges(n, density, kind):
    check_grad_sq(make_grad_sq([n], torch.float32, kind, seed=n), [math.ceil(density * n)],
                  **HYPERS["maximize"])


@needs_ext
def test_many_tensors_on_two_threads():
    """Small tensors side by side, one thread each, and large ones over both threads,
    in one call, at densities on both sides of the stream's."""
    sizes = [1000, BLOCK + 17, 3, 2 * BLOCK + 1, 40_000, 17]
    densities = [0.3, 0.2, 0.5, 0.01, 0.05, 1.0]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_grad_sq(make_grad_sq(sizes, torch.bfloat16, "sparse", seed=7),
                      [min(n, math.ceil(d * n)) for n, d in zip(sizes, densities)],
                      **HYPERS["adamw"])
    finally:
        torch.set_num_threads(saved)


@needs_ext
@pytest.mark.parametrize("density", [0.05, 0.4])
def test_approx(density):
    """approx=True: the count and set within the contract (exact when the band holds
    the k-th, a whole top set otherwise), as for |g|."""
    n = 2 * BLOCK + 9
    for kind in ("normal", "ties", "sparse"):
        check_grad_sq(make_grad_sq([n], torch.float32, kind, seed=3), [math.ceil(density * n)],
                      approx=True, **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("when", ["before", "after"])
def test_forced_fallback(monkeypatch, when):
    """The positional fallback, forced before the counting pass or after it (a band
    the counts refute)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    for n in (BLOCK - 5, 2 * BLOCK + 3):
        for approx in (False, True):
            check_grad_sq(make_grad_sq([n], torch.float32, "lognormal", seed=n), [n // 5],
                          approx=approx, **HYPERS["adamw"])


@needs_ext
def test_the_same_as_select_then_update():
    """Params and state bit for bit those of select(scores, score="grad_sq") then
    adam_update_ at its positions (the op's contract), on a Fisher of mostly zeros."""
    n = 2 * BLOCK + 11
    for dtype in (torch.float32, torch.bfloat16):
        for density in (0.003, 0.05, 0.6):
            x = make_grad_sq([n], dtype, "sparse", seed=5)
            composed = clone(x)
            k = math.ceil(density * n)
            assert run_grad_sq(x, [k], **HYPERS["adamw"]).tolist() == [k]
            indices = ops.select(composed["scores"], [k], score="grad_sq")
            ops.adam_update_(composed["params"], composed["grads"], composed["m"],
                             composed["v"], composed["steps"], indices=indices,
                             **HYPERS["adamw"])
            for key in ("params", "m", "v", "steps"):
                assert same(x[key][0], composed[key][0]), (dtype, density, key)


@needs_ext
def test_bad_input_touches_nothing():
    x = make_grad_sq([100, 50], torch.float32)
    before = clone(x)
    lists = (x["params"], x["grads"], x["m"], x["v"], x["steps"], [5, 5])
    r = [torch.zeros(100), torch.zeros(50)]
    cases = [
        (dict(score="grad_sq"), ValueError, "scores has 0 tensors, expected 2"),
        (dict(score="grad_sq", scores=x["scores"][:1]), ValueError,
         "scores has 1 tensors, expected 2"),
        (dict(score="grad_sq", scores=[x["scores"][0], torch.zeros(50, dtype=torch.float64)]),
         TypeError, r"scores\[1\] has dtype torch.float64"),
        (dict(score="grad_sq", scores=[x["scores"][0], torch.zeros(49)]), ValueError,
         r"scores\[1\] has 49 elements"),
        (dict(score="grad_sq", scores=[x["scores"][0], torch.zeros(100)[::2]]), ValueError,
         r"scores\[1\] must be contiguous"),
        (dict(score="grad", scores=x["scores"]), ValueError,
         "scores are for score='grad_sq' only"),
        (dict(score="random"), ValueError, "score must be 'grad', 'weight' or 'grad_sq'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ops.adam_select_update_(*lists, lr=1e-2, **kwargs)
    with pytest.raises(ValueError, match="score='grad_sq' takes no residuals"):
        ops.adam_select_update_(*lists, r, lr=1e-2, score="grad_sq", scores=x["scores"])
    args = (*lists, [], False, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, False)
    for kwargs, message in (
            (dict(score="grad_sq"), r"scores must hold one tensor per param \(2\), got 0"),
            (dict(score="grad_sq", scores=[x["scores"][0], torch.zeros(49)]),
             r"scores\[1\] must be a contiguous Float tensor of 50 elements"),
            (dict(score="grad", scores=x["scores"]), "scores are for score='grad_sq' only")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.incrkern.adam_select_update_(*args, **kwargs)
    with pytest.raises(RuntimeError, match="score='grad_sq' takes no residuals"):
        torch.ops.incrkern.adam_select_update_(*lists, r, *args[7:], score="grad_sq",
                                               scores=x["scores"])
    for key in before:
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key
    assert all(same(a, b) for a, b in zip(r, [torch.zeros(100), torch.zeros(50)]))


@needs_ext
def test_opcheck():
    x = make_grad_sq([300, 7], torch.float32)
    torch.library.opcheck(torch.ops.incrkern.adam_select_update_.default,
                          (x["params"], x["grads"], x["m"], x["v"], x["steps"], [30, 7], [],
                           False, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False),
                          dict(score="grad_sq", scores=x["scores"]))


@pytest.mark.cuda
@needs_ext
def test_cuda_composes_the_same_step():
    """On CUDA the wrapper composes select(scores, score="grad_sq") and adam_update_
    (the CUDA kernel scores |g| only): the same result as the CPU kernel."""
    x = make_grad_sq([5000, BLOCK + 3], torch.float32, "student_t", seed=11)
    on_gpu = {key: [t.cuda() for t in ts] for key, ts in clone(x).items()}
    ks = [500, (BLOCK + 3) // 3]
    run_grad_sq(x, ks, **HYPERS["adamw"])
    run_grad_sq(on_gpu, ks, **HYPERS["adamw"])
    for key in ("params", "m", "v", "steps"):
        for cpu, gpu in zip(x[key], on_gpu[key]):
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
