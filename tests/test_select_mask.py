"""Tests of incrkern.ops.select_mask: per tensor a flat bool mask of its numel, True
exactly at the positions incrkern.reference.select chooses (exact selection, ties to
the lowest index, NaN above +inf, -0 == +0). Every mask is compared with the
reference's whole, element for element: sizes around the CPU kernel's 16-element
tiles and 2^16-element blocks, every score and dtype, and the inputs that send it
down its sampled band or its fallback (ties at the k-th crossing blocks, nearly all
zeros, heavy tails, NaN and inf, a sample that misjudges the k-th)."""
import re

import pytest
import torch

from incrkern import ops, reference
from helpers import cpu_sample_stride, needs_ext, results_in_children

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DENSITIES = (0.1, 0.3, 0.5, 0.9, 0.99)
BLOCK = 1 << 16  # the CPU kernel's counting block
LARGE = 1_500_007  # 23 blocks, not a multiple of 16


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_seed(seed):
    """The random score's seed ops.select and ops.select_mask draw from
    torch.Generator().manual_seed(seed)."""
    return int(torch.randint(0, 2**62, (1,), generator=gen(seed)))


def k_args(n, extra_densities=()):
    """The k arguments a tensor of n elements is tried with: 0, 1, n - 1 and n as
    ints, then densities (floats)."""
    ints = sorted({0, 1, n - 1, n} & set(range(n + 1)))
    return ints + list(DENSITIES) + list(extra_densities)


def ks_of(k, numels):
    """The per-tensor ks ops.select_mask makes of its k argument (scope='tensor')."""
    if isinstance(k, float):
        return [ops.density_k(k, n) for n in numels]
    if isinstance(k, int):
        return [k] * len(numels)
    return list(k)


def mask_of(positions, n):
    return torch.zeros(n, dtype=torch.bool).index_fill_(0, positions, True)


class Expected:
    """reference.select's choice for any k, as masks. The keys of
    reference.select_scores are sorted once (stable, descending) and the first k of
    that order are chosen: reference._top_positions's rule, computed once for the
    many ks a large tensor is tried with."""

    def __init__(self, ts, score="grad", residual=None, weights=None, seed=0):
        keys = reference.select_scores([t.contiguous() for t in ts], score,
                                       [r.contiguous() for r in residual or ()],
                                       [w.contiguous() for w in weights or ()], seed)
        self.orders = [torch.sort(key, descending=True, stable=True).indices for key in keys]

    def mask(self, i, k):
        return mask_of(self.orders[i][:k], self.orders[i].numel())


def assert_masks(got, ts, ks, want, what=""):
    """got: select_mask's answer for ts; want: the expected mask per tensor."""
    assert isinstance(got, list) and len(got) == len(ts)
    for i, (g, t, k, w) in enumerate(zip(got, ts, ks, want)):
        assert g.dtype == torch.bool, g.dtype
        assert tuple(g.shape) == (t.numel(),), tuple(g.shape)
        assert g.device == t.device
        if not torch.equal(g, w):
            extra = (g & ~w).nonzero().squeeze(1)
            missing = (w & ~g).nonzero().squeeze(1)
            pytest.fail(f"{what} tensor {i} ({t.dtype}, shape {tuple(t.shape)}), k={k}: "
                        f"{extra.numel()} positions chosen that should not be, first "
                        f"{extra[:8].tolist()}; {missing.numel()} missing, first "
                        f"{missing[:8].tolist()}; count {int(g.sum())}")
        assert int(g.sum()) == k


def check(ts, k_list, score="grad", residual=None, weights=None, seed=None, what=""):
    """select_mask(ts, k) against the reference for every k in k_list."""
    rseed = random_seed(seed) if score == "random" else 0
    exp = Expected(ts, score, residual, weights, rseed)
    numels = [t.numel() for t in ts]
    for k in k_list:
        got = ops.select_mask(ts, k, score=score, residual=residual, weights=weights,
                              generator=gen(seed) if seed is not None else None)
        ks = ks_of(k, numels)
        assert_masks(got, ts, ks, [exp.mask(i, ki) for i, ki in enumerate(ks)],
                     f"{what} score={score} k={k!r}:")


def bits_equal(a, b):
    """Equal shape, dtype and bits (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    view = ints[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def from_bits(values, dtype):
    """A tensor of `dtype` with the given bit patterns (ints of its width)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}
    width = torch.finfo(dtype).bits
    signed = [v - (1 << width) if v >= 1 << (width - 1) else v for v in values]
    return torch.tensor(signed, dtype=ints[dtype]).view(dtype)


def nan_patterns(dtype):
    """NaNs of several payloads and both signs: all of them tie above +inf."""
    return {
        torch.float32: [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF800001],
        torch.float64: [0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8000000000000],
        torch.float16: [0x7E00, 0x7C01, 0x7FFF, 0xFE00],
        torch.bfloat16: [0x7FC0, 0x7F81, 0x7FFF, 0xFFC0],
    }[dtype]


