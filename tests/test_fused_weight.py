"""incrkern.ops.adam_select_update_(score="weight"): select by |param| and Adam update
in one call, against reference.select(score="weight") then reference.adam_update_ (the
checks of test_fused.py): the chosen set exactly, each param's score read before its
update, everything unchosen bit-identical; the threshold stream, the positions below
it and the fallback; bad input refused before anything is written."""
import math

import pytest
import torch

from incrkern import EXTENSION_LOADED, ops
from test_fused import (BLOCK, HYPERS, TILE_MAX, changed_set, check, check_cuda_like_cpu,
                        check_on_threads, clone, grads_of, ks_of, make, reference_indices, same,
                        small_cases)

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="extension not built")


def run_weight(x, ks, approx=False, **hyper):
    return ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"], ks,
                                   approx=approx, score="weight", **hyper)


def make_weight(sizes, dtype, kind="normal", seed=0):
    """make()'s tensors with params of the given structure (grads_of's kinds): the
    params are the scores here."""
    x = make(sizes, dtype, "normal", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x["params"] = [grads_of(kind, n, gen).to(dtype) for n in sizes]
    return x


def check_weight(x, ks, approx=False, **hyper):
    return check(x, ks, approx=approx, kernel=run_weight, score="weight", **hyper)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "student_t", "sparse", "zeros", "ties", "special"])
def test_small_tensors(dtype, kind):
    for n, k in small_cases():
        check_weight(make_weight([n], dtype, kind, seed=n + k), [min(k, n)],
                     **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "rows"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.97])
def test_large_tensor(dtype, kind, density):
    """Past one block: the threshold stream over every thread from the stream density
    on (its counting pass and its loop read |p|), select's positions below it."""
    n = 3 * BLOCK + 5
    k = math.ceil(density * n)
    check_weight(make_weight([n], dtype, kind, seed=int(density * 1000)), [k],
                 **HYPERS["adam"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "student_t", "ties", "rows", "special"])
@pytest.mark.parametrize("density", [0.0005, 0.003, 0.02])
@pytest.mark.parametrize("approx", [False, True])
def test_listed_below_the_stream(dtype, kind, density, approx):
    """Past the one-thread limits, below |g|'s stream densities: |g|'s tile lists with
    the listing pass reading p, over both threads."""
    n = TILE_MAX + 37
    check_on_threads(2, make_weight([n, 5000], dtype, kind, seed=int(density * 1e4)),
                     [math.ceil(density * n), 50], approx=approx, kernel=run_weight,
                     score="weight")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["zeros", "sparse"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.97])
@pytest.mark.parametrize("n", [3 * BLOCK + 5, TILE_MAX + 37])
def test_large_mostly_zero_params(dtype, kind, density, n):
    """Params of zeros (a LoRA factor's start) or 99% zeros past one block: the k-th
    key is 0 and its ties go lowest positions first. The chosen set is the reference's;
    params and state are bit for bit those of select(score="weight") then adam_update_
    at its positions, the op's contract. (Against reference.adam_update_, a param that
    starts at 0 has no magnitude to absorb the reference's other rounding of m where
    its update cancels: in these inputs 11 of 786K bf16 elements came out an ulp apart,
    one of them past the tolerance, which allows for the param's own magnitude.) Past
    2^20 elements below the stream, the nonzero tiles listed."""
    k = math.ceil(density * n)
    x = make_weight([n], dtype, kind, seed=int(density * 1000))
    before, composed = clone(x), clone(x)
    counts = run_weight(x, [k], **HYPERS["adam"])
    assert counts.tolist() == [k]
    exact = reference_indices(before, [k], "weight")[0]
    assert torch.equal(changed_set(before, x, 0), exact)
    indices = ops.select(composed["grads"], [k], score="weight", weights=composed["params"])
    ops.adam_update_(composed["params"], composed["grads"], composed["m"], composed["v"],
                     composed["steps"], indices=indices, increment_steps=False,
                     **HYPERS["adam"])
    for key in ("params", "m", "v", "grads", "steps"):
        assert same(x[key][0], composed[key][0]), key


