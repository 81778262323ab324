"""incrkern.ops.adam_select_update_ by keys that are not |g| nor |p|: score="grad_sq"
(given scores: the optimizer's Fisher) and score="random" (a hash of each index, its
seed drawn from a generator), with the Adam update by the gradient in one call,
against reference.select(..., score) then reference.adam_update_ (the checks of
test_fused.py): the chosen set exactly, the scores only read, everything unchosen
bit-identical; the threshold stream (with a k-th among zeros), the positions below it
and the fallback; bad input refused before anything is written."""
import math

import pytest
import torch

from incrkern import EXTENSION_LOADED, ops
from test_fused import (BLOCK, HYPERS, check, check_cuda_like_cpu, check_on_threads, clone,
                        drawn_seed, grads_of, ks_of, make, same, small_cases)

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="extension not built")

SCORES = ["grad_sq", "random"]


def run_keyed(x, ks, approx=False, **hyper):
    """The op by x's score: its scores (grad_sq) or its generator's seed (random)."""
    if "scores" in x:
        keys = dict(score="grad_sq", scores=x["scores"])
        before = [s.clone() for s in x["scores"]]
    else:
        keys = dict(score="random", generator=torch.Generator().manual_seed(int(x["draw"][0])))
    counts = ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"], ks,
                                     approx=approx, **keys, **hyper)
    if "scores" in x:
        assert all(same(a, b) for a, b in zip(x["scores"], before)), "scores written"
    return counts


def make_keyed(sizes, dtype, score, kind="normal", seed=0):
    """make()'s tensors and x's keys. grad_sq: scores (fp32, fp64 for fp64 params) of
    the given structure (grads_of's kinds) squared as a Fisher is (never negative, a
    NaN keeping its sign, zeros where the structure has them). random: gradients of
    that structure, and the generator seed the op's seed is drawn with."""
    if score == "random":
        x = make(sizes, dtype, kind, seed=seed)
        x["draw"] = [torch.tensor(seed + 101)]
        return x
    x = make(sizes, dtype, "normal", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x["scores"] = [grads_of(kind, n, gen).to(ops.math_dtype(dtype)).square() for n in sizes]
    return x


def check_keyed(x, ks, approx=False, **hyper):
    score = "grad_sq" if "scores" in x else "random"
    return check(x, ks, approx=approx, kernel=run_keyed, score=score, **hyper)


def test_drawn_seed_is_selects():
    """The seed the tests' reference uses is the one select draws from the generator."""
    x = make_keyed([1000], torch.float32, "random", seed=4)
    gen = torch.Generator().manual_seed(int(x["draw"][0]))
    from incrkern import reference
    expected = reference.select(x["grads"], [100], "random", seed=drawn_seed(x))
    got = ops.select(x["grads"], [100], score="random", generator=gen)
    assert torch.equal(got[0], expected[0])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "student_t", "sparse", "zeros", "ties", "special"])
@pytest.mark.parametrize("score", SCORES)
def test_small_tensors(dtype, kind, score):
    for n, k in small_cases():
        check_keyed(make_keyed([n], dtype, score, kind, seed=n + k), [min(k, n)],
                    **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "rows", "sparse", "zeros"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.97])
@pytest.mark.parametrize("score", SCORES)
def test_large_tensor(dtype, kind, density, score):
    """Past one block: the threshold stream over every thread from the stream density
    on (its counting pass and its loop read the scores, or hash the indices; a k-th
    among zero scores, "sparse" and "zeros", counts them), select's positions below
    it."""
    n = 3 * BLOCK + 5
    k = math.ceil(density * n)
    check_keyed(make_keyed([n], dtype, score, kind, seed=int(density * 1000)), [k],
                **HYPERS["adam"])


@needs_ext
@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK + 3])
@pytest.mark.parametrize("density", [0.05, 0.5])
@pytest.mark.parametrize("kind", ["student_t", "sparse"])
@pytest.mark.parametrize("score", SCORES)
def test_block_edges(n, density, kind, score):
    check_keyed(make_keyed([n], torch.float32, score, kind, seed=n), [math.ceil(density * n)],
                **HYPERS["maximize"])


@needs_ext
@pytest.mark.parametrize("score", SCORES)
def test_many_tensors_on_two_threads(score):
    """Small tensors side by side, one thread each, and large ones over both threads,
    in one call, at densities on both sides of the stream's."""
    sizes = [1000, BLOCK + 17, 3, 2 * BLOCK + 1, 40_000, 17]
    densities = [0.3, 0.2, 0.5, 0.01, 0.05, 1.0]
    check_on_threads(2, make_keyed(sizes, torch.bfloat16, score, "sparse", seed=7),
                     ks_of(sizes, densities), kernel=run_keyed, score=score)


