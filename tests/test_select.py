"""Tests of the select family: incrkern.ops.topk / select against torch.topk and the
pure-torch reference (exact to the element), on plain, tied and special inputs."""
import math

import pytest
import torch

from incrkern import ops, reference
from helpers import DEVICES, cpu_sample_stride, needs_ext, results_in_children


def check_against_torch(x, k, idx):
    """idx holds k ascending, distinct positions whose values are torch.topk's values."""
    assert idx.dtype == torch.int64 and idx.numel() == k
    if k > 1:
        assert bool((idx[1:] > idx[:-1]).all())
    want = torch.topk(x.reshape(-1).float(), k).values.sort().values
    got = x.reshape(-1)[idx].float().sort().values
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def ks_for(n):
    return sorted({0, 1, min(2, n), n // 3, n // 2, max(n - 1, 0), n} & set(range(n + 1)))


# ----------------------------------------------------------------------------------
# topk


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 31, 1000, 40000, 1000003])
def test_topk_random(device, n):
    x = torch.randn(n, device=device)
    for k in ks_for(n) + ([1000, 10007] if n > 20000 else []):
        idx = ops.topk(x, k)
        assert torch.equal(idx, reference.topk(x, k))
        check_against_torch(x.cpu(), k, idx.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_topk_dtypes(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only")
    x = torch.randn(300007, device=device).to(dtype)
    for k in (1, 3000, 150000):
        idx = ops.topk(x, k)
        assert torch.equal(idx, reference.topk(x, k))
        check_against_torch(x.cpu(), k, idx.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1000, 100003, 400000])
@pytest.mark.parametrize("levels", [1, 5, 30])
def test_topk_ties(device, n, levels):
    """Values drawn from a few levels: ties at the k-th, broken towards the lowest index."""
    x = torch.randint(0, levels, (n,), device=device).float()
    for k in (1, n // 7, n // 2, n - 3):
        idx = ops.topk(x, k)
        assert torch.equal(idx, reference.topk(x, k))
        check_against_torch(x.cpu(), k, idx.cpu())
        # lowest indices first among the tied k-th values
        kth = x[idx].min()
        tied = (x == kth).nonzero().squeeze(1)
        chosen_tied = idx[x[idx] == kth]
        assert torch.equal(chosen_tied, tied[:chosen_tied.numel()])


@pytest.mark.parametrize("device", DEVICES)
def test_topk_special_values(device):
    base = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"),
                         -float("nan"), 2.0, -2.0, 0.0, -0.0])
    for n in (12, 120000):
        x = base.repeat(n // 12).to(device)
        for k in range(0, 13):
            k = k * (n // 12)
            idx = ops.topk(x, k)
            assert torch.equal(idx, reference.topk(x, k))
            check_against_torch(x.cpu(), k, idx.cpu())
    # NaN ranks above +inf, -0 equals +0 (ties by index)
    x = torch.tensor([-0.0, 0.0, float("inf"), float("nan"), -1.0], device=device)
    assert ops.topk(x, 1).tolist() == [3]
    assert ops.topk(x, 2).tolist() == [2, 3]
    assert ops.topk(x, 3).tolist() == [0, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_deterministic_and_shapes(device):
    x = torch.randn(64, 1000, device=device)
    a = ops.topk(x, 5000)
    assert torch.equal(a, ops.topk(x, 5000))
    assert torch.equal(a, reference.topk(x, 5000))
    xt = x.t()  # a non-contiguous view: indices into xt.reshape(-1)
    assert torch.equal(ops.topk(xt, 777), reference.topk(xt.contiguous(), 777))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_all_equal(device):
    for n in (5, 50000, 1000003):
        x = torch.full((n,), 0.5, device=device)
        for k in (1, n // 2, n):
            assert torch.equal(ops.topk(x, k), torch.arange(k, device=device))


def test_topk_argument_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="k"):
        ops.topk(x, 11)
    with pytest.raises(ValueError, match="k"):
        ops.topk(x, -1)
    with pytest.raises(TypeError, match="k"):
        ops.topk(x, 2.0)
    with pytest.raises(TypeError, match="x"):
        ops.topk(x.int(), 2)
    with pytest.raises(TypeError, match="x"):
        ops.topk([1.0], 1)


# ----------------------------------------------------------------------------------
# select


def make_list(device, sizes=(1000, 0, 31, 200003, 5), dtype=torch.float32):
    return [torch.randn(s, device=device).to(dtype) for s in sizes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["grad", "grad_sq", "weight", "accumulated", "random"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_select_scores(device, score, scope):
    ts = make_list(device)
    if score == "grad_sq":
        ts = [t * t for t in ts]
    kwargs, ref = {}, {}
    if score == "weight":
        ws = make_list(device)
        kwargs["weights"] = ref["weights"] = ws
    if score == "accumulated":
        rs = make_list(device)
        kwargs["residual"] = ref["residuals"] = rs
    for k in ([0, 0.01, 0.5, 1.0, [3, 0, 31, 777, 2]] if scope == "tensor"
              else [0, 1, 5000, 0.3, 1.0]):
        got = ops.select(ts, k, score=score, scope=scope,
                         generator=torch.Generator().manual_seed(7), **kwargs)
        total = sum(t.numel() for t in ts)
        if scope == "global":
            ks = [min(total, math.ceil(k * total)) if isinstance(k, float) else k]
        elif isinstance(k, list):
            ks = k
        else:
            ks = [min(t.numel(), math.ceil(k * t.numel())) if isinstance(k, float) else k
                  for t in ts]
        seed = 0
        if score == "random":
            seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7)))
        want = reference.select(ts, ks, score, scope == "global", False, seed=seed, **ref)
        assert len(got) == len(ts)
        for g, w, t in zip(got, want, ts):
            assert g.device == t.device and g.dtype == torch.int64
            assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_select_global_is_topk_of_concatenation(device):
    ts = make_list(device, sizes=(1000, 70000, 3, 0, 300000))
    cat = torch.cat([t.reshape(-1) for t in ts]).abs()
    for k in (1, 37, 3700, 185000, cat.numel()):
        got = ops.select(ts, k, scope="global")
        offsets = torch.tensor([0] + [t.numel() for t in ts]).cumsum(0)
        union = torch.cat([g + int(o) for g, o in zip(got, offsets)])
        assert torch.equal(union, reference.topk(cat, k))
        check_against_torch(cat.cpu(), k, union.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_select_global_ties_by_position(device):
    ts = [torch.ones(50000, device=device), torch.ones(70000, device=device) * -1]
    got = ops.select(ts, 60000, scope="global")
    assert torch.equal(got[0], torch.arange(50000, device=device))
    assert torch.equal(got[1], torch.arange(10000, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_select_mixed_dtypes_global(device):
    ts = [torch.randn(70001, device=device), torch.randn(30000, device=device).bfloat16(),
          torch.randn(5000, device=device).half()]
    got = ops.select(ts, 0.05, scope="global")
    want = reference.select(ts, [math.ceil(0.05 * 105001)], "grad", True)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_select_random_reproducible(device):
    ts = make_list(device)
    a = ops.select(ts, 0.1, score="random", generator=torch.Generator().manual_seed(3))
    b = ops.select(ts, 0.1, score="random", generator=torch.Generator().manual_seed(3))
    c = ops.select(ts, 0.1, score="random", generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # roughly uniform: the chosen positions spread over the tensor
    big = a[3].float() / 200003
    assert 0.45 < float(big.mean()) < 0.55


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dist", ["normal", "levels", "uniform"])
def test_select_approx(device, scope, dist):
    n = 1000003
    if dist == "normal":
        x = torch.randn(n, device=device)
    elif dist == "levels":
        x = torch.randint(0, 1000, (n,), device=device).float()
    else:
        x = torch.rand(n, device=device)
    for k in (1, 10, 1000, 10000, 100000, 500000):
        got = ops.select([x], k, scope=scope, approx=True)[0]
        tol = max(1, math.ceil(ops.APPROX_COUNT_TOLERANCE * k))
        assert abs(got.numel() - k) <= tol
        assert bool((got[1:] > got[:-1]).all())
        kth = torch.topk(x.abs(), k).values[-1]
        assert float(x[got].abs().min()) >= float(kth) * (1 - ops.APPROX_VALUE_TOLERANCE)


def test_select_argument_errors():
    ts = [torch.randn(10), torch.randn(5)]
    with pytest.raises(ValueError, match="k"):
        ops.select(ts, 6)  # > numel of ts[1]
    with pytest.raises(ValueError, match="k"):
        ops.select(ts, 16, scope="global")
    with pytest.raises(ValueError, match="k"):
        ops.select(ts, -1)
    with pytest.raises(ValueError, match="k"):
        ops.select(ts, 1.5)
    with pytest.raises(ValueError, match="k"):
        ops.select(ts, 0.0)
    with pytest.raises(ValueError, match="k"):
        ops.select(ts, [1, 2, 3])
    with pytest.raises(ValueError, match=r"k\[1\]"):
        ops.select(ts, [1, 6])
    with pytest.raises(TypeError, match="k"):
        ops.select(ts, True)
    with pytest.raises(ValueError, match="score"):
        ops.select(ts, 1, score="magnitude")
    with pytest.raises(ValueError, match="scope"):
        ops.select(ts, 1, scope="layer")
    with pytest.raises(ValueError, match="residual"):
        ops.select(ts, 1, score="accumulated")
    with pytest.raises(ValueError, match="residual"):
        ops.select(ts, 1, score="accumulated", residual=[torch.zeros(10)])
    with pytest.raises(ValueError, match="residual"):
        ops.select(ts, 1, score="accumulated", residual=[torch.zeros(10), torch.zeros(4)])
    with pytest.raises(TypeError, match="residual"):
        ops.select(ts, 1, score="accumulated",
                   residual=[torch.zeros(10), torch.zeros(5, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="weights"):
        ops.select(ts, 1, score="weight")
    with pytest.raises(ValueError, match="weights"):
        ops.select(ts, 1, score="weight", weights=[torch.zeros(10), torch.zeros(6)])
    with pytest.raises(ValueError, match="weights"):
        ops.select(ts, 1, weights=[torch.zeros(10), torch.zeros(5)])
    with pytest.raises(TypeError, match="tensors"):
        ops.select([torch.zeros(3, dtype=torch.int32)], 1)
    with pytest.raises(TypeError, match="tensors"):
        ops.select(torch.zeros(3), 1)
    with pytest.raises(TypeError, match="generator"):
        ops.select(ts, 1, score="random", generator=3)
    assert ops.select([], 3) == []


@needs_ext
def test_kernel_rejects_bad_arguments_before_running():
    """The registered op checks its arguments too (it may be called directly)."""
    ts = [torch.randn(10)]
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.incrkern.select(ts, [11], "grad", False, False, [], [], 0)
    with pytest.raises(RuntimeError, match="score"):
        torch.ops.incrkern.select(ts, [1], "bogus", False, False, [], [], 0)
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.incrkern.topk(ts[0], 11)


@needs_ext
def test_opcheck():
    x = torch.randn(5000)
    torch.library.opcheck(torch.ops.incrkern.topk.default, (x, 50))
    ts = [torch.randn(3000), torch.randn(100)]
    torch.library.opcheck(torch.ops.incrkern.select.default,
                          (ts, [30, 1], "grad", False, False, [], [], 0))
    rs = [torch.randn(3000), torch.randn(100)]
    torch.library.opcheck(torch.ops.incrkern.select.default,
                          (ts, [31], "accumulated", True, False, rs, [], 0),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_positions_beyond_2_31(device):
    """Index arithmetic past 2^31 elements: one bfloat16 tensor of 2^31 + 5 (4 GiB)."""
    n = 2**31 + 5
    try:
        x = torch.zeros(n, dtype=torch.bfloat16, device=device)
    except RuntimeError:  # CUDA's OutOfMemoryError is one too
        pytest.skip("not enough memory for a 4 GiB tensor")
    x[7] = 4.0
    x[2**31 + 1] = 3.0
    x[n - 1] = -5.0
    assert ops.topk(x, 2).tolist() == [7, 2**31 + 1]
    assert ops.select([x], 3)[0].tolist() == [7, 2**31 + 1, n - 1]
    # ties (the zeros) resolved by position over the whole tensor
    assert ops.select([x], 5)[0].tolist() == [0, 1, 7, 2**31 + 1, n - 1]
    del x


@pytest.mark.cuda
def test_cuda_matches_cpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 1000, 65537, 1000003):
            x = torch.randn(n).to(dtype)
            for k in (1, n // 100, n // 2, n):
                assert torch.equal(ops.topk(x.cuda(), k).cpu(), ops.topk(x, k))
    ts = make_list("cpu")
    rs = make_list("cpu")
    for score in ("grad", "grad_sq", "accumulated", "random"):
        for scope in ("tensor", "global"):
            kw = {"residual": rs} if score == "accumulated" else {}
            kwc = {"residual": [r.cuda() for r in rs]} if score == "accumulated" else {}
            a = ops.select(ts, 0.1, score=score, scope=scope,
                           generator=torch.Generator().manual_seed(1), **kw)
            b = ops.select([t.cuda() for t in ts], 0.1, score=score, scope=scope,
                           generator=torch.Generator().manual_seed(1), **kwc)
            assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_tie_mass_near_kth(device):
    """A tie mass near the k-th, too large for the sampled band."""
    x = torch.randn(1000000).abs()
    lo, hi = 0.28125, 0.3125  # the 11-bit bucket of 0.3
    x[(x >= lo) & (x < hi)] = 0.1
    x[::25] = 0.3
    x = x.to(device)
    above = int((x > 0.3).sum())
    # k-th inside the tie mass (the sample's guess), and just above it (the guess
    # fails and the radix select's band pass finishes)
    for k in (above + 1, above + 20000, above + 40000, above, above - 5):
        idx = ops.topk(x, k)
        assert torch.equal(idx, reference.topk(x, k))
        check_against_torch(x.cpu(), k, idx.cpu())


def test_cpu_same_result_for_any_thread_count():
    x = torch.randn(2000003)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [ops.topk(x, k) for k in (1, 20000, 1000001)]
        one_global = ops.select([x[:700000], x[700000:]], 0.01, scope="global")
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(max(2, threads))
    try:
        many = [ops.topk(x, k) for k in (1, 20000, 1000001)]
        many_global = ops.select([x[:700000], x[700000:]], 0.01, scope="global")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    assert all(torch.equal(a, b) for a, b in zip(one_global, many_global))


def test_reference_fallback_path(monkeypatch):
    """Without the extension the wrappers run the reference: same answers."""
    x = torch.randn(50000)
    ts = make_list("cpu")
    want_topk = ops.topk(x, 500)
    want_sel = ops.select(ts, 0.05, scope="global", score="random",
                          generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(ops, "_kernel", lambda name, device: None)
    assert torch.equal(ops.topk(x, 500), want_topk)
    got = ops.select(ts, 0.05, scope="global", score="random",
                     generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(got, want_sel))


@pytest.mark.cuda
def test_cuda_ties_and_approx_across_chunks():
    """Exact: CUDA equals the CPU where the k-th key is shared over many 64K chunks and
    tensors (its bucket larger than the candidate buffer). Approx: within 1% of k,
    and every chosen score at least every unchosen one."""
    sizes = (70000, 3, 200001, 65536, 131073)
    ts = []
    for i, n in enumerate(sizes):
        t = torch.full((n,), 0.5)
        t[i::7] = torch.randn(t[i::7].numel())
        t[5::11] = -0.5  # ties with +0.5 on |x|
        t[::997] = float("nan") if i % 2 else float("-inf")
        ts.append(t)
    total = sum(sizes)
    for k in (1, 1000, total // 3, total - 1):
        for scope, ks in (("global", k), ("tensor", [min(k, n) for n in sizes])):
            a = ops.select(ts, ks, scope=scope)
            b = ops.select([t.cuda() for t in ts], ks, scope=scope)
            assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b)), (scope, k)
        for t in ts[2:4]:
            kk = t.numel() // 5
            assert torch.equal(ops.topk(t, kk), ops.topk(t.cuda(), kk).cpu())
        got = ops.select([t.cuda() for t in ts], k, scope="global", approx=True)
        m = sum(g.numel() for g in got)
        assert abs(m - k) <= max(1, k // 100)
        keys = torch.cat([t.abs().nan_to_num(nan=float("inf")) for t in ts])
        chosen = torch.zeros(total, dtype=torch.bool)
        off = 0
        for g, n in zip(got, sizes):
            g = g.cpu()
            assert bool((g[1:] > g[:-1]).all())
            chosen[off + g] = True
            off += n
        if 0 < m < total:
            assert keys[chosen].min() >= keys[~chosen].max()


def structured_inputs(n, generator):
    """Inputs that defeat a sample: big values on a period (the sample reads at a
    constant odd stride), in one block, on a ramp, with NaN/inf/-0 among them."""
    base = torch.randn(n, generator=generator) * 1e-3
    out = {"ramp": torch.linspace(-1.0, 1.0, n), "block": base.clone()}
    block = out["block"][n // 3: n // 3 + max(1, n // 50)]
    block.copy_(5.0 + torch.rand(block.numel(), generator=generator))
    for period in (2, 15, 16, 17, 31, 33, 255):
        x = base.clone()
        count = len(range(period // 2, n, period))
        x[period // 2:: period] += torch.randn(count, generator=generator) * 10
        out[f"period{period}"] = x
    special = base.clone()
    pick = torch.randperm(n, generator=generator)[: max(1, n // 97)]
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 3.0, -3.0])
    special[pick] = values.repeat(len(pick))[: len(pick)]
    out["special"] = special
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [300, 4097, 10000, 160000, 262144, 262145, 1000003])
def test_select_grad_structured_inputs(n, dtype):
    """The fp32/bf16/fp16 |grad| scans (vectorised; group maxima, sampled thresholds) against
    the reference on inputs whose large values a strided sample can miss."""
    gen = torch.Generator().manual_seed(n)
    for name, x in structured_inputs(n, gen).items():
        x = x.to(dtype)
        for density in (0.001, 0.01, 0.2):
            k = min(n, math.ceil(density * n))
            got = ops.select([x], [k])[0]
            want = reference.select([x], [k], "grad", False, False)[0]
            assert torch.equal(got, want), (name, density)
            got_two = ops.select([x[: n // 2], x[n // 2:]], k, scope="global")
            want_two = reference.select([x[: n // 2], x[n // 2:]], [k], "grad", True, False)
            assert all(torch.equal(a, b) for a, b in zip(got_two, want_two)), (name, density)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("used_rows", [8, 64])
def test_select_few_nonzero_rows(dtype, used_rows):
    """An embedding's gradient: only the rows of a batch's tokens are nonzero, in fewer
    16-element tiles than k (the k-th largest tile maximum is 0), with k below and above
    the count of nonzeros (then the lowest-positioned zeros complete the choice)."""
    gen = torch.Generator().manual_seed(used_rows)
    rows, width = 512, 384
    x = torch.zeros(rows, width)
    used = torch.randperm(rows, generator=gen)[:used_rows]
    x[used] = torch.randn(used_rows, width, generator=gen)
    x[used[0], 3:9] = 0.0
    x = x.to(dtype).reshape(-1)
    nonzero, tiles = int((x != 0).sum()), used_rows * width // 16
    for k in (tiles + 1, 1966, nonzero - 1, nonzero, nonzero + 1, 6000):
        if not 0 < k <= x.numel():
            continue
        got = ops.select([x], [k])[0]
        assert torch.equal(got, reference.select([x], [k], "grad", False, False)[0]), k


@pytest.mark.parametrize("n", [4097, 160000, 262144, 1000003])
def test_select_sample_sees_only_spikes(n):
    """White-box: spikes on exactly the positions the CPU kernel samples (the sample
    rule of select_cpu.cpp, mirrored here), so the sample overrates every key and its
    threshold misses; the kernel must notice and still answer exactly."""
    s = min(n, max(256, min(n // 16, 16384))) if n <= 262144 else \
        min(65536, n, max(4096, n // 32))
    start, stride = cpu_sample_stride(n, s)
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e-3
    x[start::stride] = 1.0 + torch.rand(len(range(start, n, stride)))
    for density in (0.001, 0.01, 0.2):
        k = math.ceil(density * n)
        assert torch.equal(ops.select([x], [k])[0],
                           reference.select([x], [k], "grad", False, False)[0])


@needs_ext
def test_select_validate_false_same_answer_and_kernel_still_checks():
    ts = [torch.randn(1000), torch.randn(77)]
    for scope in ("tensor", "global"):
        a = ops.select(ts, 0.05, scope=scope)
        b = ops.select(ts, 0.05, scope=scope, validate=False)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(RuntimeError, match=r"tensors\[1\]"):
        ops.select([ts[0], torch.arange(5)], 0.5, validate=False)


@needs_ext
def test_cpu_baseline_scan_same_answer(tmp_path):
    """The portable (non-AVX2) scans, forced by INCRKERN_CPU_BASELINE=1 in a child
    process, pick the same elements as the default path, for fp32, bf16 and fp16, |x|
    keys (grad) and signed ones (topk, grad_sq); 1237 elements leave a tile over the
    tile-maxima scan's groups of four and a part tile."""
    code = (
        "import torch, math\n"
        "from incrkern import ops\n"
        "g = torch.Generator().manual_seed(3)\n"
        "out = []\n"
        "for n in (17, 1237, 4097, 160000, 1000003):\n"
        "    for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "        x = torch.randn(n, generator=g).to(dtype)\n"
        "        x[::97] = float('nan')\n"
        "        x[1::89] = -float('nan')\n"
        "        x[2::83] = -0.0\n"
        "        x[3::79] = -float('inf')\n"
        "        for d in (0.001, 0.01, 0.3):\n"
        "            out.append(ops.select([x], d)[0])\n"
        "            out.append(ops.select([x[: n // 2], x[n // 2:]], d, scope='global')[1])\n"
        "            out.append(ops.topk(x, math.ceil(d * n)))\n"
        "            out.append(ops.select([x], d, score='grad_sq')[0])\n"
        "torch.save(out, __import__('sys').argv[1])\n")
    results = results_in_children(code, ({}, {"INCRKERN_CPU_BASELINE": "1"}), tmp_path)
    assert len(results[0]) == len(results[1]) == 180
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _small_inputs(n, dtype, gen):
    """Inputs for the small-tensor path (group maxima and a top-bits histogram of
    them): every maximum in one histogram bin, a dynamic range of 60 decades, few
    levels (ties across groups), negative values, NaN/inf among them."""
    base = torch.randn(n, generator=gen)
    yield "normal", base
    yield "one_bin", 1.0 + 0.01 * torch.rand(n, generator=gen)
    yield "wide_range", base * torch.pow(10.0, torch.randint(-30, 30, (n,), generator=gen).float())
    yield "levels", torch.randint(-3, 4, (n,), generator=gen).float()
    special = base.clone()
    special[:: max(1, n // 7)] = float("nan")
    special[1:: max(1, n // 5)] = float("inf")
    special[2:: max(1, n // 3)] = -0.0
    special[3:: max(1, n // 11)] = -float("nan")
    special[4:: max(1, n // 13)] = -float("inf")
    yield "special", special


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [17, 1000, 10000, 65537])
def test_select_small_tensors_exact(n, dtype):
    """The small-tensor path against the reference, per tensor and global over a list
    of small tensors, for |x| and signed keys (grad, grad_sq, topk), at densities
    from one element to half the groups (its range) and beyond."""
    gen = torch.Generator().manual_seed(n)
    for name, x in _small_inputs(n, dtype, gen):
        x = x.to(dtype)
        parts = [x[: n // 3], x[n // 3:]]
        for k in sorted({1, 2, n // 160, n // 64, n // 33, n // 10}):
            if k < 1:
                continue
            for score, t in (("grad", x), ("grad_sq", x.abs()), ("grad_sq", x)):
                got = ops.select([t], [k], score=score)[0]
                want = reference.select([t], [k], score, False, False)[0]
                assert torch.equal(got, want), (name, k, score)
            assert torch.equal(ops.topk(x, k), reference.topk(x, k)), (name, k)
            tp = [p.abs() for p in parts]
            got = ops.select(tp, k, score="grad_sq", scope="global")
            want = reference.select(tp, [k], "grad_sq", True, False)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (name, k)
            got = ops.select(parts, k, scope="global")
            want = reference.select(parts, [k], "grad", True, False)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (name, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_signed_special_values_large(dtype):
    """Signed keys through the sampled band (a tensor of more than one block): NaN of
    either sign above +inf, -0 tied with +0, -inf last, at the densities of a step."""
    n = 1_000_003
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=gen)
    x[::1009] = float("nan")
    x[1::997] = -float("nan")
    x[2::991] = float("inf")
    x[3::983] = -float("inf")
    x[4::3] = -0.0
    x[5::7] = 0.0
    x = x.to(dtype)
    for k in (1, 500, 1000, 10000, 100000, 600000):
        assert torch.equal(ops.topk(x, k), reference.topk(x, k)), k
        got = ops.select([x], [k], score="grad_sq")[0]
        assert torch.equal(got, reference.select([x], [k], "grad_sq", False, False)[0]), k


@pytest.mark.parametrize("n", [40000, 262144, 1048576])
def test_select_tile_maxima_in_any_order(n):
    """The tile maxima's selection (up to 2^20 elements, density up to about 3%)
    counts the maxima chunk by chunk as it reads: the answer must not depend on where
    the largest keys lie (a ramp up puts them last, a ramp down first, a late block of
    spikes after a flat start, and exact zeros up to the last tiles), ties included."""
    gen = torch.Generator().manual_seed(n)
    ramp = torch.linspace(0.0, 1.0, n)
    late = torch.full((n,), 0.5)
    late[-n // 16:] = torch.rand(n // 16, generator=gen) + 1.0
    zeros_first = torch.zeros(n)
    zeros_first[-n // 8:] = torch.randn(n // 8, generator=gen)
    inputs = {"ramp up": ramp, "ramp down": ramp.flip(0), "late spikes": late,
              "zeros first": zeros_first, "ties": torch.randint(0, 4, (n,), generator=gen).float()}
    for name, x in inputs.items():
        for density in (1e-4, 0.001, 0.01, 0.03):
            k = max(1, math.ceil(density * n))
            got = ops.select([x], [k])[0]
            want = reference.select([x], [k], "grad", False, False)[0]
            assert torch.equal(got, want), (name, density)
