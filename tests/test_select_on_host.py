"""The CUDA select's passes (csrc/select/select_cuda.cu), which the select and fused
kernels run on the device, run on the host by incrkern._C.cuda_select_on_host over
the same keys, tables and digit logic (select_tables.h, radix_digits.h): exact mode
equals the reference (ties to the lowest position, all-zero tensors, NaN and inf,
edge sizes, lists per tensor and in global scope, the candidate buffer and the
groups too large for it, ties across chunks and tensors, the signed keys of topk and
error feedback's |r + alpha * g|), and approximate mode keeps its contract and
settles after one histogram where its boundary bucket allows. On a GPU,
tests/test_select_cuda.py holds the kernels themselves to the CPU's answers."""
import pytest
import torch

from helpers import assert_approx_selection, gap_scores, needs_ext
from incrkern import reference

pytestmark = needs_ext

CHUNK = 16384  # select_tables.h's kSelectChunk


def on_host(tensors, ks, global_scope=False, approx=False, signed_keys=False, residuals=None,
            alpha=1.0):
    """(positions per tensor, levels, ties, use_cands per group)."""
    from incrkern import _C
    res = None if residuals is None else list(residuals)
    return _C.cuda_select_on_host(list(tensors), list(ks), global_scope, approx, signed_keys,
                                  res, alpha)


def radix(x, k, approx=False):
    """One tensor: (positions, histogram levels run, whether a tie was located)."""
    outs, levels, ties, _ = on_host([x], [k], approx=approx)
    return outs[0], (levels[0] if levels else 0), bool(ties and ties[0])


def _scores(kind, n, gen):
    if kind == "randn":
        return torch.randn(n, generator=gen)
    if kind == "heavy":  # Cauchy-like tails: a few keys hold most of the mass
        return torch.randn(n, generator=gen) / torch.rand(n, generator=gen).clamp_min(1e-6)
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "skewed":  # mostly exact zeros, a shared value at the boundary
        x = torch.zeros(n)
        x[::1009] = torch.randn(x[::1009].numel(), generator=gen)
        x[3::4099] = 0.75
        return x
    if kind == "ties":  # a few distinct values: the k-th shared by many positions
        return torch.randint(-3, 4, (n,), generator=gen).float() * 0.5
    if kind == "nonfinite":
        x = torch.randn(n, generator=gen)
        x[::7] = float("nan")
        x[1::11] = float("inf")
        x[2::13] = -float("inf")
        x[3::17] = -0.0
        return x
    raise ValueError(kind)