@needs_ext
@pytest.mark.parametrize("density", [0.05, 0.4])
@pytest.mark.parametrize("score", SCORES)
def test_approx(density, score):
    """approx=True: the count and set within the contract (exact when the band holds
    the k-th, a whole top set otherwise), as for |g|."""
    n = 2 * BLOCK + 9
    for kind in ("normal", "ties", "sparse"):
        check_keyed(make_keyed([n], torch.float32, score, kind, seed=3),
                    [math.ceil(density * n)], approx=True, **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("score", SCORES)
def test_forced_fallback(monkeypatch, when, score):
    """The positional fallback, forced before the counting pass or after it (a band
    the counts refute)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    for n in (BLOCK - 5, 2 * BLOCK + 3):
        for approx in (False, True):
            check_keyed(make_keyed([n], torch.float32, score, "lognormal", seed=n), [n // 5],
                        approx=approx, **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("score", SCORES)
def test_the_same_as_select_then_update(score):
    """Params and state bit for bit those of select(..., score) then adam_update_ at
    its positions (the op's contract), on a Fisher (or gradient) of mostly zeros."""
    n = 2 * BLOCK + 11
    for dtype in (torch.float32, torch.bfloat16):
        for density in (0.003, 0.05, 0.6):
            x = make_keyed([n], dtype, score, "sparse", seed=5)
            composed = clone(x)
            k = math.ceil(density * n)
            assert run_keyed(x, [k], **HYPERS["adamw"]).tolist() == [k]
            if score == "grad_sq":
                indices = ops.select(composed["scores"], [k], score=score)
            else:
                gen = torch.Generator().manual_seed(int(x["draw"][0]))
                indices = ops.select(composed["grads"], [k], score=score, generator=gen)
            ops.adam_update_(composed["params"], composed["grads"], composed["m"],
                             composed["v"], composed["steps"], indices=indices,
                             **HYPERS["adamw"])
            for key in ("params", "m", "v", "steps"):
                assert same(x[key][0], composed[key][0]), (dtype, density, key)


@needs_ext
def test_bad_input_touches_nothing():
    x = make_keyed([100, 50], torch.float32, "grad_sq")
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
        (dict(score="random", scores=x["scores"]), ValueError,
         "scores are for score='grad_sq' only"),
        (dict(score="random", generator=7), TypeError, "generator must be a torch.Generator"),
        (dict(score="layer"), ValueError, "score must be 'grad', 'weight', 'grad_sq' or"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ops.adam_select_update_(*lists, lr=1e-2, **kwargs)
    for kwargs in (dict(score="grad_sq", scores=x["scores"]), dict(score="random")):
        with pytest.raises(ValueError, match=f"score='{kwargs['score']}' takes no residuals"):
            ops.adam_select_update_(*lists, r, lr=1e-2, **kwargs)
    args = (*lists, [], False, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, False)
    for kwargs, message in (
            (dict(score="grad_sq"), r"scores must hold one tensor per param \(2\), got 0"),
            (dict(score="grad_sq", scores=[x["scores"][0], torch.zeros(49)]),
             r"scores\[1\] must be a contiguous Float tensor of 50 elements"),
            (dict(score="grad", scores=x["scores"]), "scores are for score='grad_sq' only"),
            (dict(score="layer"), "score must be 'grad', 'weight', 'grad_sq' or 'random'")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.incrkern.adam_select_update_(*args, **kwargs)
    for kwargs in (dict(score="grad_sq", scores=x["scores"]), dict(score="random", seed=3)):
        with pytest.raises(RuntimeError, match=f"score='{kwargs['score']}' takes no residuals"):
            torch.ops.incrkern.adam_select_update_(*lists, r, *args[7:], **kwargs)
    for key in before:
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key
    assert all(same(a, b) for a, b in zip(r, [torch.zeros(100), torch.zeros(50)]))


@needs_ext
@pytest.mark.parametrize("score", SCORES)
def test_opcheck(score):
    x = make_keyed([300, 7], torch.float32, score)
    keys = dict(scores=x["scores"]) if score == "grad_sq" else dict(seed=12345)
    torch.library.opcheck(torch.ops.incrkern.adam_select_update_.default,
                          (x["params"], x["grads"], x["m"], x["v"], x["steps"], [30, 7], [],
                           False, 1e-2, 0.9, 0.999, 1e-8, 0.01, True, False),
                          dict(score=score, **keys))


@pytest.mark.cuda
@needs_ext
@pytest.mark.parametrize("score", SCORES)
def test_cuda_composes_the_same_step(score):
    """On CUDA the wrapper composes select(..., score) and adam_update_ (the CUDA
    kernel scores |g| only): the same result as the CPU kernel."""
    x = make_keyed([5000, BLOCK + 3], torch.float32, score, "student_t", seed=11)
    check_cuda_like_cpu(x, [500, (BLOCK + 3) // 3], run_keyed, keep_on_cpu=("draw",))



@needs_ext
def test_portable_loops_same_answer(tmp_path):
    """The portable loops (INCRKERN_CPU_BASELINE=1, in a child process) update the same
    elements as the vector ones: the random score's hashes, listing and marks at
    densities on both sides of the stream's, the Fisher's counting pass with its zeros
    counted."""
    from helpers import results_in_children
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_fused_keyed import make_keyed, run_keyed, HYPERS\n"
        "out = []\n"
        "for score in ('grad_sq', 'random'):\n"
        "    for kind in ('student_t', 'sparse'):\n"
        "        for density in (0.004, 0.3):\n"
        "            sizes = [700_001, 40_003]\n"
        "            x = make_keyed(sizes, torch.float32, score, kind, seed=4)\n"
        "            ks = [int(density * n) for n in sizes]\n"
        "            counts = run_keyed(x, ks, **HYPERS['adamw'])\n"
        "            assert counts.tolist() == ks, (counts, ks)\n"
        "            out.append([x[key][i] for key in ('params', 'm', 'v') for i in range(2)])\n"
        "torch.save(out, sys.argv[1])\n")
    results = results_in_children(code, ({}, {"INCRKERN_CPU_BASELINE": "1"}), tmp_path)
    assert len(results[0]) == len(results[1]) == 8
    for a, b in zip(*results):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
