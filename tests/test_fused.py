"""incrkern.ops.adam_select_update_ (select by |grad| and Adam update in one call)
against reference.select then reference.adam_update_: the chosen set exactly, params
to fp32 rounding, everything unchosen bit-identical, error feedback's residuals,
approx counts within the documented contract, bad input refused before anything is
written."""
import math
import threading

import pytest
import torch

from incrkern import EXTENSION_LOADED, ops, reference
from helpers import assert_param_close, cpu_zero_probe, results_in_children

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="extension not built")

BLOCK = 2 ** 18  # the kernel's small-tensor limit
TILE_MAX = 2 ** 20  # up to here, small too when k is at most 1/32 of the elements

HYPERS = {
    "adam": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False),
    "adamw": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "maximize": dict(lr=3e-3, weight_decay=0.0, maximize=True, beta1=0.8, beta2=0.99),
}


# ----------------------------------------------------------------------------------
# inputs


def grads_of(kind, n, gen):
    """Gradients of n elements with a given structure (fp32)."""
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "student_t":  # heavy tails: a few huge values
        z = torch.randn(n, generator=gen)
        chi = torch.randn(n, 2, generator=gen).pow(2).sum(1) / 2  # df = 2
        return z / chi.sqrt()
    if kind == "lognormal":
        sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        return sign * torch.exp(3 * torch.randn(n, generator=gen))
    if kind == "rows":  # a matrix gradient with a few hot rows
        cols = 64
        rows = max(1, n // cols)
        g = torch.randn(n, generator=gen) * 1e-3
        hot = torch.randperm(rows, generator=gen)[:max(1, rows // 50)]
        for r in hot.tolist():
            g[r * cols:(r + 1) * cols] *= 1e3
        return g
    if kind == "sparse":  # an embedding gradient: 99% exact zeros
        g = torch.zeros(n)
        nz = torch.randperm(n, generator=gen)[:max(1, n // 100)]
        g[nz] = torch.randn(nz.numel(), generator=gen)
        return g
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "ties":  # few distinct values, signed zeros among them
        return torch.tensor([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0])[
            torch.randint(0, 6, (n,), generator=gen)]
    if kind == "special":  # NaN and +-inf among normal values
        g = torch.randn(n, generator=gen)
        if n:
            where = torch.randint(0, n, (max(1, n // 1000),), generator=gen)
            g[where] = torch.tensor([math.nan, math.inf, -math.inf])[
                torch.arange(where.numel()) % 3]
        return g
    raise ValueError(kind)


def make(sizes, dtype, kind="normal", seed=0, residual=False):
    gen = torch.Generator().manual_seed(seed)
    math_dt = ops.math_dtype(dtype)
    x = dict(params=[], grads=[], m=[], v=[], r=[])
    for n in sizes:
        x["params"].append(torch.randn(n, generator=gen).to(dtype))
        x["grads"].append(grads_of(kind, n, gen).to(dtype))
        # Nonzero moments: every chosen element's exp_avg changes, which shows the set.
        x["m"].append((torch.randn(n, generator=gen) * 0.1).to(math_dt))
        x["v"].append((torch.rand(n, generator=gen) * 0.01 + 1e-4).to(math_dt))
        if residual:
            x["r"].append((torch.randn(n, generator=gen) * 0.5).to(math_dt))
    x["steps"] = [torch.tensor(3.0) for _ in sizes]
    return x


def clone(x):
    return {k: [t.clone() for t in v] for k, v in x.items()}


def run_kernel(x, ks, approx=False, **hyper):
    return ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"], ks,
                                   x["r"] or None, approx=approx, **hyper)


def drawn_seed(x):
    """The random score's seed that ops draws from a generator seeded with x["draw"]."""
    return ops._random_seed(torch.Generator().manual_seed(int(x["draw"][0])))


def reference_scores(x, score="grad"):
    """The order keys of each tensor's score (before any update)."""
    if x["r"]:
        return reference.select_scores(x["grads"], "accumulated", residuals=x["r"])
    if score == "grad_sq":
        return reference.select_scores(x["scores"], score)
    if score == "random":
        return reference.select_scores(x["grads"], score, seed=drawn_seed(x))
    return reference.select_scores(x["grads"], score, weights=x["params"])


def reference_indices(x, ks, score="grad"):
    """The exact chosen positions (before any update)."""
    if x["r"]:
        return reference.select(x["grads"], ks, "accumulated", residuals=x["r"])
    if score == "grad_sq":
        return reference.select(x["scores"], ks, score)
    if score == "random":
        return reference.select(x["grads"], ks, score, seed=drawn_seed(x))
    return reference.select(x["grads"], ks, score, weights=x["params"])


def run_reference(x, indices, **hyper):
    """reference.adam_update_ at the given positions (error feedback: the residual
    accumulated first, read as the gradient and consumed)."""
    args = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled_weight_decay=False, maximize=False)
    args.update(hyper)
    sources = x["grads"]
    if x["r"]:
        reference.accumulate_(x["r"], x["grads"], 1.0)
        sources = x["r"]
    reference.adam_update_(x["params"], sources, x["m"], x["v"], x["steps"], indices,
                           consume_grad=bool(x["r"]), **args)


# ----------------------------------------------------------------------------------
# comparisons


def same(a, b):
    """Bit-identical (NaN equal to NaN)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_close_nan(actual, expected, before=None):
    """As the update kernels' tests compare params (fp32 rounding, one final bf16/fp16
    ulp, and near a cancellation two fp32 ulps of the param before the step), NaN
    where the reference has NaN."""
    assert torch.equal(actual.isnan(), expected.isnan())
    ok = ~actual.isnan()
    assert_param_close(actual[ok], expected[ok], None if before is None else before[ok])


def changed_set(before, after, i):
    """Positions whose exp_avg or exp_avg_sq changed: the elements the kernel updated."""
    return (~((after["m"][i] == before["m"][i]) & (after["v"][i] == before["v"][i]))) \
        .nonzero().squeeze(1)


def check(x, ks, approx=False, kernel=run_kernel, score="grad", **hyper):
    """Runs the kernel on x and the reference on a copy; returns the counts."""
    before = clone(x)
    counts = kernel(x, ks, approx=approx, **hyper)
    assert counts.dtype == torch.int64 and counts.shape == (len(ks),)
    exact = reference_indices(before, ks, score)
    indices = []
    for i, k in enumerate(ks):
        got = changed_set(before, x, i)
        assert int(counts[i]) == got.numel(), (int(counts[i]), got.numel())
        if not approx or int(counts[i]) == k:
            assert torch.equal(got, exact[i]), f"tensor {i}: chosen set differs"
        else:
            # approx, the band missed k: a whole top set (all above H, or all at or above L)
            key = reference_scores(before, score)[i]
            chosen = torch.zeros(key.numel(), dtype=torch.bool)
            chosen[got] = True
            if chosen.any() and (~chosen).any():
                assert key[chosen].min() > key[~chosen].max()
        indices.append(got)
    ref = clone(before)
    run_reference(ref, indices, **hyper)
    for i in range(len(ks)):
        unchosen = torch.ones(x["params"][i].numel(), dtype=torch.bool)
        unchosen[indices[i]] = False
        assert_close_nan(x["params"][i], ref["params"][i], before["params"][i])
        for key in ("params", "m", "v"):
            assert same(x[key][i][unchosen], before[key][i][unchosen]), key
        for key in ("m", "v"):
            assert_close_nan(x[key][i], ref[key][i])
        assert same(x["grads"][i], before["grads"][i])
        if x["r"]:
            assert same(x["r"][i], ref["r"][i]), "residual"
        assert torch.equal(x["steps"][i], ref["steps"][i])
    return counts


def check_cuda_like_cpu(x, ks, kernel, keep_on_cpu=()):
    """kernel (with AdamW's hyperparameters) on x and on a CUDA copy of it (but the
    keys keep_on_cpu): the same params and state. Returns the CUDA copy."""
    on_gpu = {key: [t if key in keep_on_cpu else t.cuda() for t in ts]
              for key, ts in clone(x).items()}
    kernel(x, ks, **HYPERS["adamw"])
    kernel(on_gpu, ks, **HYPERS["adamw"])
    for key in ("params", "m", "v", "steps"):
        for cpu, gpu in zip(x[key], on_gpu[key]):
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
    return on_gpu


def ks_for(n):
    return sorted({0, min(1, n), max(0, n - 1), n, math.ceil(0.01 * n)})


# ----------------------------------------------------------------------------------
# exact mode


SMALL = [0, 1, 15, 17, 1000]


def small_cases():
    """(n, k) over the SMALL sizes: ks_for's ks, and half and 30% of n."""
    for n in SMALL:
        for k in ks_for(n) + [n // 2, math.ceil(0.3 * n)]:
            yield n, k


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "student_t", "sparse", "zeros", "ties", "special"])
def test_small_tensors(dtype, kind):
    for n in SMALL:
        for k in ks_for(n):
            check(make([n, 33], dtype, kind, seed=n + k), [k, min(33, k)], **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_many_small_tensors_in_one_call(dtype, residual):
    # A thread updates a small tensor's chosen elements once it has selected its next
    # one: the tile maxima, the threshold stream, dense and empty steps take turns.
    gen = torch.Generator().manual_seed(11)
    sizes = torch.randint(1, 20_000, (120,), generator=gen).tolist()
    densities = [0.01, 0.001, 0.05, 0.0, 1.0]
    ks = [min(n, math.ceil(densities[i % 5] * n)) for i, n in enumerate(sizes)]
    check(make(sizes, dtype, "student_t", seed=5, residual=residual), ks, **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("kind", ["normal", "lognormal", "rows", "sparse", "zeros", "ties",
                                  "special"])
@pytest.mark.parametrize("n", [BLOCK - 1, BLOCK + 3])
def test_block_edges(kind, n):
    for k in (1, n // 100, n // 20, n - 1):
        check(make([n], torch.float32, kind, seed=k), [k], **HYPERS["adam"])


@needs_ext
@pytest.mark.parametrize("dtype,kind", [
    (torch.float32, "normal"), (torch.float32, "rows"), (torch.float32, "sparse"),
    (torch.bfloat16, "lognormal"), (torch.float16, "special")])
def test_large_tensor(dtype, kind):
    n = 3_000_000
    x = make([n, 1000], dtype, kind, seed=7)
    check(x, [n // 100, 10], **HYPERS["adamw"])


def ks_of(sizes, densities):
    return [min(n, math.ceil(d * n)) for n, d in zip(sizes, densities)]


def check_on_threads(threads, x, ks, **check_args):
    """check() (with check_args: its kernel and score) with AdamW's hyperparameters on
    `threads` torch threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(x, ks, **check_args, **HYPERS["adamw"])
    finally:
        torch.set_num_threads(saved)


def check_on_two_threads(sizes, densities, dtype, kind, residual):
    check_on_threads(2, make(sizes, dtype, kind, seed=len(kind), residual=residual),
                     ks_of(sizes, densities))


# 3 * TILE_MAX - 1 is more than a quarter of the elements; the other tensors past
# TILE_MAX are not
MID_SIZES = [TILE_MAX + 5, TILE_MAX * 3 // 2 + 1, 1000, TILE_MAX + 17, 3 * TILE_MAX - 1, 3,
             TILE_MAX * 5 // 4, TILE_MAX + 1, TILE_MAX + 2]


@needs_ext
@pytest.mark.parametrize("dtype,kind", [
    (torch.float32, "normal"), (torch.float32, "rows"), (torch.float32, "sparse"),
    (torch.float32, "ties"), (torch.bfloat16, "student_t"), (torch.float64, "normal")])
@pytest.mark.parametrize("residual", [False, True])
def test_mid_tensors_side_by_side(dtype, kind, residual):
    """Tensors past TILE_MAX that hold at most half a thread's share of the call's
    elements run on one thread each, side by side with the small ones: the tile maxima
    when k is at most n / 256, else the band or the threshold stream. The largest
    tensor here holds more and runs over both threads."""
    densities = [0.001, 0.01, 0.001, 0.05, 0.001, 0.5, 0.0039, 0.0, 1.0]
    check_on_two_threads(MID_SIZES, densities, dtype, kind, residual)


@needs_ext
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("residual", [False, True])
def test_mid_tensors_side_by_side_fall_back(monkeypatch, when, residual):
    """A band that misses on a tensor that runs beside others falls back on its
    thread: select, then the positional update."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    densities = [0.01] * len(MID_SIZES)
    check_on_two_threads(MID_SIZES, densities, torch.float32, "rows", residual)


# The first tensor, of mostly exact zeros, holds more than half a thread's share of
# the call's elements, and less than 1.5 times the others' (fused_cpu.cpp,
# kOneThreadReads): on two threads it runs on one, beside the others.
ZERO_BESIDE_SIZES = [5 * BLOCK + 3, TILE_MAX, TILE_MAX - 5, 1000, 3]


def zero_beside_densities(density):
    """Densities for ZERO_BESIDE_SIZES, the mostly-zero tensor's first."""
    return [density, 0.01, 0.001, 0.01, 0.5]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("density", [0.02, 0.005, 0.003])
def test_mostly_zero_tensor_beside(dtype, residual, density):
    """An embedding-like gradient (99% exact zeros) too large for the beside rule runs
    on one thread beside the small tensors: at 0.02 its k-th key is 0 (the nonzeros
    and a prefix of zeros), at 0.005 the band, at 0.003 the tile maxima."""
    sizes = ZERO_BESIDE_SIZES
    assert 4 * sizes[0] > sum(sizes) and sizes[0] <= 1.5 * sum(sizes[1:])
    x = make(sizes, dtype, "sparse", seed=5, residual=residual)
    if residual:  # nonzero where other batches' rows were: r + g still mostly zeros
        gen = torch.Generator().manual_seed(6)
        x["r"][0] = grads_of("sparse", sizes[0], gen).to(x["r"][0].dtype)
    check_on_threads(2, x, ks_of(sizes, zero_beside_densities(density)))


@needs_ext
@pytest.mark.parametrize("density", [0.02, 0.003])
def test_mostly_zero_tensor_one_thread(density):
    """On one thread the mostly-zero tensor keeps its place among the large ones."""
    x = make(ZERO_BESIDE_SIZES, torch.float32, "sparse", seed=7)
    check_on_threads(1, x, ks_of(ZERO_BESIDE_SIZES, zero_beside_densities(density)))


@needs_ext
def test_mostly_zero_tensor_beside_falls_back(monkeypatch):
    """A band that misses on the mostly-zero tensor running beside falls back on its
    thread."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", "after")
    check_on_two_threads(ZERO_BESIDE_SIZES, zero_beside_densities(0.02), torch.float32,
                         "sparse", False)


@needs_ext
def test_listing_scan_changes_mode_within_tensor():
    """The listing pass picks its scan per chunk from the chunk before (a branch per
    tile where nearly none holds a key of the band): a tensor whose chunks go from
    dense keys to rows of an embedding and back takes both scans, and chooses what
    the reference does."""
    n = 5 * BLOCK  # past the small tensors' 2^20 elements: the listing pass
    x = make([n], torch.float32, "normal", seed=11)
    middle = x["grads"][0][BLOCK:4 * BLOCK]  # dense keys before and after it
    middle.zero_()
    gen = torch.Generator().manual_seed(12)
    for row in torch.randperm(middle.numel() // 384, generator=gen)[:9].tolist():
        middle[row * 384:(row + 1) * 384] = torch.randn(384, generator=gen)
    check(x, [n // 100], **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5])
def test_large_hyper_and_density(hyper, density):
    n = 600_003
    check(make([n], torch.float32, "student_t", seed=3), [math.ceil(density * n)],
          **HYPERS[hyper])


@needs_ext
def test_large_edge_ks():
    n = BLOCK * 3 + 5
    for k in (0, 1, n - 1, n):
        check(make([n], torch.float32, "normal", seed=k), [k], **HYPERS["adamw"])


@needs_ext
def test_block_lists_kept_between_calls():
    """The listing pass's per-block lists stay on the calling thread from call to call,
    cleared: a tensor of fewer blocks after a larger one, and a larger one again, each
    chooses what the reference does."""
    for blocks, seed in ((6, 1), (2, 2), (7, 3)):
        n = BLOCK * blocks + 7
        check(make([n], torch.float32, "rows", seed=seed), [n // 100], **HYPERS["adamw"])


@needs_ext
def test_concurrent_calls_on_large_tensors():
    """Two threads call the op at once (it runs without the GIL), each on large tensors
    of its own, of changing sizes: each calling thread keeps its own block lists."""
    errors = []

    def steps(seed):
        try:
            for blocks in (5, 2, 6):
                n = BLOCK * blocks + 3
                check(make([n], torch.float32, "rows", seed=seed + blocks), [n // 100],
                      **HYPERS["adamw"])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=steps, args=(seed,)) for seed in (1, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@needs_ext
def test_tail_candidates_chosen():
    # The 13 elements past the last whole tile, just above the k-th key: inside the
    # band, all chosen, in a tile that would reach past the tensor's end. (Past
    # TILE_MAX: a smaller tensor at this density is selected on one thread.)
    n = BLOCK * 5 + 13
    k = n // 100
    x = make([n], torch.float32, "normal", seed=4)
    g = x["grads"][0]
    kth = g.abs().topk(k).values[-1]
    g[-13:] = kth * (1 + 1e-6 * torch.arange(1, 14)) * torch.tensor([1.0, -1.0]).repeat(7)[:13]
    check(x, [k], **HYPERS["adamw"])


@needs_ext
def test_lr_tensor_and_increment_steps():
    x = make([BLOCK * 2 + 9, 100], torch.float32, seed=1)
    before = clone(x)
    lr = torch.tensor(3e-3)
    ks = [5000, 7]
    run_kernel(x, ks, lr=1.0, lr_tensor=lr, increment_steps=True)
    ref = clone(before)
    for s in ref["steps"]:
        s.fill_(4.0)
    run_reference(ref, reference_indices(before, ks), lr=3e-3)
    for key in ("params", "m", "v"):
        for a, b in zip(x[key], ref[key]):
            assert_close_nan(a, b)
    assert [float(s) for s in x["steps"]] == [4.0, 4.0]


@needs_ext
def test_step_tensor_given_for_several_params():
    """Through the op a step tensor may be shared (the optimizers refuse it): it counts
    every param before any update reads it, as adam_update_ does."""
    x = make([BLOCK * 2 + 9, 100, 33], torch.float32, seed=2)
    shared = torch.tensor(3.0)
    x["steps"] = [shared, torch.tensor(3.0), shared]
    before = clone(x)
    ks = [5000, 7, 4]
    run_kernel(x, ks, lr=1e-2, increment_steps=True)
    ref = clone(before)
    ref["steps"] = [torch.tensor(5.0), torch.tensor(4.0), torch.tensor(5.0)]
    run_reference(ref, reference_indices(before, ks), lr=1e-2)
    for key in ("params", "m", "v"):
        for a, b in zip(x[key], ref[key]):
            assert_close_nan(a, b)
    assert float(shared) == 5.0 and float(x["steps"][1]) == 4.0


@needs_ext
@pytest.mark.parametrize("n,k", [(BLOCK + 3, (BLOCK + 3) // 20),
                                 (TILE_MAX + 3, (TILE_MAX + 3) // 50)])
@pytest.mark.parametrize("when", ["before", "after"])
def test_forced_fallback(monkeypatch, n, k, when):
    """The positional fallback (select, then update at the positions), forced before
    the listing pass or after it (a band the counts refute: with a residual, the pass
    has already added the gradient to it, and the fallback must not add it twice)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    for approx in (False, True):
        check(make([n], torch.float32, "lognormal", seed=n), [k], approx=approx,
              **HYPERS["adamw"])
        check(make([n], torch.float32, "normal", seed=1, residual=True), [k],
              approx=approx, **HYPERS["adam"])
    check(make([n], torch.bfloat16, "student_t", seed=2, residual=True), [n // 7],
          **HYPERS["adamw"])


@needs_ext
def test_portable_listing_same_answer(tmp_path):
    """The portable loops (INCRKERN_CPU_BASELINE=1, in a child process) update the same
    elements as the vector ones: fp32, bf16 and fp16, exact and approx, with and
    without a residual, the threshold stream over threads and on one thread. So do
    the vector scans with and without their requests ahead (INCRKERN_SCAN_AHEAD)."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_fused import make, run_kernel, HYPERS\n"
        "out = []\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for approx in (False, True):\n"
        "        for residual in (False, True):\n"
        "            x = make([300_007, 40_001], dtype, 'student_t', seed=4,\n"
        "                     residual=residual)\n"
        "            run_kernel(x, [30_000, 4_000], approx=approx, **HYPERS['adamw'])\n"
        "            out.append([x[key][i] for key in ('params', 'm', 'v', 'r') if x[key]\n"
        "                        for i in range(2)])\n"
        "torch.save(out, sys.argv[1])\n")
    settings = ({}, {"INCRKERN_CPU_BASELINE": "1"}, {"INCRKERN_SCAN_AHEAD": "1"},
                {"INCRKERN_SCAN_AHEAD": "0"})
    results = results_in_children(code, settings, tmp_path)
    for other in results[1:]:
        assert len(results[0]) == len(other) == 12
        for a, b in zip(results[0], other):
            assert len(a) == len(b)
            assert all(torch.equal(u, v) for u, v in zip(a, b))


@needs_ext
def test_band_misses_on_ties():
    """An embedding gradient with fewer nonzeros than k: the k-th key is 0, tied by
    nearly every element (the band cannot hold it: the exact fallback answers)."""
    n = TILE_MAX + 5
    x = make([n], torch.float32, "sparse", seed=2)
    check(x, [n // 50], **HYPERS["adamw"])
    x = make([n], torch.float32, "sparse", seed=2)
    check(x, [n // 50], approx=True, **HYPERS["adamw"])


def embedding_rows(width, rows, hot_rows, dtype, seed, residual):
    """An embedding's gradient (and residual): nonzero in `hot_rows` alone, half of the
    other elements -0.0 (ties with +0.0); the residual nonzero in other rows."""
    gen = torch.Generator().manual_seed(seed)
    n = width * rows
    x = make([n], dtype, "zeros", seed=seed, residual=residual)
    g = torch.zeros(rows, width)
    g[hot_rows] = torch.randn(len(hot_rows), width, generator=gen)
    g[g == 0] = torch.where(torch.rand(int((g == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    x["grads"] = [g.reshape(n).to(dtype)]
    if residual:
        r = torch.zeros(rows, width)
        cold = torch.ones(rows, dtype=torch.bool)
        cold[hot_rows] = False
        others = cold.nonzero().squeeze(1)[:len(hot_rows)]
        r[others] = torch.randn(len(hot_rows), width, generator=gen)
        x["r"] = [r.reshape(n).to(x["m"][0].dtype)]
    return x


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
def test_zero_floor_embedding_rows(dtype, residual):
    """Fewer nonzero keys than k on a large tensor: the k-th key is 0, every nonzero is
    chosen and the zeros of lowest position complete k (a dense prefix ending inside a
    tile and inside a row, then the nonzero tiles past it, the last row's elements past
    the last whole tile among them), exact and approx alike."""
    width, rows = 37, (TILE_MAX + BLOCK) // 37 + 1   # n odd, not a multiple of 16
    gen = torch.Generator().manual_seed(1)
    hot = sorted({0, rows - 1, *torch.randperm(rows, generator=gen)[:rows // 100].tolist()})
    nonzeros = len(hot) * width * (2 if residual else 1)
    n = width * rows
    for k in (nonzeros, nonzeros + 1, nonzeros + 12_345, n // 10, n - 1):
        for approx in (False, True):
            x = embedding_rows(width, rows, hot, dtype, seed=k, residual=residual)
            counts = check(x, [k], approx=approx, **HYPERS["adamw"])
            assert int(counts[0]) == k


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("values", ["normal", "ties", "special"])
def test_among_nonzeros_embedding_rows(dtype, residual, values):
    """More nonzero keys than k on a large tensor of nearly all zeros: its nonzero
    tiles listed with no sample, and the k largest chosen among their lanes (the last
    row's elements past the last whole tile among them), ties to the lowest position
    across blocks, NaN and inf chosen first, exact and approx alike."""
    width, rows = 37, (TILE_MAX + BLOCK) // 37 + 1   # n odd, not a multiple of 16
    n = width * rows
    gen = torch.Generator().manual_seed(4)
    hot = sorted({0, rows - 1, *torch.randperm(rows, generator=gen)[:rows // 150].tolist()})
    nonzeros = len(hot) * width * (2 if residual else 1)
    # Above n / 256 (under it, a tensor this size takes the tile maxima).
    for k in (n // 250, nonzeros // 2, nonzeros - 1):
        for approx in (False, True):
            x = embedding_rows(width, rows, hot, dtype, seed=k, residual=residual)
            g = x["grads"][0].view(rows, width)
            if values == "ties":  # every hot row alike: each key tied len(hot) times
                g[hot] = g[hot[0]].clone()
            elif values == "special":
                g[hot[1], :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
            score = x["grads"][0].float() + (x["r"][0] if residual else 0)
            assert int((score[cpu_zero_probe(n)] != 0).sum()) <= 12  # the path under test
            counts = check(x, [k], approx=approx, **HYPERS["adamw"])
            assert int(counts[0]) == k


@needs_ext
def test_nonzeros_hidden_from_the_probe_fall_back():
    """Zeros on exactly the positions the zero probe reads and nonzeros everywhere
    else, so the probe takes the tensor for nearly all zeros: the listing of its
    nonzero tiles stops keeping their keys past a quarter of a block, and select then
    update answers."""
    n = TILE_MAX + BLOCK + 7
    for residual in (False, True):
        x = make([n], torch.float32, "normal", seed=8, residual=residual)
        x["grads"][0][cpu_zero_probe(n)] = 0.0
        if residual:
            x["r"][0][cpu_zero_probe(n)] = 0.0
        for k in (n // 200, n // 60):  # under the threshold stream's density
            check(clone(x), [k], **HYPERS["adamw"])


@needs_ext
def test_zero_floor_refuted_falls_back(monkeypatch):
    """The zero floor's count refuting it (forced here): select then update, the
    residual already holding r + g and not added twice."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", "after")
    rows = TILE_MAX // 64 + 3
    hot = list(range(0, rows, 97))
    for residual in (False, True):
        x = embedding_rows(64, rows, hot, torch.float32, seed=3, residual=residual)
        check(x, [64 * rows // 20], **HYPERS["adam"])


# ----------------------------------------------------------------------------------
# approx mode


@needs_ext
@pytest.mark.parametrize("kind", ["normal", "student_t", "rows", "sparse", "ties"])
def test_approx_contract(kind):
    n = TILE_MAX + 7
    for density in (0.001, 0.01, 0.2):
        k = math.ceil(density * n)
        counts = check(make([n, 500, 40_961], torch.float32, kind, seed=5), [k, 5, 8_193],
                       approx=True, **HYPERS["adamw"])
        # Small tensors are exact, by tile maxima or by the threshold stream.
        assert int(counts[1]) == 5 and int(counts[2]) == 8_193


# ----------------------------------------------------------------------------------
# the threshold stream (from a density of a few percent: run_stream)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "student_t", "rows", "lognormal", "special",
                                  "ties"])
def test_stream_one_thread(dtype, kind):
    """Tensors of up to one block at densities from 5%, side by side with a small one;
    "ties": the k-th key is shared beyond k, its lowest positions taken."""
    for n in (1000, 4099, 40_961, BLOCK - 1):
        for density in (0.05, 0.1, 0.3, 0.6):
            k = math.ceil(density * n)
            check(make([n, 100], dtype, kind, seed=n + k), [k, 10], **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties", "sparse", "special", "rows"])
def test_stream_near_every_element(dtype, kind):
    """Densities near 1: the band's lower edge past the sample's smallest key, or among
    zeros ("ties": a third of the keys 0; "sparse": 99%), so the band reaches 0 and
    its keys are every key under its top; ties at 0 taken lowest positions first. One
    block and less, a mid-sized tensor side by side with a small one, and one over
    blocks and threads."""
    for n in (1000, 40_961, BLOCK - 1, TILE_MAX - 3, TILE_MAX + 5):
        for density in (0.8, 0.95, 0.999):
            k = min(n - 1, math.ceil(density * n))
            check(make([n, 100], dtype, kind, seed=n + k), [k, 10], **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype,kind", [
    (torch.float32, "normal"), (torch.float32, "rows"), (torch.float32, "special"),
    (torch.bfloat16, "normal"), (torch.float16, "lognormal")])
def test_stream_over_blocks(dtype, kind):
    """Over several blocks and threads, and over blocks on one thread (a mid-sized
    tensor, side by side with others): bf16 normal gradients share the k-th key among
    hundreds of elements in every block, so the blocks before one take all theirs,
    that one some, the blocks after it none."""
    for n, density in ((TILE_MAX + 5, 0.03), (TILE_MAX + 5, 0.4), (3 * BLOCK + 5, 0.1)):
        check(make([n], dtype, kind, seed=int(100 * density)), [math.ceil(density * n)],
              **HYPERS["adam"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approx", [False, True])
def test_stream_error_feedback(dtype, approx):
    """u = r + g formed by the counting pass (over blocks) or first (one thread); the
    chosen residuals zeroed, the others left holding u."""
    for n in (40_961, 3 * BLOCK + 5, TILE_MAX + 5):
        for density in (0.05, 0.2, 0.9):
            check(make([n], dtype, "student_t", seed=n, residual=True),
                  [math.ceil(density * n)], approx=approx, **HYPERS["adamw"])


# ----------------------------------------------------------------------------------
# error feedback


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_error_feedback_small(dtype):
    for n in SMALL:
        for k in ks_for(n):
            check(make([n], dtype, "normal", seed=k, residual=True), [k], **HYPERS["adam"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("approx", [False, True])
def test_error_feedback_large(dtype, approx):
    # float64: 64-bit keys, select then update over the residual (read as float64)
    n = 600_037
    for k in (0, n // 100, n // 5, n) if approx else (1, n // 100, n // 5):
        check(make([n], dtype, "student_t", seed=k, residual=True), [k], approx=approx,
              **HYPERS["adamw"])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_feedback_zero_gradient_tiles(dtype):
    """Where g is zero, r + g is r, and the kernel leaves such tiles unwritten: every
    residual bit is still torch's r + g, -0.0 + 0.0 = 0.0 included, on the small
    tensors' path, the listing pass and the threshold stream."""
    for n, density in ((40_961, 0.01), (TILE_MAX + 5, 0.01), (3 * BLOCK + 5, 0.2)):
        x = make([n], dtype, "sparse", seed=n, residual=True)
        r, g = x["r"][0], x["grads"][0]
        r[: n // 4: 3] = -0.0  # + 0.0 from g: stored as 0.0
        r[1: n // 4: 7] = 0.0
        r[5::1001] = math.nan
        r[6::1003] = math.inf
        half = n // 2 // 16 * 16
        g[half: half + 64] = -0.0
        r[half: half + 32] = -0.0  # -0.0 + -0.0 = -0.0: unchanged
        r[half + 32: half + 64] = 0.0  # 0.0 + -0.0 = 0.0: unchanged
        before = clone(x)
        check(x, [math.ceil(density * n)], **HYPERS["adamw"])
        expected = before["r"][0] + before["grads"][0].float()
        expected[changed_set(before, x, 0)] = 0.0
        got = x["r"][0]
        assert torch.equal(got.isnan(), expected.isnan())
        ok = ~got.isnan()
        assert torch.equal(got[ok].view(torch.int32), expected[ok].view(torch.int32))


# ----------------------------------------------------------------------------------
# bad input


def _bad_calls(x):
    n = x["params"][0].numel()
    ok = dict(params=x["params"], grads=x["grads"], exp_avgs=x["m"], exp_avg_sqs=x["v"],
              steps=x["steps"], ks=[n // 10])
    yield dict(ok, ks=[n + 1]), ValueError
    yield dict(ok, ks=[1, 2]), ValueError
    yield dict(ok, grads=[x["grads"][0].double()]), TypeError
    yield dict(ok, exp_avgs=[x["m"][0][:-1]]), ValueError
    yield dict(ok, residuals=[torch.zeros(n, dtype=torch.float64)]), TypeError
    yield dict(ok, residuals=[torch.zeros(n - 1)]), ValueError


@needs_ext
@pytest.mark.parametrize("n", [100, BLOCK * 2])
def test_bad_input_touches_nothing(n):
    x = make([n], torch.float32)
    before = clone(x)
    for kwargs, exc in _bad_calls(x):
        with pytest.raises(exc):
            ops.adam_select_update_(lr=1e-2, increment_steps=True, **kwargs)
        # the compiled op's own checks, past the wrapper
        args = dict(kwargs)
        with pytest.raises(RuntimeError):
            torch.ops.incrkern.adam_select_update_(
                args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
                args["steps"], args["ks"], args.get("residuals", []), False, 1e-2, 0.9,
                0.999, 1e-8, 0.0, False, False, increment_steps=True)
        for key in before:
            for a, b in zip(x[key], before[key]):
                assert torch.equal(a, b), key


@needs_ext
def test_opcheck():
    x = make([100, 50], torch.float32, residual=True)
    torch.library.opcheck(torch.ops.incrkern.adam_select_update_.default,
                          (x["params"], x["grads"], x["m"], x["v"], x["steps"], [10, 5], x["r"],
                           False, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False),
                          dict(increment_steps=True))
