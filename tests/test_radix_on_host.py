"""The CUDA radix select's digit logic (csrc/select/radix_digits.h), which the select
and fused kernels run on the device, run on the host by incrkern._C.cuda_radix_on_host
over the same keys: exact mode equals the reference (ties to the lowest position,
all-zero tensors, NaN and inf, edge sizes), and approximate mode keeps its contract
and settles after one histogram where its boundary bucket allows. On a GPU,
tests/test_select_cuda.py holds the kernels themselves to the CPU's answers."""
import pytest
import torch

from helpers import assert_approx_selection, gap_scores, needs_ext
from incrkern import reference

pytestmark = needs_ext


def radix(x, k, approx=False):
    from incrkern import _C
    return _C.cuda_radix_on_host(x, k, approx)


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


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="scores must be a contiguous 1-D float32"):
        radix(torch.zeros(4, dtype=torch.float64), 1)
    with pytest.raises(RuntimeError, match="k must lie in"):
        radix(torch.zeros(4), 5)