@needs_ext
@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK + 3])
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_block_edges(n, density):
    check_weight(make_weight([n], torch.float32, "student_t", seed=n), [math.ceil(density * n)],
                 **HYPERS["maximize"])


@needs_ext
def test_many_tensors_on_two_threads():
    """Small tensors side by side, one thread each, and large ones over both threads,
    in one call, at densities on both sides of the stream's."""
    sizes = [1000, BLOCK + 17, 3, 2 * BLOCK + 1, 40_000, 17]
    densities = [0.3, 0.2, 0.5, 0.01, 0.05, 1.0]
    check_on_threads(2, make_weight(sizes, torch.bfloat16, "normal", seed=7),
                     ks_of(sizes, densities), kernel=run_weight, score="weight")


@needs_ext
@pytest.mark.parametrize("density", [0.05, 0.4])
def test_approx(density):
    """approx=True: the count and set within the contract (exact when the band holds
    the k-th, a whole top set otherwise), as for |g|."""
    n = 2 * BLOCK + 9
    for kind in ("normal", "ties"):
        check_weight(make_weight([n], torch.float32, kind, seed=3), [math.ceil(density * n)],
                     approx=True, **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("when", ["before", "after"])
def test_forced_fallback(monkeypatch, when):
    """The positional fallback, forced before the counting pass or after it (a band
    the counts refute)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    for n, k in ((BLOCK - 5, (BLOCK - 5) // 5), (2 * BLOCK + 3, (2 * BLOCK + 3) // 5),
                 (TILE_MAX + 37, 3000)):
        for approx in (False, True):
            check_weight(make_weight([n], torch.float32, "lognormal", seed=n), [k],
                         approx=approx, **HYPERS["adamw"])


@needs_ext
def test_bad_score_touches_nothing():
    x = make_weight([100, 50], torch.float32)
    before = clone(x)
    with pytest.raises(ValueError, match="score must be 'grad', 'weight', 'grad_sq' or"):
        ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"], [5, 5],
                                lr=1e-2, score="layer")
    r = [torch.zeros(100), torch.zeros(50)]
    with pytest.raises(ValueError, match="score='weight' takes no residuals"):
        ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"], [5, 5],
                                r, lr=1e-2, score="weight")
    for bad, residuals, message in (("layer", [], "score must be 'grad', 'weight', 'grad_sq'"),
                                    ("weight", r, "takes no residuals")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.incrkern.adam_select_update_(
                x["params"], x["grads"], x["m"], x["v"], x["steps"], [5, 5], residuals, False,
                1e-2, 0.9, 0.999, 1e-8, 0.0, False, False, score=bad)
    for key in before:
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key
    assert all(same(a, b) for a, b in zip(r, [torch.zeros(100), torch.zeros(50)]))


@needs_ext
def test_opcheck():
    x = make_weight([300, 7], torch.float32)
    torch.library.opcheck(torch.ops.incrkern.adam_select_update_.default,
                          (x["params"], x["grads"], x["m"], x["v"], x["steps"], [30, 7], [],
                           False, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False),
                          dict(score="weight"))


@pytest.mark.cuda
@needs_ext
def test_cuda_composes_the_same_step():
    """On CUDA the wrapper composes select(score="weight") and adam_update_ (the CUDA
    kernel scores |g| only, and refuses "weight" by name): the same result as the CPU
    kernel."""
    x = make_weight([5000, BLOCK + 3], torch.float32, "student_t", seed=11)
    ks = [500, (BLOCK + 3) // 3]
    on_gpu = check_cuda_like_cpu(x, ks, run_weight)
    with pytest.raises(RuntimeError, match="CPU kernel only"):
        torch.ops.incrkern.adam_select_update_(
            on_gpu["params"], on_gpu["grads"], on_gpu["m"], on_gpu["v"], on_gpu["steps"], ks,
            [], False, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, False, score="weight")
