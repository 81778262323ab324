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
from incrkern.optim import base, fast_step

from helpers import recorded
from test_fast_step import make_params
from test_fast_step_fisher import assert_as_python, assert_same, run

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


@pytest.mark.parametrize("options", [dict(density=0.01, topk="approx"),
                                     dict(density=0.2, topk="approx"),
                                     dict(density=0.2, select="weight")],
                         ids=["approx-lists", "approx", "weight"])
def test_left_to_the_python_step(options, spy, monkeypatch):
    """approx and the other selects: the Python step's."""
    check(torch.float32, "heavy", monkeypatch, spy, taken=False, **options)


def test_below_fused_global_density(spy, monkeypatch):
    """Below base.FUSED_GLOBAL_DENSITY (raised here): the Python step's."""
    monkeypatch.setattr(base, "FUSED_GLOBAL_DENSITY", 0.02)
    check(torch.float32, "heavy", monkeypatch, spy, taken=False, density=0.01)
