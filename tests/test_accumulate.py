"""The accumulate kernels against incrkern.reference: every dtype, edge sizes, either
accumulator list alone, bad arguments rejected before anything is written."""
import pytest
import torch

from incrkern import ops, reference
from helpers import DTYPES, cuda_copy, needs_ext

SIZES = [0, 1, 3, 4, 5, 17, 4099, 65537]


def _make(dtype, sizes=SIZES, device="cpu", offset=0):
    math = ops.math_dtype(dtype)
    grads = [torch.randn(n + offset, device=device).to(dtype)[offset:] for n in sizes]
    accs = [torch.randn(n + offset, device=device, dtype=math)[offset:] for n in sizes]
    sqs = [torch.rand(n + offset, device=device, dtype=math)[offset:] for n in sizes]
    return grads, accs, sqs


def _clone(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["acc", "sq", "both"])
def test_accumulate_matches_reference(dtype, which):
    grads, accs, sqs = _make(dtype)
    grads_before = _clone(grads)
    accs_k = accs if which != "sq" else None
    sqs_k = sqs if which != "acc" else None
    exp_accs, exp_sqs = _clone(accs), _clone(sqs)
    ops.accumulate_(accs_k, grads, 0.37, sqs_k, sq_alpha=0.05, sq_decay=0.95)
    reference.accumulate_(exp_accs if accs_k else [], grads, 0.37,
                          exp_sqs if sqs_k else [], 0.05, 0.95)
    # The kernel and the reference round each product and sum once, in the same order.
    for a, e in zip(accs, exp_accs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for s, e in zip(sqs, exp_sqs):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0)


def test_accumulate_formula_and_defaults():
    g = torch.tensor([1.0, -2.0, 0.5])
    acc, sq = torch.zeros(3), torch.ones(3)
    ops.accumulate_([acc], [g], 2.0, [sq])  # sq_alpha defaults to alpha
    assert torch.equal(acc, torch.tensor([2.0, -4.0, 1.0]))
    assert torch.equal(sq, torch.tensor([3.0, 9.0, 1.5]))
    # Fisher EMA: only the squared accumulators, sq = beta * sq + (1 - beta) * g^2.
    ops.accumulate_(None, [g], sq_accs=[sq], sq_alpha=0.5, sq_decay=0.5)
    assert torch.equal(sq, torch.tensor([2.0, 6.5, 0.875]))
    assert torch.equal(acc, torch.tensor([2.0, -4.0, 1.0]))


def test_accumulate_repeated_matches_sum():
    grads = [torch.randn(1000) for _ in range(8)]
    acc = torch.zeros(1000)
    for g in grads:
        ops.accumulate_([acc], [g], 1.0 / 8)
    torch.testing.assert_close(acc, torch.stack(grads).mean(0), rtol=1e-5, atol=1e-6)


