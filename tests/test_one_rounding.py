"""One rounding of each update rule on the CPU, whatever path applies it: an element
updated densely, by mask, by position, by the fused select-and-update's tile lists,
threshold stream, zero floor or one-thread path, in a tensor at any alignment, comes out bit
for bit the same. A shard cut at another offset (a checkpoint resumed on another
world size) then rounds as the whole tensor did."""
import math

import pytest
import torch

import incrkern
from incrkern import ops, reference
from helpers import needs_ext

N = 4099  # not a multiple of any vector width
OFFSETS = [0, 1, 3, 7, 17]
ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=True)
SGD = dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)


def tensors(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return dict(p=torch.randn(n, generator=gen), g=torch.randn(n, generator=gen),
                m=torch.randn(n, generator=gen) * 0.1, v=torch.rand(n, generator=gen) * 0.01)


def adam_at(x, offset, **form):
    """adam_update_ on copies of x[offset:]: the results, as full-length tensors."""
    p, g, m, v = (x[key][offset:].clone() for key in "pgmv")
    ops.adam_update_([p], [g], [m], [v], [torch.tensor(3.0)], **ADAM, **form)
    return [torch.cat([x[key][:offset], t]) for key, t in zip("pmv", (p, m, v))]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_ext
def test_adam_every_form_and_alignment_rounds_alike():
    x = tensors(N, 0)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.3
    expected = adam_at(x, 0, masks=[mask])
    for offset in OFFSETS:
        shifted = mask[offset:]
        chosen = shifted.nonzero().squeeze(1)
        for form in (dict(masks=[shifted.clone()]), dict(indices=[chosen])):
            got = adam_at(x, offset, **form)
            assert_same([t[offset:] for t in got], [t[offset:] for t in expected])
    dense = adam_at(x, 0)
    for offset in OFFSETS[1:]:
        assert_same([t[offset:] for t in adam_at(x, offset)], [t[offset:] for t in dense])
    # dense and by mask agree on the chosen elements
    for a, b in zip(dense, expected):
        assert torch.equal(a[mask], b[mask])


@needs_ext
def test_sgd_every_form_and_alignment_rounds_alike():
    x = tensors(N, 2)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) < 0.3
    results = []
    for offset in OFFSETS:
        for form in ("masks", "indices"):
            p, g, b = (x[key][offset:].clone() for key in "pgm")
            chosen = mask[offset:]
            sel = dict(masks=[chosen.clone()]) if form == "masks" else \
                dict(indices=[chosen.nonzero().squeeze(1)])
            ops.sgd_update_([p], [g], [b], **SGD, **sel)
            results.append((offset, p, b))
    _, p0, b0 = results[0]
    for offset, p, b in results[1:]:
        assert torch.equal(p, p0[offset:]) and torch.equal(b, b0[offset:])


def fused_against_positions(n, grad, k, residual=None):
    """adam_select_update_ against select's positions then adam_update_: bit for bit."""
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    fused = [p.clone(), m.clone(), v.clone()]
    r_fused = None if residual is None else residual.clone()
    ops.adam_select_update_([fused[0]], [grad], [fused[1]], [fused[2]], [torch.tensor(3.0)],
                            [k], None if residual is None else [r_fused], **ADAM)
    source = grad if residual is None else residual + grad
    chosen = reference.select([source], [k], "grad")[0]
    composed = [p.clone(), m.clone(), v.clone()]
    ops.adam_update_([composed[0]], [source.clone()], [composed[1]], [composed[2]],
                     [torch.tensor(3.0)], indices=[chosen], **ADAM)
    assert_same(fused, composed)


@needs_ext
@pytest.mark.parametrize("n,density", [(200_003, 0.01), (200_003, 0.1), (1_100_007, 0.01),
                                       (1_100_007, 0.2)])
def test_fused_rounds_as_the_positional_update(n, density):
    """The one-thread path (positions, then the threshold stream), the tile lists, the
    threshold stream over blocks; with a residual too."""
    grad = torch.randn(n, generator=torch.Generator().manual_seed(5))
    fused_against_positions(n, grad, math.ceil(density * n))
    fused_against_positions(n, grad, math.ceil(density * n), residual=torch.randn(n))


@needs_ext
def test_fused_zero_floor_rounds_as_the_positional_update():
    """The zero floor's dense prefix and its tiles past it."""
    n = 1_100_007
    grad = torch.zeros(n)
    rows = torch.randperm(n // 64, generator=torch.Generator().manual_seed(6))[:n // 6400]
    for r in rows.tolist():
        grad[r * 64:(r + 1) * 64] = torch.randn(64)
    fused_against_positions(n, grad, n // 10)
    fused_against_positions(n, grad, n // 10, residual=torch.zeros(n))


def _embedding_grad(step, rows=30_000, width=40):
    """An embedding's gradient: 300 random rows nonzero (1% of the elements)."""
    g = torch.zeros(rows, width)
    hot = torch.randperm(rows, generator=torch.Generator().manual_seed(step))[:300]
    g[hot] = torch.randn(300, width, generator=torch.Generator().manual_seed(100 + step))
    return g


@needs_ext
@pytest.mark.parametrize("options", [dict(accumulate_steps=2), dict(select="accumulated")])
def test_optimizer_fused_zero_floor_equals_composed(monkeypatch, options):
    """incrkern.optim.AdamW at density 0.1 on a 1.2M-element embedding whose gradient
    has fewer nonzeros than k: the fused step (its zero floor) and the composed one
    (select, then update) leave the same params and state, bit for bit."""
    from incrkern.optim import base

    def train(fused):
        if not fused:
            monkeypatch.setattr(base, "use_fused", lambda *args, **kwargs: False)
        p = torch.nn.Parameter(torch.randn(30_000, 40, generator=torch.Generator().manual_seed(1)))
        opt = incrkern.optim.AdamW([p], lr=1e-2, density=0.1, **options)
        for step in range(6):
            p.grad = _embedding_grad(step)
            opt.step()
        monkeypatch.undo()
        state = opt.state[p]
        return [p.detach()] + [state[key] for key in sorted(state) if torch.is_tensor(state[key])]

    assert_same(train(True), train(False))
