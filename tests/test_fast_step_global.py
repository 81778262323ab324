"""scope="global" in the one-call step on the CPU (Adam by |grad| or error feedback,
exact): one band on the concatenation's k-th, then over every tensor's blocks the
threshold stream (its counting pass and streaming loop) or, below the stream's
densities, the tile lists (the listing pass, the candidates chosen over every block,
the listed elements updated), against the Python step's select(scope="global") then
update: bit-identical params, state and residuals, ties to the lowest position in the
concatenation, every dtype, the fallbacks, and the groups it leaves to the Python
step."""
import pytest
import torch

import incrkern
from incrkern import ops, reference
from incrkern.optim import base, fast_step

from helpers import recorded
from test_fast_step import make_params
from test_fast_step_fisher import assert_as_python, assert_same, gradient, run

pytestmark = pytest.mark.skipif(fast_step._fused_adam_step is None,
                                reason="the extension is not built")

# Tensors past a block and under it, an odd one, one of a single element: the global
# k falls across them.
SIZES = (2 ** 18 + 37, 4099, 1, 3 * 2 ** 16 + 5, 700)


@pytest.fixture
def spy(monkeypatch):
    return recorded(monkeypatch, "_fused_adam_step")


def check(dtype, kind, monkeypatch, spy, taken=True, **options):
    """assert_as_python over SIZES with scope="global"."""
    assert_as_python(SIZES, dtype, kind, monkeypatch, spy, taken=taken, scope="global",
                     **options)


@pytest.mark.parametrize("kind", ["heavy", "rows", "sparse", "nonfinite"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.03, 0.1, 0.5, 0.97])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_same_as_the_python_step(kind, density, select, spy, monkeypatch):
    """fp32 from the tile lists' densities (0.001, 0.01) through the global stream's
    (the Python step's positions below MASK_DENSITY, its masks from it) to near 1;
    heavy-tailed gradients with a run of ties, an embedding's rows, 0.2% nonzero (the
    k-th among zeros: the sample's band too wide, select's positions) and NaN and inf."""
    check(torch.float32, kind, monkeypatch, spy, density=density, select=select)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.005, 0.05, 0.3])
def test_16_bit_params(dtype, density, spy, monkeypatch):
    check(dtype, "heavy", monkeypatch, spy, density=density)


def test_mixed_dtypes(spy, monkeypatch):
    """fp32, bf16 and fp16 params in one global group: one order of their keys."""
    def mixed(sizes):
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        return [torch.nn.Parameter(p.detach().to(dtypes[i % 3]))
                for i, p in enumerate(make_params(sizes, torch.float32))]
    fast_params, slow_params = mixed(SIZES), mixed(SIZES)
    fast = run(fast_params, "heavy", 3, True, monkeypatch, scope="global", density=0.2)
    assert all(a is not None for a in spy[1:])
    slow = run(slow_params, "heavy", 3, False, monkeypatch, scope="global", density=0.2)
    assert_same(fast, slow, fast_params, slow_params)


@pytest.mark.parametrize("density", [0.005, 0.2])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_forced_fallback(when, select, density, spy, monkeypatch):
    """A band refused before the listing or counting pass or after it: select's
    positions over the concatenation, then their update (error feedback's r + g formed
    by the pass that was refuted, not again)."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    check(torch.float32, "heavy", monkeypatch, spy, density=density, select=select)


def test_every_element_chosen(spy, monkeypatch):
    """k = the concatenation's numel (density_k rounds up): the dense rule."""
    check(torch.float32, "heavy", monkeypatch, spy, density=1 - 1e-7)


@pytest.mark.parametrize("options", [dict(density=0.2, select="weight"),
                                     dict(density=0.01, select="grad_sq"),
                                     dict(density=0.01, accumulate_steps=2)],
                         ids=["weight", "grad_sq", "accumulate_steps"])
def test_left_to_the_python_step(options, spy, monkeypatch):
    """The other selects and accumulate_steps: the Python step's."""
    check(torch.float32, "heavy", monkeypatch, spy, taken=False, **options)


