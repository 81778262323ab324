"""CUDA graph capture of a sparse step: the paths whose work is fixed (per-tensor
exact selection) are captured and replayed like eager steps; the others raise a
clear error under capture, before anything is touched. The refusals are checked on
any machine (capture simulated); the captures themselves need a GPU."""
import copy

import pytest
import torch

import incrkern
from helpers import capture_step, needs_ext, step_without_sync

LR = 2.0 ** -6

REFUSED = [
    (dict(density=0.1, scope="global"), "scope='global'"),
    (dict(density=0.1, topk="approx"), "topk='approx'"),
    (dict(density=0.1, select="random"), "select='random'"),
    (dict(density=0.5, select="layer"), "select='layer'"),
    (dict(density=0.1, mask=3), "mask=N"),
    (dict(density=0.1, mask="fixed"), "take that step before capturing"),
    (dict(density=0.1, accumulate_steps=2), "accumulate_steps"),
]

CAPTURABLE = [
    dict(density=0.1),
    dict(density=0.01, select="accumulated"),
    dict(density=0.1, select="grad_sq"),
    dict(density=0.1, select="weight", bias_correction="element"),
]


def _params(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(device).requires_grad_()
            for s in ((1000,), (31, 7), (5,))]


def _set_grads(*param_lists):
    gen = torch.Generator().manual_seed(len(param_lists))
    grads = [torch.randn(p.shape, generator=gen) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.to(p.device)
            else:
                p.grad.copy_(g)  # a captured graph reads the grads it was captured with


@pytest.fixture
def capturing(monkeypatch):
    """A CPU step that believes a CUDA stream is capturing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@needs_ext
@pytest.mark.parametrize("options,reason", REFUSED)
def test_uncapturable_steps_are_refused_before_anything_changes(capturing, options, reason):
    params = _params()
    opt = incrkern.optim.AdamW(params, lr=LR, **options)
    _set_grads(params)
    before = copy.deepcopy(([p.detach() for p in params], opt.state_dict()))
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph") as err:
        opt.step()
    assert reason in str(err.value)
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    assert not opt.state_dict()["state"] and not before[1]["state"]


@needs_ext
def test_sparse_gradients_are_refused_under_capture(capturing):
    emb = torch.nn.Embedding(50, 4, sparse=True)
    opt = incrkern.optim.Adam(emb.parameters(), lr=LR, density=0.5)
    emb(torch.tensor([1, 2, 2, 7])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


@needs_ext
@pytest.mark.parametrize("options", CAPTURABLE + [dict(density=0.1, mask="fixed")])
def test_capturable_steps_run_under_capture(capturing, options):
    """The guard lets these through (a fixed mask once its first step has made it);
    on the CPU the step then runs as usual."""
    params = _params()
    opt = incrkern.optim.AdamW(params, lr=LR, **options)
    if options.get("mask") == "fixed":
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
            _set_grads(params)
            opt.step()
    _set_grads(params)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True], ids=["composed", "fused"])
@pytest.mark.parametrize("options", CAPTURABLE + [dict(density=0.1, mask="fixed")])
def test_cuda_graph_replays_a_sparse_step(monkeypatch, options, fused):
    """Captured once, replayed 5 times with the lr changed in place between replays:
    the same params and state as eager steps (the fused select-and-update kernel, or
    select then update)."""
    monkeypatch.setattr(incrkern.ops, "FUSED_CUDA", fused)
    params, eager_params = _params("cuda"), _params("cuda")
    lr = torch.tensor(LR, device="cuda")
    captured = incrkern.optim.AdamW(params, lr=lr, capturable=True, **options)
    eager = incrkern.optim.AdamW(eager_params, lr=lr.clone(), capturable=True, **options)
    _set_grads(params, eager_params)
    graph = capture_step(captured, eager)  # the state (and a fixed mask) made before
    for call in range(5):
        _set_grads(params, eager_params)
        for opt in (captured, eager):
            opt.param_groups[0]["lr"].fill_(LR / (call + 1))
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
    for p, q in zip(params, eager_params):
        for key, value in captured.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, eager.state[q][key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True], ids=["composed", "fused"])
@pytest.mark.parametrize("options", [dict(), dict(select="accumulated")])
def test_cuda_sparse_step_does_not_sync(monkeypatch, fused, options):
    monkeypatch.setattr(incrkern.ops, "FUSED_CUDA", fused)
    params = _params("cuda")
    opt = incrkern.optim.AdamW(params, lr=torch.tensor(LR, device="cuda"), capturable=True,
                               density=0.05, **options)
    _set_grads(params)
    opt.step()  # the state made
    step_without_sync(opt)


@pytest.mark.cuda
def test_cuda_capture_of_a_global_selection_raises_clearly():
    params = _params("cuda")
    opt = incrkern.optim.AdamW(params, lr=torch.tensor(LR, device="cuda"), capturable=True,
                               density=0.1, scope="global")
    _set_grads(params)
    opt.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="scope='global'"):
        with torch.cuda.graph(graph):
            opt.step()
