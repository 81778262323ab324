"""The CUDA select kernels against the CPU ones (the same keys, so the same
elements): ties spread over many chunks and tensors, all-zero and skewed tensors
(one histogram bin takes nearly every key), approximate mode's tolerance, and the
outputs as views of one flat tensor."""
import pytest
import torch

from incrkern import ops

from helpers import assert_approx_selection, gap_scores

pytestmark = pytest.mark.cuda


def _same(cpu_out, cuda_out):
    return all(torch.equal(a, b.cpu()) for a, b in zip(cpu_out, cuda_out))


def _skewed(sizes):
    """Mostly zeros (one bin holds almost every key), a few values, and ties at the
    boundary: the k-th key shared across chunks and tensors."""
    ts = []
    for i, n in enumerate(sizes):
        t = torch.zeros(n)
        t[i::1009] = torch.randn(t[i::1009].numel())
        t[3::4099] = 0.75
        ts.append(t)
    return ts


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_skewed_and_all_zero_match_cpu(scope, dtype):
    sizes = (200001, 65536, 3, 0, 131073, 70000)
    ts = [t.to(dtype) for t in _skewed(sizes)]
    ts.append(torch.zeros(300007, dtype=dtype))  # all zero: every key one bin
    total = sum(t.numel() for t in ts)
    for k in (1, 150, 400, total // 100, total // 2, total - 1):
        ks = k if scope == "global" else [min(k, t.numel()) for t in ts]
        a = ops.select(ts, ks, scope=scope)
        b = ops.select([t.cuda() for t in ts], ks, scope=scope)
        assert _same(a, b), (scope, k)
        for t in ts[-1:]:
            kk = min(k, t.numel())
            assert torch.equal(ops.topk(t.cuda(), kk).cpu(), torch.arange(kk))


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_ties_across_chunks_match_cpu(scope):
    # The k-th value shared by every fifth element of tensors spanning several
    # chunks: the last tie taken is located across chunks and tensors.
    ts = []
    for n in (300000, 65537, 190001):
        t = torch.randn(n)
        t[::5] = 0.25
        ts.append(t)
    above = [int((t.abs() > 0.25).sum()) for t in ts]
    ties = [int((t.abs() == 0.25).sum()) for t in ts]
    for extra in (1, 7, 20000, 59999):
        ks = (sum(above) + extra if scope == "global"
              else [a + min(extra, tied) for a, tied in zip(above, ties)])
        a = ops.select(ts, ks, scope=scope)
        b = ops.select([t.cuda() for t in ts], ks, scope=scope)
        assert _same(a, b), (scope, extra)


@pytest.mark.parametrize("kind", ["randn", "skewed", "gap", "cluster"])
def test_approx_within_tolerance(kind):
    """The approximate contract (helpers.assert_approx_selection); the gap and cluster
    cases settle on their boundary bucket after one histogram."""
    n = 1_000_003
    if kind == "randn":
        x, big = torch.randn(n), None
    elif kind == "skewed":
        x, big = _skewed([n])[0], None
    else:
        x, big = gap_scores(n, 1.0 if kind == "gap" else 0.4)
    raised = len(range(0, n, 97))  # gap_scores' raised scores
    for k in (1, 1000, raised, raised + 50, n // 10, n // 2):
        got = ops.select([x.cuda()], k, approx=True)[0].cpu()
        assert_approx_selection(got, x, k)
        if big is not None and k in (raised, raised + 50):
            assert torch.equal(got, big), (kind, k)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("approx", [False, True])
def test_outputs_are_views_of_one_flat_tensor(scope, approx):
    sizes = (70001, 5, 1000, 200003)
    ts = [torch.randn(n, device="cuda") for n in sizes]
    out = ops.select(ts, 0.1, scope=scope, approx=approx)
    storages = {o.untyped_storage().data_ptr() for o in out}
    assert len(storages) == 1
    # One after the other, in list order, without overlap.
    offset = 0
    for o in out:
        assert o.is_contiguous() and o.storage_offset() == offset
        offset += o.numel()
    if not approx:
        assert _same(ops.select([t.cpu() for t in ts], 0.1, scope=scope), out)