def test_accumulate_unaligned_views_and_empty_lists():
    grads, accs, sqs = _make(torch.float32, sizes=[5, 1027], offset=1)
    exp_accs, exp_sqs = _clone(accs), _clone(sqs)
    ops.accumulate_(accs, grads, -1.5, sqs)
    reference.accumulate_(exp_accs, grads, -1.5, exp_sqs, -1.5, 1.0)
    for a, e in zip(accs + sqs, exp_accs + exp_sqs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    ops.accumulate_([], [], 1.0)
    ops.accumulate_(None, grads, 1.0, None)  # nothing to accumulate into


def _bad_calls():
    def base():
        g = [torch.randn(6), torch.randn(7)]
        return g, [torch.zeros(6), torch.zeros(7)], [torch.zeros(6), torch.zeros(7)]

    cases = []

    def case(name, exc, match, mutate):
        cases.append(pytest.param(mutate, exc, match, id=name))

    case("grads-not-list", TypeError, "grads", lambda g, a, s: (g[0], a, s, {}))
    case("grads-item", TypeError, r"grads\[1\]", lambda g, a, s: ([g[0], 3.0], a, s, {}))
    case("accs-length", ValueError, "accs", lambda g, a, s: (g, a[:1], s, {}))
    case("sq-length", ValueError, "sq_accs", lambda g, a, s: (g, a, s[:1], {}))
    case("acc-dtype", TypeError, r"accs\[1\]",
         lambda g, a, s: (g, [a[0], a[1].double()], s, {}))
    case("acc-numel", ValueError, r"sq_accs\[1\]",
         lambda g, a, s: (g, a, [s[0], torch.zeros(8)], {}))
    case("acc-noncontig", ValueError, r"accs\[1\]",
         lambda g, a, s: (g, [a[0], torch.zeros(7, 2)[:, 0]], s, {}))
    case("grad-noncontig", ValueError, r"grads\[1\]",
         lambda g, a, s: ([g[0], torch.randn(7, 2)[:, 0]], a, s, {}))
    case("grad-int", TypeError, r"grads\[0\]",
         lambda g, a, s: ([torch.ones(6, dtype=torch.int32), g[1]], a, s, {}))
    case("grad-device", ValueError, r"grads\[1\]",
         lambda g, a, s: ([g[0], torch.empty(7, device="meta")], a, s, {}))
    case("alpha-type", TypeError, "alpha", lambda g, a, s: (g, a, s, {"alpha": "1"}))
    case("sq-decay-type", TypeError, "sq_decay", lambda g, a, s: (g, a, s, {"sq_decay": None}))
    return cases, base


_CASES, _BASE = _bad_calls()


@pytest.mark.parametrize("mutate,exc,match", _CASES)
def test_accumulate_bad_arguments_touch_nothing(mutate, exc, match):
    g, a, s = _BASE()
    g, a, s, kw = mutate(g, a, s)
    everything = [t for t in (list(g) if isinstance(g, list) else [g]) + a + s
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = _clone(everything)
    kw = {"alpha": 1.0, **kw}
    with pytest.raises(exc, match=match):
        ops.accumulate_(a, g, kw.pop("alpha"), s, **kw)
    for t, t0 in zip(everything, before):
        assert torch.equal(t, t0)


@needs_ext
def test_accumulate_kernel_checks_arguments():
    g, acc = torch.randn(5), torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="accs"):
        torch.ops.incrkern.accumulate_([acc], [g], 1.0, [])
    assert torch.equal(acc, torch.zeros(5, dtype=torch.float64))


@needs_ext
def test_accumulate_opcheck():
    grads = [torch.randn(5), torch.randn(3).bfloat16()]
    accs = [torch.zeros(5), torch.zeros(3)]
    sqs = [torch.zeros(5), torch.zeros(3)]
    torch.library.opcheck(torch.ops.incrkern.accumulate_.default,
                          (accs, grads, 0.5, sqs), {"sq_alpha": 0.25, "sq_decay": 0.9})
    torch.library.opcheck(torch.ops.incrkern.accumulate_.default, ([], grads, 0.5, sqs))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 1])
def test_accumulate_cuda_matches_cpu(dtype, offset):
    # Many tensors (more than one launch's table) and one of several tables' chunks.
    sizes = SIZES + [3] * 300 + [65536 * 330 + 5]
    grads, accs, sqs = _make(dtype, sizes=sizes, offset=offset)
    cuda = [[cuda_copy(t, offset) for t in ts] for ts in (grads, accs, sqs)]
    ops.accumulate_(accs, grads, 0.3, sqs, sq_alpha=0.1, sq_decay=0.9)
    ops.accumulate_(cuda[1], cuda[0], 0.3, cuda[2], sq_alpha=0.1, sq_decay=0.9)
    torch.cuda.synchronize()
    # The GPU contracts a * b + c into one fused multiply-add: a few ulp apart.
    for c, e in zip(cuda[1] + cuda[2], accs + sqs):
        torch.testing.assert_close(c.cpu(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["acc", "sq", "both"])
def test_accumulate_cuda_first_tensor_empty(which):
    # An empty tensor's data pointer is null: it must not turn the call's other
    # accumulators off.
    grads = [torch.zeros(0, device="cuda"), torch.ones(10, device="cuda")]
    accs = [torch.zeros(0, device="cuda"), torch.zeros(10, device="cuda")]
    sqs = [torch.zeros(0, device="cuda"), torch.zeros(10, device="cuda")]
    ops.accumulate_(accs if which != "sq" else None, grads, 2.0,
                    sqs if which != "acc" else None, sq_alpha=3.0)
    torch.cuda.synchronize()
    assert torch.equal(accs[1].cpu(), torch.full((10,), 2.0 if which != "sq" else 0.0))
    assert torch.equal(sqs[1].cpu(), torch.full((10,), 3.0 if which != "acc" else 0.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accumulate_special_values(dtype):
    # Every fp16 bit pattern (subnormals, zeros of both signs, inf, NaN) widens exactly.
    if dtype == torch.float16:
        g = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    else:
        info = torch.finfo(dtype)
        g = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 8, info.max,
                          -info.max, float("inf"), float("-inf"), float("nan"), 1.0, -3.5],
                         dtype=dtype)
    acc, sq = torch.zeros(g.numel()), torch.zeros(g.numel())
    ops.accumulate_([acc], [g], 1.0, [sq], sq_alpha=1.0)
    torch.testing.assert_close(acc, g.float(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sq, g.float() * g.float(), rtol=0, atol=0, equal_nan=True)