def signed_specials(n, dtype, g):
    """n signed values: normals, exact +-0, +-inf, NaNs of every payload, tiny
    (subnormal) values and exact ties, shuffled."""
    x = torch.randn(n, generator=g).to(dtype)
    pick = torch.randperm(n, generator=g)
    share = n // 20
    x[pick[:share]] = 0.0
    x[pick[share:2 * share]] = -0.0
    x[pick[2 * share:2 * share + share // 4]] = float("inf")
    x[pick[2 * share + share // 4:2 * share + share // 2]] = float("-inf")
    nans = from_bits(nan_patterns(dtype), dtype)
    at = pick[3 * share:3 * share + share // 2]
    x[at] = nans[torch.arange(at.numel()) % nans.numel()]
    tiny = torch.finfo(dtype).tiny
    at = pick[4 * share:4 * share + share // 4]
    x[at] = (torch.tensor([tiny / 4, -tiny / 4, tiny / 2], dtype=torch.float64).to(dtype))[
        torch.arange(at.numel()) % 3]
    x[pick[5 * share:6 * share]] = 1.5  # an exact tie
    x[pick[6 * share:7 * share]] = -1.5
    return x


# ----------------------------------------------------------------------------------
# sizes, dtypes and ks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000, 65536, 65537, 200003])
def test_sizes_and_ks(n, dtype):
    x = torch.randn(n, generator=gen(n)).to(dtype)
    check([x], k_args(n), what=f"n={n}")
    # and the positions reference.select itself returns, for two ks
    for k in sorted({1, n // 2} & set(range(n + 1))):
        want = reference.select([x], [k], "grad")[0]
        assert torch.equal(ops.select_mask([x], k)[0], mask_of(want, n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shape_is_flat(dtype):
    x = torch.randn(37, 3, 41, generator=gen(1)).to(dtype)
    got = ops.select_mask([x], 0.3)[0]
    assert got.shape == (x.numel(),) and got.dtype == torch.bool
    want = reference.select([x], [ops.density_k(0.3, x.numel())], "grad")[0]
    assert torch.equal(got, mask_of(want, x.numel()))


# ----------------------------------------------------------------------------------
# scores


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [17, 65537, 200003])
def test_score_grad_sq_signed(n, dtype):
    """grad_sq orders the signed value: negatives below +-0 (equal), NaN above +inf."""
    x = signed_specials(n, dtype, gen(n + 3))
    nonneg = int(((x >= 0) | x.isnan()).sum())
    check([x], k_args(n, (0.05, 0.14)) + [nonneg, max(nonneg - 1, 0)], score="grad_sq",
          what=f"n={n}")


def test_score_grad_sq_zero_signs():
    """Only -0 and +0 (and a few ones): the k-th is a zero, its ties by position
    whatever the sign."""
    g = gen(5)
    n = 200003
    x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
    x[torch.randperm(n, generator=g)[:1000]] = 1.0
    check([x], [1, 999, 1000, 1001, 5000, 70000, 0.1, 0.5, n - 1], score="grad_sq")
    check([x], [1000, 1001, 0.3], score="grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_grad_specials(dtype):
    """|x| with +-0, +-inf, NaNs of every payload and subnormals."""
    n = 200003
    x = signed_specials(n, dtype, gen(11))
    nans, infs = int(x.isnan().sum()), int(x.isinf().sum())
    check([x], k_args(n) + [nans - 1, nans, nans + 1, nans + infs, nans + infs + 1])


@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
def test_score_weight(wdtype):
    """|weights[i]|; the tensors (NaN-filled, of another dtype) give only the shapes."""
    shapes = [(313, 640), (17,), (65537,), (3, 0)]
    ws = [torch.randn(s, generator=gen(i)).to(wdtype) for i, s in enumerate(shapes)]
    ws[0][::7] = 0.0
    ws[0][3::11] = -ws[0][3::11].abs().round()  # ties
    ts = [torch.full(s, float("nan")) for s in shapes]
    check(ts, k_args(0) + [[1, 16, 65536, 0], [200320, 0, 1, 0], 0.05], score="weight",
          weights=ws)


@pytest.mark.parametrize("tdtype,rdtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float64, torch.float32),
    (torch.float64, torch.float64)], ids=str)
def test_score_accumulated(tdtype, rdtype):
    """|residual + t| in the residual's dtype: cancellations to +-0, inf - inf = NaN."""
    g = gen(21)
    n = 200003
    t = torch.randn(n, generator=g).to(tdtype)
    r = torch.randn(n, generator=g).to(rdtype)
    r[::5] = -t[::5].to(rdtype)  # exact cancellation: many zeros
    r[1::9] = float("inf")
    t[1::9 * 7] = float("-inf")  # inf - inf
    r[2::13] = 1.0
    t[2::13] = 0.5  # a tie at 1.5
    ts = [t, torch.randn(17, generator=g).to(tdtype), torch.randn(65536, generator=g).to(tdtype)]
    rs = [r, torch.randn(17, generator=g).to(rdtype), torch.zeros(65536, dtype=rdtype)]
    check(ts, [0, 1, 0.01, 0.1, 0.3, 0.5, 0.8, 0.9, 0.99, 1.0, [5, 16, 65535], [n - 1, 1, 0]],
          score="accumulated", residual=rs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_random(dtype):
    """The random score ignores the values; its keys depend on the seed and the
    tensor's place in the list."""
    sizes = (200003, 17, 0, 65536, 1, 2)
    ts = [torch.randn(n, generator=gen(n)).to(dtype) for n in sizes]
    for seed in (0, 7):
        check(ts, [0, 0.1, 0.3, 0.5, 0.9, 0.99, 1.0, [max(n - 1, 0) for n in sizes],
                   [min(n, 1) for n in sizes]],
              score="random", seed=seed)


# ----------------------------------------------------------------------------------
# structured inputs: ties, zeros, heavy tails, NaN / inf, a misleading sample


def structured(kind, dtype, n, g):
    if kind == "levels":  # many exact ties, both signs
        x = torch.randint(0, 4, (n,), generator=g).float()
        x = x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    elif kind == "zeros":
        x = torch.zeros(n)
        x[1::3] = -0.0
    elif kind == "embedding":  # rows of 64, 99% of them zero
        rows = n // 64
        x = torch.zeros(rows, 64)
        live = torch.randperm(rows, generator=g)[:max(1, rows // 100)]
        x[live] = torch.randn(live.numel(), 64, generator=g)
        x = x.reshape(-1)
        x = torch.cat([x, torch.zeros(n - x.numel())])
    elif kind == "sparse":  # 95% of the elements exactly zero, the rest scattered
        x = torch.randn(n, generator=g)
        x[torch.rand(n, generator=g) < 0.95] = 0.0
    elif kind == "cauchy":
        x = torch.empty(n).cauchy_(generator=g)
    elif kind == "student_t":  # 2 degrees of freedom: Z / sqrt(chi^2_2 / 2)
        z = torch.randn(n, generator=g)
        chi2 = torch.empty(n).exponential_(generator=g) * 2  # chi^2 with 2 dof
        x = z / (chi2 / 2).sqrt()
    elif kind == "nan_inf":
        x = torch.randn(n, generator=g)
        u = torch.rand(n, generator=g)
        x[u < 0.01] = float("nan")
        x[(u >= 0.01) & (u < 0.02)] = float("inf")
        x[(u >= 0.02) & (u < 0.03)] = float("-inf")
    elif kind == "sample_low":  # the sampled keys tiny, every other one large
        start, stride = cpu_sample_stride(n, min(n, max(256, min(4096, n // 64))))
        x = 1.0 + torch.rand(n, generator=g)
        x[start::stride] = 1e-3 * torch.rand(x[start::stride].numel(), generator=g)
    elif kind == "sample_high":  # the sampled keys large, every other one tiny
        start, stride = cpu_sample_stride(n, min(n, max(256, min(4096, n // 64))))
        x = 1e-3 * torch.rand(n, generator=g)
        x[start::stride] = 1.0 + torch.rand(x[start::stride].numel(), generator=g)
    else:
        raise AssertionError(kind)
    return x.to(dtype)


KINDS = ["levels", "zeros", "embedding", "sparse", "cauchy", "student_t", "nan_inf",
         "sample_low", "sample_high"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_structured(kind, dtype):
    n = 200003
    x = structured(kind, dtype, n, gen(KINDS.index(kind)))
    nonzero = int((x != 0).sum())
    special = [nonzero - 1, nonzero, nonzero + 1] if 0 < nonzero < n else []
    if kind == "nan_inf":
        nans, infs = int(x.isnan().sum()), int(x.isinf().sum())
        special += [nans, nans + 1, nans + infs, nans + infs - 1]
    if kind == "levels":  # the k-th the last (or one past the last) of a level's ties
        for v in (1, 2, 3):
            c = int((x.abs() >= v).sum())
            special += [c - 1, c, c + 1]
    check([x], k_args(n, (0.001, 0.005, 0.01, 0.05, 0.14)) + special,
          what=f"{kind}:")
    check([x], [0.1, 0.5], score="grad_sq", what=f"{kind}:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tie_across_blocks(dtype):
    """+-1 everywhere but for a few larger values: the k-th is a tie crossing
    many 2^16 blocks; blocks before the k-th's take all their ties, it some."""
    g = gen(31)
    x = torch.where(torch.rand(LARGE, generator=g) < 0.5, -1.0, 1.0)
    big = torch.randperm(LARGE, generator=g)[:40]
    x[big] = 2.0 + torch.arange(40.0) / 8
    x[LARGE - 5:] = 3.0  # larger values behind every tie too
    x = x.to(dtype)
    above = int((x.abs() > 1).sum())
    before = lambda p: int((x[:p].abs() > 1).sum())  # noqa: E731
    ks = [above, above + 1, 0.1, 0.5, 0.9]
    for blocks in (1, 3, 7, 22):  # the ties end exactly at a block's end, or one off it
        p = blocks * BLOCK
        ks += [above + (p - before(p)) + d for d in (-1, 0, 1)]
    ks = [k for k in ks if isinstance(k, float) or 0 <= k <= LARGE]
    check([x], ks, what="tie:")


def test_all_equal_large():
    """One tie over the whole tensor: the first k positions, whatever k."""
    x = torch.full((LARGE,), 0.25)
    for k in (1, BLOCK - 1, BLOCK, BLOCK + 1, 10 * BLOCK + 3, 0.1, 0.5, 0.99, LARGE - 1):
        kk = ks_of(k, [LARGE])[0]
        got = ops.select_mask([x], k)[0]
        want = torch.zeros(LARGE, dtype=torch.bool)
        want[:kk] = True
        assert got.dtype == torch.bool and got.shape == (LARGE,)
        assert torch.equal(got, want), (k, (got != want).nonzero()[:8].tolist())


@pytest.mark.parametrize("case", ["randn_f32", "randn_bf16", "randn_f16", "randn_f64",
                                  "embedding_f32", "cauchy_f16", "levels_f32",
                                  "signed_grad_sq", "random", "weight", "accumulated"])
def test_large(case):
    """~1.5M elements (23 blocks of 2^16), a few ks each."""
    g = gen(41)
    kwargs = {}
    ks = [1, 0.1, 0.5, LARGE - 1]
    if case.startswith("randn"):
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16,
                 "f64": torch.float64}[case.split("_")[1]]
        x = torch.randn(LARGE, generator=g).to(dtype)
        ks = [1, 0.1, 0.3, 0.9, 0.99, LARGE - 1]
    elif case == "embedding_f32":
        x = structured("embedding", torch.float32, LARGE, g)
        ks = [0.005, 0.01, 0.1, 0.5]
    elif case == "cauchy_f16":
        x = structured("cauchy", torch.float16, LARGE, g)
    elif case == "levels_f32":
        x = structured("levels", torch.float32, LARGE, g)
        ks = [0.1, 0.25, 0.5, 0.75]
    elif case == "signed_grad_sq":
        x = signed_specials(LARGE, torch.float32, g)
        kwargs["score"] = "grad_sq"
    elif case == "random":
        x = torch.zeros(LARGE, dtype=torch.bfloat16)
        kwargs.update(score="random", seed=3)
    elif case == "weight":
        x = torch.zeros(LARGE)
        kwargs.update(score="weight", weights=[torch.randn(LARGE, generator=g).bfloat16()])
    else:
        x = torch.randn(LARGE, generator=g).bfloat16()
        kwargs.update(score="accumulated", residual=[torch.randn(LARGE, generator=g)])
    check([x], ks, what=case, **kwargs)


# ----------------------------------------------------------------------------------
# against ops.select: lists, the random seed, scope="global"


def select_masks(ts, k, **kwargs):
    return [mask_of(p, t.numel()) for p, t in zip(ops.select(ts, k, **kwargs), ts)]


def mixed_list(g):
    sizes = [1000, 0, 17, 200003, 1, 65537, 2]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float64,
              torch.bfloat16, torch.float16]
    return [torch.randn(s, generator=g).to(d) for s, d in zip(sizes, dtypes)]


@pytest.mark.parametrize("score", ["grad", "grad_sq", "weight", "accumulated", "random"])
def test_list_matches_select(score):
    g = gen(51)
    ts = mixed_list(g)
    kwargs = {}
    if score == "weight":
        kwargs["weights"] = [torch.randn(t.numel(), generator=g).to(t.dtype) for t in ts]
    if score == "accumulated":
        kwargs["residual"] = [torch.randn(t.numel(), generator=g, dtype=torch.float32)
                              for t in ts]
    numels = [t.numel() for t in ts]
    seed = random_seed(9) if score == "random" else 0
    exp = Expected(ts, score, kwargs.get("residual"), kwargs.get("weights"), seed)
    for k in ([3, 0, 17, 20000, 1, 65536, 2], [999, 0, 1, 200002, 0, 1, 1], 0, 0.1, 0.9, 1.0):
        got = ops.select_mask(ts, k, score=score, generator=gen(9), **kwargs)
        want = select_masks(ts, k, score=score, generator=gen(9), **kwargs)
        ks = ks_of(k, numels)
        assert_masks(got, ts, ks, want, f"vs select, k={k}:")
        assert_masks(got, ts, ks, [exp.mask(i, ki) for i, ki in enumerate(ks)],
                     f"vs reference, k={k}:")
    # and reference.select's positions themselves, for one list of ks
    ks = [3, 0, 17, 20000, 1, 65536, 2]
    got = ops.select_mask(ts, ks, score=score, generator=gen(9), **kwargs)
    positions = reference.select(ts, ks, score, False, False, seed=seed,
                                 residuals=kwargs.get("residual", ()),
                                 weights=kwargs.get("weights", ()))
    for m, p, n in zip(got, positions, numels):
        assert torch.equal(m, mask_of(p, n))


def test_random_seed_drawn_like_select():
    ts = [torch.randn(n, generator=gen(n)) for n in (1000, 65537, 17, 200003)]
    for seed in (0, 1, 12345):
        for k in (0.1, 0.5, [10, 65536, 16, 3]):
            ga, gb = gen(seed), gen(seed)
            got = ops.select_mask(ts, k, score="random", generator=ga)
            want = select_masks(ts, k, score="random", generator=gb)
            assert_masks(got, ts, ks_of(k, [t.numel() for t in ts]), want, f"seed {seed}:")
            # the same draws taken from the generator
            assert torch.equal(torch.randint(0, 2**62, (4,), generator=ga),
                               torch.randint(0, 2**62, (4,), generator=gb))
    # the default generator when none is given
    torch.manual_seed(77)
    got = ops.select_mask(ts, 0.3, score="random")
    torch.manual_seed(77)
    want = select_masks(ts, 0.3, score="random")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # another seed, another choice
    other = ops.select_mask(ts, 0.3, score="random", generator=gen(78))
    assert not torch.equal(other[3], got[3])
    assert int(other[3].sum()) == int(got[3].sum()) == ops.density_k(0.3, 200003)


@pytest.mark.parametrize("score", ["grad", "random", "accumulated"])
def test_global_scope(score):
    g = gen(61)
    ts = mixed_list(g)
    ts[1] = torch.ones(70000)  # ties across tensors, by position in the concatenation
    kwargs = {}
    if score == "accumulated":
        kwargs["residual"] = [torch.zeros(t.numel()) for t in ts]
    total = sum(t.numel() for t in ts)
    seed = random_seed(13) if score == "random" else 0
    # reference.select's global rule: the concatenation's keys, one stable sort
    keys = torch.cat(reference.select_scores(ts, score, kwargs.get("residual", ()), (), seed))
    order = torch.sort(keys, descending=True, stable=True).indices
    for k in (0, 1, 5000, 0.1, 0.5, 1.0, total - 1):
        got = ops.select_mask(ts, k, score=score, scope="global", generator=gen(13), **kwargs)
        want = select_masks(ts, k, score=score, scope="global", generator=gen(13), **kwargs)
        kk = ops.density_k(k, total) if isinstance(k, float) else k
        ref = mask_of(order[:kk], total).split([t.numel() for t in ts])
        assert len(got) == len(ts)
        for m, w, r, t in zip(got, want, ref, ts):
            assert m.dtype == torch.bool and m.shape == (t.numel(),)
            assert torch.equal(m, w)
            assert torch.equal(m, r)
        assert sum(int(m.sum()) for m in got) == kk
    positions = reference.select(ts, [5000], score, True, False,
                                 residuals=kwargs.get("residual", ()), seed=seed)
    got = ops.select_mask(ts, 5000, score=score, scope="global", generator=gen(13), **kwargs)
    for m, p, t in zip(got, positions, ts):
        assert torch.equal(m, mask_of(p, t.numel()))


def global_reference(ts, k, score="grad", residual=(), weights=(), seed=0):
    """reference.select's global rule as masks: the concatenation's keys, one stable
    sort, the first k."""
    keys = torch.cat(reference.select_scores(ts, score, residual, weights, seed))
    order = torch.sort(keys, descending=True, stable=True).indices
    return list(mask_of(order[:k], keys.numel()).split([t.numel() for t in ts]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3,
                                    (torch.bfloat16, torch.float32, torch.float16)], ids=str)
def test_global_scope_band(kind, dtypes):
    """Without a float64 tensor the band runs over the concatenation: blocks of every
    tensor counted and marked over both threads, ties (levels, zeros) across tensors
    and blocks to the lowest position in the concatenation, an empty tensor among
    them."""
    g = gen(71)
    sizes = (200003, 0, 65536, 131071)
    ts = [structured(kind, dtype, n, g) if n else torch.zeros(0, dtype=dtype)
          for n, dtype in zip(sizes, dtypes + (dtypes[0],))]
    total = sum(sizes)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for k in (1, 397, 0.01, 0.1, 0.5, total - 3):
            kk = ops.density_k(k, total) if isinstance(k, float) else k
            got = ops.select_mask(ts, k, scope="global")
            ref = global_reference(ts, kk)
            for m, r, t in zip(got, ref, ts):
                assert m.shape == (t.numel(),) and torch.equal(m, r), (kind, k)
            assert sum(int(m.sum()) for m in got) == kk
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("score", ["grad_sq", "weight", "accumulated", "random"])
def test_global_scope_band_scores(score):
    """The other scores' keys over the concatenation, as select's."""
    g = gen(72)
    ts = [torch.randn(n, generator=g) for n in (70001, 17, 140000)]
    kwargs = {}
    if score == "weight":
        kwargs["weights"] = [torch.randn(t.numel(), generator=g) for t in ts]
    if score == "accumulated":
        kwargs["residual"] = [torch.randn(t.numel(), generator=g) for t in ts]
    seed = random_seed(5) if score == "random" else 0
    for k in (9, 0.05, 0.3):
        got = ops.select_mask(ts, k, score=score, scope="global", generator=gen(5), **kwargs)
        kk = ops.density_k(k, 210018) if isinstance(k, float) else k
        ref = global_reference(ts, kk, score, kwargs.get("residual", ()),
                               kwargs.get("weights", ()), seed)
        assert all(torch.equal(m, r) for m, r in zip(got, ref)), (score, k)


def test_empty_list():
    assert ops.select_mask([], 3) == []
    assert ops.select_mask([], 0.5) == []
    assert ops.select_mask([], 0.5, score="random", scope="global") == []


def test_empty_tensors():
    ts = [torch.zeros(0), torch.zeros(0, 5, dtype=torch.bfloat16)]
    got = ops.select_mask(ts, 0)
    assert [tuple(m.shape) for m in got] == [(0,), (0,)]
    assert all(m.dtype == torch.bool for m in got)


# ----------------------------------------------------------------------------------
# arguments


def test_argument_errors():
    """Each bad call raises what select raises for it (the same argument checks), naming
    the argument."""
    ts = [torch.randn(10), torch.randn(5)]
    bad_calls = [
        (ts, dict(k=1, score="magnitude"), "score"),
        (ts, dict(k=1, scope="layer"), "scope"),
        *[(ts, dict(k=k), "k") for k in (0.0, 1.5, -0.25, float("nan"), 6, -1, [1, 2, 3], True)],
        (ts, dict(k=[1, 6]), r"k\[1\]"),
        (ts, dict(k=[1, 2], scope="global"), "k"),
        (ts, dict(k=1, score="accumulated"), "residual"),
        (ts, dict(k=1, score="accumulated", residual=[torch.zeros(10)]), "residual"),
        (ts, dict(k=1, score="accumulated", residual=[torch.zeros(10), torch.zeros(4)]),
         "residual"),
        (ts, dict(k=1, residual=[torch.zeros(10), torch.zeros(5)]), "residual"),
        (ts, dict(k=1, score="weight"), "weights"),
        ([torch.zeros(3, dtype=torch.int32)], dict(k=1), "tensors"),
        (torch.zeros(3), dict(k=1), "tensors"),
        (ts, dict(k=1, score="random", generator=3), "generator"),
    ]
    for tensors, kwargs, name in bad_calls:
        with pytest.raises((TypeError, ValueError), match=name) as want:
            ops.select(tensors, **kwargs)
        with pytest.raises(type(want.value), match=re.escape(str(want.value))):
            ops.select_mask(tensors, **kwargs)


@pytest.mark.parametrize("score", ["grad", "grad_sq", "weight", "accumulated", "random"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inputs_not_modified(score, dtype):
    g = gen(71)
    ts = [signed_specials(n, dtype, g) for n in (200003, 17, 65537)]
    kwargs = {}
    if score == "weight":
        kwargs["weights"] = [signed_specials(t.numel(), dtype, g) for t in ts]
    if score == "accumulated":
        rdtype = torch.float64 if dtype == torch.float64 else torch.float32
        kwargs["residual"] = [signed_specials(t.numel(), rdtype, g) for t in ts]
    before = {name: [t.clone() for t in v] for name, v in kwargs.items()}
    ts_before = [t.clone() for t in ts]
    got = ops.select_mask(ts, 0.3, score=score, generator=gen(1), **kwargs)
    assert [int(m.sum()) for m in got] == [ops.density_k(0.3, t.numel()) for t in ts]
    assert all(bits_equal(a, b) for a, b in zip(ts, ts_before))
    for name, v in kwargs.items():
        assert all(bits_equal(a, b) for a, b in zip(v, before[name])), name


def test_non_contiguous():
    """Views are read in their logical (reshape(-1)) order, as select reads them."""
    g = gen(81)
    base = torch.randn(400, 700, generator=g)
    x = base.t()  # 700 x 400, not contiguous
    w = torch.randn(400, 700, generator=g).bfloat16().t()
    r = torch.randn(400, 700, generator=g).t()
    for score, kwargs in [("grad", {}), ("grad_sq", {}), ("weight", {"weights": [w]}),
                          ("accumulated", {"residual": [r]})]:
        ts = [x] if score != "weight" else [torch.zeros(700, 400)]
        for k in (1, 0.1, 0.5, 0.9):
            got = ops.select_mask(ts, k, score=score, **kwargs)
            exp = Expected(ts, score, kwargs.get("residual"), kwargs.get("weights"))
            kk = ks_of(k, [280000])
            assert_masks(got, ts, kk, [exp.mask(0, kk[0])], f"non-contiguous {score}:")
    assert not x.is_contiguous() and torch.equal(x, base.t())


def test_validate_false_same_answer():
    ts = mixed_list(gen(91))
    for score in ("grad", "random"):
        a = ops.select_mask(ts, 0.2, score=score, generator=gen(2))
        b = ops.select_mask(ts, 0.2, score=score, generator=gen(2), validate=False)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        c = ops.select_mask(tuple(ts), [5, 0, 1, 7, 1, 8, 2], score=score, generator=gen(2),
                            validate=False)
        d = ops.select_mask(ts, [5, 0, 1, 7, 1, 8, 2], score=score, generator=gen(2))
        assert all(torch.equal(x, y) for x, y in zip(c, d))


# ----------------------------------------------------------------------------------
# out=


def test_out_written_and_returned():
    g = gen(95)
    ts = mixed_list(g)
    for score in ("grad", "random", "grad_sq"):
        exp = Expected(ts, score, seed=random_seed(4) if score == "random" else 0)
        for k in (0.1, 0.7, [5, 0, 1, 20000, 1, 65537, 2]):
            out = [torch.ones(t.numel(), dtype=torch.bool) for t in ts]  # stale: all set
            got = ops.select_mask(ts, k, score=score, generator=gen(4), out=out)
            assert len(got) == len(ts) and all(a is b for a, b in zip(got, out))
            want = ops.select_mask(ts, k, score=score, generator=gen(4))
            assert all(torch.equal(a, b) for a, b in zip(out, want))
            ks = ks_of(k, [t.numel() for t in ts])
            assert_masks(out, ts, ks, [exp.mask(i, ki) for i, ki in enumerate(ks)], "out:")
    # scope="global" writes out too
    out = [torch.ones(t.numel(), dtype=torch.bool) for t in ts]
    got = ops.select_mask(ts, 0.2, scope="global", out=out)
    want = select_masks(ts, 0.2, scope="global")
    assert all(a is b for a, b in zip(got, out))
    assert all(torch.equal(a, b) for a, b in zip(out, want))


def test_out_errors():
    ts = [torch.randn(10), torch.randn(5)]
    with pytest.raises(TypeError, match="out"):
        ops.select_mask(ts, 1, out=[torch.zeros(10), torch.zeros(5, dtype=torch.bool)])
    with pytest.raises(ValueError, match="out"):
        ops.select_mask(ts, 1, out=[torch.zeros(10, dtype=torch.bool),
                                    torch.zeros(6, dtype=torch.bool)])
    with pytest.raises(ValueError, match="out"):
        ops.select_mask(ts, 1, out=[torch.zeros(10, dtype=torch.bool)])
    with pytest.raises(ValueError, match="out"):
        ops.select_mask(ts, 1, out=[torch.zeros(20, dtype=torch.bool)[::2],
                                    torch.zeros(5, dtype=torch.bool)])
    # checked before the random score's seed is drawn from the generator
    g = gen(3)
    with pytest.raises(ValueError, match="out"):
        ops.select_mask(ts, 1, score="random", generator=g, out=[torch.zeros(10, dtype=torch.bool)])
    assert torch.equal(torch.randint(0, 2**62, (2,), generator=g),
                       torch.randint(0, 2**62, (2,), generator=gen(3)))
    # the op's own check names the mask, before any mask is written
    good = torch.zeros(10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"masks\[1\]"):
        torch.ops.incrkern.select_mask_([good, torch.zeros(4, dtype=torch.bool)], ts, [10, 5],
                                        "grad", [], [], 0)
    assert not bool(good.any())


# ----------------------------------------------------------------------------------
# tensors past the kernel's one-thread size (2^21 elements): their blocks over threads


ONE_THREAD = 1 << 21


def test_over_one_thread_size():
    g = gen(111)
    n = ONE_THREAD + 17
    tie = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    tie[torch.randperm(n, generator=g)[:25]] = 4.0
    above = 25
    before = lambda p: int((tie[:p].abs() > 1).sum())  # noqa: E731
    cut = [above + (p - before(p)) + d for p in (5 * BLOCK, 17 * BLOCK) for d in (-1, 0, 1)]
    ts = [tie, torch.randn(1000, generator=g), torch.randn(ONE_THREAD + 3, generator=g).bfloat16()]
    check(ts, [0.1, 0.5, 0.99, [cut[0], 10, 1], [cut[1], 999, ONE_THREAD],
               [cut[4], 1, 7], [cut[5], 500, 2]], what="large list:")
    check(ts, [0.3], score="random", seed=5, what="large list:")


# ----------------------------------------------------------------------------------
# the portable scans (INCRKERN_CPU_BASELINE=1: no AVX2), in a child process


BASELINE_CASES = [(n, dtype, score) for n in (17, 1237, 200003)
                  for dtype in ("float32", "bfloat16", "float16")
                  for score in ("grad", "grad_sq", "random")]
BASELINE_KS = (1, 0.1, 0.5, 0.99)


def baseline_input(n, dtype, score):
    g = gen(n)
    x = signed_specials(n, getattr(torch, dtype), g) if score != "random" else \
        torch.zeros(n, dtype=getattr(torch, dtype))
    return x


@needs_ext
def test_portable_scans_same_answer(tmp_path):
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from incrkern import ops\n"
        "import test_select_mask as t\n"
        "out = []\n"
        "for n, dtype, score in t.BASELINE_CASES:\n"
        "    x = t.baseline_input(n, dtype, score)\n"
        "    for k in t.BASELINE_KS:\n"
        "        out.append(ops.select_mask([x], k, score=score, generator=t.gen(5))[0])\n"
        "torch.save(out, sys.argv[1])\n")
    got = iter(results_in_children(code, ({"INCRKERN_CPU_BASELINE": "1"},), tmp_path)[0])
    for n, dtype, score in BASELINE_CASES:
        x = baseline_input(n, dtype, score)
        exp = Expected([x], score, seed=random_seed(5) if score == "random" else 0)
        for k in BASELINE_KS:
            kk = ks_of(k, [n])
            assert_masks([next(got)], [x], kk, [exp.mask(0, kk[0])],
                         f"INCRKERN_CPU_BASELINE=1 {dtype} n={n}:")


# ----------------------------------------------------------------------------------
# the registered op: select_mask_(masks, ...) writing masks in place


def run_op(ts, ks, score, residuals, weights, seed):
    masks = [torch.ones(t.numel(), dtype=torch.bool) for t in ts]  # every byte rewritten
    torch.ops.incrkern.select_mask_(masks, ts, ks, score, residuals, weights, seed)
    return masks


def op_args(ts, ks, score, residuals, weights, seed):
    return ([torch.zeros(t.numel(), dtype=torch.bool) for t in ts], ts, ks, score, residuals,
            weights, seed)


@needs_ext
def test_op_direct():
    """The registered op with explicit ks and seed."""
    g = gen(101)
    ts = [torch.randn(3000, generator=g), torch.randn(17, generator=g).bfloat16(),
          torch.randn(70000, generator=g).half()]
    rs = [torch.randn(t.numel(), generator=g) for t in ts]
    ws = [torch.randn(t.numel(), generator=g) for t in ts]
    ks = [30, 16, 7000]
    for score, residuals, weights, seed in [("grad", [], [], 0), ("grad_sq", [], [], 0),
                                            ("accumulated", rs, [], 0), ("weight", [], ws, 0),
                                            ("random", [], [], 123456789)]:
        got = run_op(ts, ks, score, residuals, weights, seed)
        exp = Expected(ts, score, residuals, weights, seed)
        assert_masks(got, ts, ks, [exp.mask(i, k) for i, k in enumerate(ks)], f"op {score}:")


@needs_ext
def test_opcheck():
    op = torch.ops.incrkern.select_mask_.default
    ts = [torch.randn(3000), torch.randn(100).bfloat16(), torch.randn(17).half()]
    torch.library.opcheck(op, op_args(ts, [30, 1, 17], "grad", [], [], 0))
    rs = [torch.randn(3000), torch.randn(100), torch.randn(17)]
    torch.library.opcheck(op, op_args(ts, [300, 50, 0], "accumulated", rs, [], 0))
    torch.library.opcheck(op, op_args(ts, [3, 99, 16], "random", [], [], 42))
    ws = [torch.randn(3000).half(), torch.randn(100), torch.randn(17)]
    torch.library.opcheck(op, op_args(ts, [1000, 0, 5], "weight", [], ws, 0))


@needs_ext
def test_positions_beyond_2_31():
    """Index arithmetic past 2^31 elements: one bfloat16 tensor of 2^31 + 5 (4 GiB) and
    its 2 GiB mask; the k-th among the zeros, taken lowest positions first."""
    n = 2**31 + 5
    try:
        x = torch.zeros(n, dtype=torch.bfloat16)
        out = [torch.empty(n, dtype=torch.bool)]
    except RuntimeError:
        pytest.skip("not enough memory for a 4 GiB tensor and its mask")
    x[7] = 4.0
    x[2**31 + 1] = 3.0
    x[n - 1] = -5.0
    for k, chosen in ((3, [7, 2**31 + 1, n - 1]), (5, [0, 1, 7, 2**31 + 1, n - 1])):
        mask = ops.select_mask([x], k, out=out)[0]
        assert mask.nonzero().view(-1).tolist() == chosen
    del x, out
