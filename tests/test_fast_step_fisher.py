"""select="grad_sq" in the one-call step on the CPU, whose kernel forms the Fisher's EMA
where it reads the keys (a large tensor's listing or counting pass; any other tensor's
first, in cache), against the Python step, which accumulates the Fisher (accumulate_)
before the fused op reads it: bit-identical params, state and Fisher on every path of
the kernel (the band's tile lists, the threshold stream, the nonzero tiles, the zeros'
prefix, the fallbacks), every dtype, ties, zeros and non-finite gradients."""
import pytest
import torch

import incrkern
from incrkern.optim import fast_step

from helpers import recorded, results_in_children
from test_fast_step import make_params

pytestmark = pytest.mark.skipif(fast_step._fused_adam_step is None,
                                reason="the extension is not built")

# Two tensors past the one-thread limit (2^20 elements) taking the band's path over
# both threads, odd and not a multiple of a tile; two small ones, selected on one thread.
SIZES = (2 ** 20 + 37, 3 * 2 ** 19 + 5, 4099, 700)
ROW = 384


@pytest.fixture
def spy(monkeypatch):
    return recorded(monkeypatch, "_fused_adam_step")


def gradient(kind, n, step, dtype):
    """A gradient of n elements shaped as `kind`:
    heavy: Student-t with 30% exact zeros and a run of ties;
    rows: an embedding's, nonzero in 1.5% of its rows of ROW, some rows in every step;
    sparse: nonzero at 0.2% of the positions (the Fisher's k-th at 0 from 0.01 on);
    nonfinite: heavy, with NaN, inf and -inf at a few positions."""
    gen = torch.Generator().manual_seed(1000 * step + n % 997)
    if kind == "sparse":
        g = torch.zeros(n)
        # unique positions: index_put_ leaves a repeated one to whichever write lands last
        at = torch.unique(torch.randint(0, n, (max(1, n // 500),), generator=gen))
        g[at] = torch.randn(at.numel(), generator=gen)
        return g.to(dtype)
    if kind == "rows":
        rows = (n + ROW - 1) // ROW
        g = torch.zeros(rows, ROW)
        used = torch.unique(torch.cat([torch.arange(0, rows, 97)[:4],
                                       torch.randint(0, rows, (max(1, rows // 80),),
                                                     generator=gen)]))
        g[used] = torch.randn(used.numel(), ROW, generator=gen)
        return g.flatten()[:n].to(dtype)
    g = torch.distributions.StudentT(2.0).sample((n,))
    g[torch.rand(n, generator=gen) < 0.3] = 0.0
    g[: n // 8] = g[n // 3]  # a run of ties
    if kind == "nonfinite" and n > 100:
        g[torch.randint(0, n, (3,), generator=gen)] = float("nan")
        g[n // 2] = float("inf")
        g[n - 5] = float("-inf")
    return g.to(dtype)


def assert_same(fast, slow, fast_params, slow_params):
    """Params, state and group options bit-identical (NaN included: non-finite
    gradients reach the chosen params)."""
    def same(a, b):
        return a.dtype == b.dtype and torch.equal(a.detach().view(-1).view(torch.uint8),
                                                  b.detach().view(-1).view(torch.uint8))
    assert all(same(p, q) for p, q in zip(fast_params, slow_params))
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state["param_groups"] == slow_state["param_groups"]
    for i, s in slow_state["state"].items():
        assert fast_state["state"][i].keys() == s.keys()
        for key, t in s.items():
            assert same(fast_state["state"][i][key], t), (i, key)


def run(params, kind, steps, enabled, monkeypatch, **options):
    """AdamW with `options` over params, `steps` steps of `kind`'s gradients, the
    one-call step on or off."""
    monkeypatch.setattr(fast_step, "ENABLED", enabled)
    torch.manual_seed(0)
    opt = incrkern.optim.AdamW(params, lr=1e-2, weight_decay=0.05, **options)
    for step in range(steps):
        for p in params:
            p.grad = gradient(kind, p.numel(), step, p.dtype)
        opt.step()
    return opt


def assert_as_python(sizes, dtype, kind, monkeypatch, spy, steps=3, taken=True, **options):
    """The one-call step and the Python step from the same params and gradients:
    bit-identical, the call taken from the second step on (or, not `taken`, never)."""
    fast_params, slow_params = make_params(sizes, dtype), make_params(sizes, dtype)
    fast = run(fast_params, kind, steps, True, monkeypatch, **options)
    if taken:  # the first step makes the state in Python; every later one is the C++ call
        assert spy[0] is None and len(spy) == steps and None not in spy[1:]
    else:  # the Python step's: the call declined, or never asked
        assert all(a is None for a in spy)
    slow = run(slow_params, kind, steps, False, monkeypatch, **options)
    assert_same(fast, slow, fast_params, slow_params)
    return fast


@pytest.mark.parametrize("kind", ["heavy", "rows", "sparse", "nonfinite"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.03, 0.3])
@pytest.mark.parametrize("topk", ["exact", "approx"])
def test_same_as_the_python_step(kind, density, topk, spy, monkeypatch):
    """fp32 over the densities of the tile lists (0.001, 0.01), of the stream below the
    composed keyed step's (0.03) and of both's stream (0.3)."""
    assert_as_python(SIZES, torch.float32, kind, monkeypatch, spy, select="grad_sq",
                     density=density, topk=topk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["heavy", "rows"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3])
def test_16_bit_params(dtype, kind, density, spy, monkeypatch):
    """bf16 and fp16 params and grads, whose Fisher is fp32."""
    opt = assert_as_python(SIZES, dtype, kind, monkeypatch, spy, select="grad_sq",
                           density=density)
    assert all(s["fisher"].dtype == torch.float32 for s in opt.state.values())


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3])
@pytest.mark.parametrize("kind", ["heavy", "rows"])
def test_forced_fallback(when, density, kind, spy, monkeypatch):
    """A band refused before the listing or counting pass (the EMA formed then, over
    every thread) or after it (formed by the pass): select's positions over the Fisher."""
    monkeypatch.setenv("INCRKERN_FUSED_FALLBACK", when)
    assert_as_python(SIZES, torch.float32, kind, monkeypatch, spy, select="grad_sq",
                     density=density)


@pytest.mark.parametrize("density", [1e-7, 1 - 1e-7])
def test_one_or_every_element_chosen(density, spy, monkeypatch):
    """k = 1 and k = n (density_k rounds up): the Fisher's EMA formed all the same."""
    opt = assert_as_python(SIZES[:2], torch.float32, "heavy", monkeypatch, spy,
                           select="grad_sq", density=density)
    assert all(s["fisher"].any() for s in opt.state.values())


def test_portable_loops_same_answer(tmp_path):
    """The portable loops (INCRKERN_CPU_BASELINE=1, in a child process) form the same
    Fisher and update the same elements as the vector ones."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import incrkern\n"
        "from test_fast_step import make_params\n"
        "from test_fast_step_fisher import SIZES, gradient\n"
        "torch.manual_seed(0)\n"
        "out = []\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    for density in (0.001, 0.3):\n"
        "        params = make_params(SIZES, dtype)\n"
        "        opt = incrkern.optim.AdamW(params, select='grad_sq', density=density)\n"
        "        for step in range(3):\n"
        "            for p in params:\n"
        "                p.grad = gradient('heavy', p.numel(), step, dtype)\n"
        "            opt.step()\n"
        "        out.append([t.clone() for p in params for t in\n"
        "                    (p.detach(), opt.state[p]['fisher'], opt.state[p]['exp_avg'])])\n"
        "torch.save(out, sys.argv[1])\n")
    results = results_in_children(code, ({}, {"INCRKERN_CPU_BASELINE": "1"}), tmp_path)
    assert len(results[0]) == len(results[1]) == 6
    for a, b in zip(*results):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