KINDS = ["randn", "heavy", "zeros", "skewed", "ties", "nonfinite"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [0, 1, 2, 17, 4097, 70001, 1_000_003])
def test_exact_equals_reference(kind, n):
    gen = torch.Generator().manual_seed(n)
    x = _scores(kind, n, gen)
    ks = sorted({0, min(1, n), n // 3, n // 100, max(0, n - 1), n})
    for k in ks:
        got, levels, _ = radix(x, k)
        want = reference.select([x], [k])[0]
        assert torch.equal(got, want), (kind, n, k)
        assert 0 <= levels <= 3


def test_exact_paths_are_taken():
    """Each way the exact search ends is reached: a bucket chosen whole after one
    histogram, the k-th key after all three, and the position of its last tie."""
    gen = torch.Generator().manual_seed(0)
    gap = torch.rand(100_000, generator=gen) * 1e-3
    gap[::97] = 4.0 + torch.rand(gap[::97].numel(), generator=gen)
    got, levels, tie = radix(gap, gap[::97].numel())
    assert levels == 1 and not tie
    assert torch.equal(got, torch.arange(0, 100_000, 97))

    x = torch.randn(100_000, generator=gen)
    seen = set()
    for k in range(1000, 1020):
        got, levels, tie = radix(x, k)
        assert torch.equal(got, reference.select([x], [k])[0])
        seen.add((levels, tie))
    assert (3, False) in seen

    ties = _scores("ties", 100_000, gen)
    above = int((ties.abs() > 1.0).sum())
    got, levels, tie = radix(ties, above + 5)
    assert levels == 3 and tie
    assert torch.equal(got, reference.select([ties], [above + 5])[0])


@pytest.mark.parametrize("kind", ["randn", "heavy", "skewed", "gap", "cluster"])
def test_approx_within_tolerance(kind):
    """The approximate contract (helpers.assert_approx_selection). A boundary bucket
    that misses k by little settles the search after one histogram."""
    n = 1_000_003
    gen = torch.Generator().manual_seed(1)
    if kind in ("gap", "cluster"):
        x, big = gap_scores(n, 1.0 if kind == "gap" else 0.4, gen)
    else:
        x, big = _scores(kind, n, gen), None
    raised = len(range(0, n, 97))  # gap_scores' raised scores
    for k in (1, 1000, raised, raised + 50, n // 10, n // 2):
        got, levels, _ = radix(x, k, True)
        assert_approx_selection(got, x, k)
        if big is not None and k in (raised, raised + 50):
            assert torch.equal(got, big), (kind, k)
            assert levels == 1, (kind, k)


def test_approx_stops_early_on_real_shapes():
    """On a normal gradient at density 0.1 the second histogram's 22-bit bucket is
    within the tolerance: the search stops before the third."""
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(2))
    got, levels, tie = radix(x, 100_000, True)
    assert levels == 2 and not tie
    assert abs(got.numel() - 100_000) <= 1000


def _mixed_list(kind, gen):
    """Tensors on either side of a chunk's edge, one tiny, one empty."""
    sizes = [CHUNK + 1, 3, 0, CHUNK, 70_001, 1, CHUNK - 1]
    return [_scores(kind, n, gen) for n in sizes]


@pytest.mark.parametrize("kind", KINDS)
def test_lists_per_tensor_equal_reference(kind):
    gen = torch.Generator().manual_seed(3)
    xs = _mixed_list(kind, gen)
    for frac in (0.0, 0.001, 0.01, 0.3, 1.0):
        ks = [round(x.numel() * frac) for x in xs]
        ks[0] = max(0, xs[0].numel() - 1)  # one group a key short of all
        got, levels, _, _ = on_host(xs, ks)
        want = reference.select(xs, ks)
        assert len(levels) == sum(0 < k < x.numel() for x, k in zip(xs, ks))
        for g, w in zip(got, want):
            assert torch.equal(g, w), (kind, frac)


@pytest.mark.parametrize("kind", KINDS)
def test_global_scope_equals_reference(kind):
    gen = torch.Generator().manual_seed(4)
    xs = _mixed_list(kind, gen)
    total = sum(x.numel() for x in xs)
    for k in (0, 1, total // 1000, total // 100, total // 3, total - 1, total):
        got, levels, _, _ = on_host(xs, [k], global_scope=True)
        want = reference.select(xs, [k], global_scope=True)
        assert len(levels) == (1 if 0 < k < total else 0)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (kind, k)


def test_candidate_buffer_and_groups_too_large_for_it():
    """A level-0 bucket within the group's slots (n / 16, at least 65536) is buffered
    and its last histogram counted from the buffer; a bucket larger (2^21 equal keys
    but for a few) is counted from the input again. Both in one call, each exact."""
    gen = torch.Generator().manual_seed(5)
    spread = torch.randn(300_000, generator=gen)
    flat = torch.full((1 << 21,), 0.5)
    flat[::4099] = 0.5 + torch.rand(flat[::4099].numel(), generator=gen) * 1e-6
    xs, ks = [spread, flat], [2997, 1000]  # 2997: the third histogram runs
    got, levels, ties, use_cands = on_host(xs, ks)
    assert use_cands == [1, 0]
    assert levels == [3, 3] and ties[1] == 1
    for g, w in zip(got, reference.select(xs, ks)):
        assert torch.equal(g, w)


def test_tie_located_in_a_later_tensor_and_chunk():
    """Global scope: the k-th key is shared by elements of every tensor, and the last
    tie taken lies in the third tensor's second chunk."""
    xs = [torch.full((CHUNK + 100,), 0.25) for _ in range(4)]
    for i, x in enumerate(xs):
        x[::31] = 2.0 + i
    above = sum(int((x > 0.25).sum()) for x in xs)
    ties_before = sum(int((x == 0.25).sum()) for x in xs[:2])
    k = above + ties_before + int((xs[2][:CHUNK + 50] == 0.25).sum())  # its second chunk
    got, levels, ties, _ = on_host(xs, [k], global_scope=True)
    assert ties == [1]
    want = reference.select(xs, [k], global_scope=True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    last_tie = want[2][xs[2][want[2]] == 0.25].max()
    assert int(last_tie) == CHUNK + 49
    assert torch.equal(want[3], torch.arange(0, CHUNK + 100, 31))


@pytest.mark.parametrize("kind", KINDS)
def test_signed_keys_equal_reference_topk(kind):
    """torch.ops.incrkern.topk on CUDA: keys of the signed value."""
    gen = torch.Generator().manual_seed(6)
    x = _scores(kind, 70_001, gen)
    for k in (1, 70, 7000, 35_000, 70_000):
        got, _, _, _ = on_host([x], [k], signed_keys=True)
        assert torch.equal(got[0], reference.topk(x, k)), (kind, k)


@pytest.mark.parametrize("global_scope", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 1.0 / 1024])
def test_accumulated_keys_equal_reference(global_scope, alpha):
    """Error feedback's keys, |r + alpha * g| (alpha: accumulate_'s 1, or the unscale
    of a mixed-precision step), with residuals that cancel the gradient in places."""
    gen = torch.Generator().manual_seed(8)
    gs = [_scores(kind, n, gen) for kind, n in (("heavy", CHUNK * 2 + 7), ("skewed", 70_001),
                                                 ("ties", 5))]
    rs = [torch.randn(g.numel(), generator=gen) * 0.1 for g in gs]
    rs[1][::3] = -gs[1][::3] * alpha  # r + alpha * g = 0 there
    scaled = [g * alpha for g in gs]  # the reference adds g * alpha, rounded as the kernels do
    ks = [[sum(g.numel() for g in gs) // 50]] if global_scope else [[700, 701, 2]]
    got, _, _, _ = on_host(gs, ks[0], global_scope=global_scope, residuals=rs, alpha=alpha)
    want = reference.select(scaled, ks[0], score="accumulated", global_scope=global_scope,
                            residuals=rs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("global_scope", [False, True])
def test_approx_lists_within_tolerance(global_scope):
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, generator=gen) / torch.rand(n, generator=gen).add(0.05)
          for n in (CHUNK * 3 + 5, 200_000, 9)]
    if global_scope:
        got, _, _, _ = on_host(xs, [4000], global_scope=True, approx=True)
        assert_approx_selection(torch.cat([g + sum(x.numel() for x in xs[:i])
                                           for i, g in enumerate(got)]), torch.cat(xs), 4000)
    else:
        ks = [500, 2000, 4]
        got, _, _, _ = on_host(xs, ks, approx=True)
        for g, x, k in zip(got, xs, ks):
            assert_approx_selection(g, x, k)


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match=r"tensors\[0\] must be a contiguous 1-D float32"):
        radix(torch.zeros(4, dtype=torch.float64), 1)
    with pytest.raises(RuntimeError, match=r"ks\[0\] must lie in"):
        radix(torch.zeros(4), 5)
    with pytest.raises(RuntimeError, match="ks must hold 1 values"):
        on_host([torch.zeros(4), torch.zeros(3)], [1, 1], global_scope=True)
    with pytest.raises(RuntimeError, match=r"residuals\[0\] must have tensors\[0\]'s size"):
        on_host([torch.zeros(4)], [1], residuals=[torch.zeros(3)])