def test_below_fused_global_density(spy, monkeypatch):
    """Below base.FUSED_GLOBAL_DENSITY (raised here): the Python step's."""
    monkeypatch.setattr(base, "FUSED_GLOBAL_DENSITY", 0.02)
    check(torch.float32, "heavy", monkeypatch, spy, taken=False, density=0.01)


def step_chosen(opt, params, select):
    """One step of opt; returns the concatenation's order keys before it (|g|, or
    |r + g| with error feedback: reference.select_scores) and whether each element was
    updated (its param, exp_avg or exp_avg_sq changed bits: a chosen zero gradient with
    zero state still moves its param by the weight decay)."""
    state = [opt.state[p] for p in params]
    before = [(p.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
              for p, s in zip(params, state)]
    residuals = [s["residual"].clone() for s in state] if select == "accumulated" else ()
    keys = torch.cat(reference.select_scores([p.grad for p in params], select, residuals))
    opt.step()

    def changed(a, b):
        return a.view(-1).view(torch.int32) != b.view(-1).view(torch.int32)
    return keys, torch.cat([changed(w, p.detach()) | changed(m, s["exp_avg"])
                            | changed(v, s["exp_avg_sq"])
                            for (w, m, v), p, s in zip(before, params, state)])


@pytest.mark.parametrize("kind", ["heavy", "rows"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_approx(kind, density, select, spy, monkeypatch):
    """topk="approx" (the tile lists at 0.001 and 0.01, the stream at 0.1): every step a
    whole top set of the concatenation's keys, its count within select's tolerance of k;
    where every count is k, params and state bit-identical to the exact Python step's."""
    fast_params, slow_params = make_params(SIZES, torch.float32), make_params(SIZES, torch.float32)
    k = ops.density_k(density, sum(SIZES))
    tolerance = max(1, int(ops.APPROX_COUNT_TOLERANCE * k))
    monkeypatch.setattr(fast_step, "ENABLED", True)
    torch.manual_seed(0)
    fast = incrkern.optim.AdamW(fast_params, lr=1e-2, weight_decay=0.05, scope="global",
                                density=density, select=select, topk="approx")
    counts = []
    for step in range(3):
        for p in fast_params:
            p.grad = gradient(kind, p.numel(), step, p.dtype)
        if step == 0:  # the state is made by the Python step
            fast.step()
            continue
        keys, chosen = step_chosen(fast, fast_params, select)
        counts.append(int(chosen.sum()))
        assert abs(counts[-1] - k) <= tolerance, (counts[-1], k)
        assert keys[chosen].min() >= keys[~chosen].max()
    assert spy[0] is None and None not in spy[1:]
    if counts == [k, k]:
        slow = run(slow_params, kind, 3, False, monkeypatch, scope="global", density=density,
                   select=select)
        fast.param_groups[0]["topk"] = "exact"  # the one option the two runs differ in
        assert_same(fast, slow, fast_params, slow_params)


# An embedding's gradient past the one-thread limit (nonzero in a few rows) beside
# heavy-tailed ones: the stream lists its blocks instead of streaming them.
MIXED = ((3 * 2 ** 19 + 5, "rows"), (2 ** 18 + 37, "heavy"), (4099, "heavy"), (700, "heavy"))


def adamw(params, **options):
    return incrkern.optim.AdamW(params, lr=1e-2, weight_decay=0.05, **options)


def sgd(params, **options):
    return incrkern.optim.SGD(params, lr=1e-2, **options)


def run_kinds(make, params, kinds, steps, enabled, monkeypatch, **options):
    """make(params, scope="global", **options) (adamw or sgd), `steps` steps, each param's
    gradients of its kind, the one-call step on or off."""
    monkeypatch.setattr(fast_step, "ENABLED", enabled)
    torch.manual_seed(0)
    opt = make(params, scope="global", **options)
    for step in range(steps):
        for p, kind in zip(params, kinds):
            p.grad = gradient(kind, p.numel(), step, p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("when", [None, "after"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.03, 0.06])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_mostly_zero_tensor_listed(select, density, dtype, when, spy, monkeypatch):
    """The stream's densities with a mostly-zero tensor among the others: its winners,
    and its candidates above the k-th or among the ties taken, as the Python step's
    (and the fallback after a refuted band)."""
    if when:
        monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    sizes = [n for n, _ in MIXED]
    fast_params, slow_params = make_params(sizes, dtype), make_params(sizes, dtype)
    kinds = [kind for _, kind in MIXED]
    fast = run_kinds(adamw, fast_params, kinds, 3, True, monkeypatch, density=density,
                     select=select)
    assert spy[0] is None and None not in spy[1:]
    slow = run_kinds(adamw, slow_params, kinds, 3, False, monkeypatch, density=density,
                     select=select)
    assert_same(fast, slow, fast_params, slow_params)


# SGD: its one-call step (fused_sgd_step) runs the same global passes over SgdTensors.
SGD_MOMENTA = [dict(momentum=0.9, nesterov=True, weight_decay=0.05), dict(momentum=0.0)]


@pytest.fixture
def sgd_spy(monkeypatch):
    return recorded(monkeypatch, "_fused_sgd_step")


def assert_sgd_as_python(sizes, kinds, dtype, sgd_spy, monkeypatch, **options):
    """SGD's one-call step and its Python step from the same params and gradients:
    bit-identical, the call taken from the second step on (the first makes the state)."""
    fast_params, slow_params = make_params(sizes, dtype), make_params(sizes, dtype)
    fast = run_kinds(sgd, fast_params, kinds, 3, True, monkeypatch, **options)
    assert len(sgd_spy) == 3 and sgd_spy[0] is None
    assert all(answer is not None and all(answer) for answer in sgd_spy[1:])
    slow = run_kinds(sgd, slow_params, kinds, 3, False, monkeypatch, **options)
    assert_same(fast, slow, fast_params, slow_params)
    return fast


@pytest.mark.parametrize("kind", ["heavy", "rows", "sparse", "nonfinite"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.97])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
@pytest.mark.parametrize("momenta", SGD_MOMENTA, ids=["nesterov", "plain"])
def test_sgd_same_as_the_python_step(kind, density, select, momenta, sgd_spy, monkeypatch):
    """The tile lists (0.001, 0.01) and the stream (0.1, 0.97), with and without a
    momentum buffer, |g| and error feedback."""
    assert_sgd_as_python(SIZES, [kind] * len(SIZES), torch.float32, sgd_spy, monkeypatch,
                         density=density, select=select, **momenta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.005, 0.3])
def test_sgd_16_bit_params(dtype, density, sgd_spy, monkeypatch):
    assert_sgd_as_python(SIZES, ["heavy"] * len(SIZES), dtype, sgd_spy, monkeypatch,
                         density=density, **SGD_MOMENTA[0])


@pytest.mark.parametrize("density", [0.005, 0.2])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_sgd_forced_fallback(when, select, density, sgd_spy, monkeypatch):
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    assert_sgd_as_python(SIZES, ["heavy"] * len(SIZES), torch.float32, sgd_spy, monkeypatch,
                         density=density, select=select, **SGD_MOMENTA[0])


@pytest.mark.parametrize("density", [0.03, 0.06])
@pytest.mark.parametrize("select", ["grad", "accumulated"])
def test_sgd_mostly_zero_tensor_listed(select, density, sgd_spy, monkeypatch):
    assert_sgd_as_python([n for n, _ in MIXED], [kind for _, kind in MIXED], torch.float32,
                         sgd_spy, monkeypatch, density=density, select=select,
                         **SGD_MOMENTA[0])


@pytest.mark.parametrize("density", [0.01, 0.1])
def test_sgd_approx(density, sgd_spy, monkeypatch):
    """topk="approx" taken by the call; on these gradients its band holds k exactly, so
    the run is bit-identical to the exact Python step's."""
    kinds = ["heavy"] * len(SIZES)
    fast_params, slow_params = make_params(SIZES, torch.float32), make_params(SIZES, torch.float32)
    fast = run_kinds(sgd, fast_params, kinds, 3, True, monkeypatch, density=density,
                     topk="approx", **SGD_MOMENTA[0])
    assert sgd_spy[0] is None and None not in sgd_spy[1:]
    slow = run_kinds(sgd, slow_params, kinds, 3, False, monkeypatch, density=density,
                     **SGD_MOMENTA[0])
    fast.param_groups[0]["topk"] = "exact"  # the one option the two runs differ in
    assert_same(fast, slow, fast_params, slow_params)
