"""A tensor lr: a step never reads its value on the host (on CUDA a read waits for the
device and breaks CUDA-graph capture); the kernels read it where it lives. LR
schedulers, which update such a tensor in place, keep working."""
import pytest
import torch

import incrkern
from helpers import capture_step, needs_ext, step_without_sync

# A power of two, as are its StepLR decays: a tensor lr (float32) and a Python one
# (double) then give bit-identical steps.
LR = 2.0 ** -6

CASES = [
    ("AdamW", {}),
    ("SGD", dict(momentum=0.9)),
    ("AdamW", dict(density=0.05)),                 # by positions
    ("AdamW", dict(density=0.3)),                  # through a mask (CPU, MASK_DENSITY)
    ("Adam", dict(density=0.05, accumulate_steps=2, bias_correction="element")),
    ("SGD", dict(momentum=0.9, density=0.1, select="accumulated")),
    ("AdamW", dict(density=0.1, mask="fixed")),
    ("AdamW", dict(density=0.5, select="layer")),
]


def _twin_params(device="cpu"):
    """Two equal lists of params."""
    params = [torch.randn(s, device=device).requires_grad_() for s in ((1000,), (31, 7), (5,))]
    return params, [p.detach().clone().requires_grad_() for p in params]


def _set_grads(*param_lists):
    grads = [torch.randn_like(p) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone()


def _item_raises(self):
    raise AssertionError("Tensor.item() called during a step")


@needs_ext  # the reference ops read lr_tensor on the host
@pytest.mark.parametrize("name,kwargs", CASES)
def test_step_never_reads_a_tensor_lr(monkeypatch, name, kwargs):
    params, twin_params = _twin_params()
    ours = getattr(incrkern.optim, name)(params, lr=torch.tensor(LR), **kwargs)
    twin = getattr(incrkern.optim, name)(twin_params, lr=LR, **kwargs)
    for call in range(5):
        _set_grads(params, twin_params)
        torch.manual_seed(call)  # the same random draws ("layer") for both
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", _item_raises)
            ours.step()
        torch.manual_seed(call)
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def _run_scheduled(make_ours, make_theirs, steps=7):
    """Both optimizers on twin params under StepLR(step_size=2, gamma=0.5); returns
    them and their params."""
    params, their_params = _twin_params()
    ours, theirs = make_ours(params), make_theirs(their_params)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
                 for o in (ours, theirs)]
    for _ in range(steps):
        _set_grads(params, their_params)
        ours.step()
        theirs.step()
        for s in schedules:
            s.step()
    return ours, theirs, params, their_params


@pytest.mark.parametrize("kwargs", [{}, dict(density=0.1, select="accumulated")])
def test_scheduler_updates_a_tensor_lr(kwargs):
    ours, twin, params, float_params = _run_scheduled(
        lambda ps: incrkern.optim.AdamW(ps, lr=torch.tensor(LR), **kwargs),
        lambda ps: incrkern.optim.AdamW(ps, lr=LR, **kwargs))
    lr = ours.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    assert float(lr) == LR * 0.5 ** 3 == twin.param_groups[0]["lr"]
    for p, q in zip(params, float_params):
        assert torch.equal(p, q)


def test_scheduler_with_a_tensor_lr_equals_torch():
    _, _, params, torch_params = _run_scheduled(
        lambda ps: incrkern.optim.AdamW(ps, lr=torch.tensor(0.01)),
        lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(0.01), foreach=False))
    for p, q in zip(params, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr", [torch.zeros(2), torch.tensor(1), torch.tensor([[0.1]]).int()])
def test_a_bad_tensor_lr_is_refused_before_anything_changes(lr):
    params, _ = _twin_params()
    before = [p.detach().clone() for p in params]
    opt = incrkern.optim.AdamW(params, lr=0.01)
    opt.param_groups[0]["lr"] = lr
    _set_grads(params)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert not opt.state
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# ----------------------------------------------------------------------------------
# CUDA: no host sync, and a captured step replays as the eager one


def _cuda_optimizer(params, name="AdamW"):
    lr = torch.tensor(LR, device="cuda")
    if name == "SGD":
        return incrkern.optim.SGD(params, lr=lr, momentum=0.9)
    return getattr(incrkern.optim, name)(params, lr=lr, capturable=True)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_step_with_a_tensor_lr_does_not_sync(name):
    params, twin_params = _twin_params("cuda")
    ours = _cuda_optimizer(params, name)
    twin = getattr(incrkern.optim, name)(twin_params, lr=LR,
                                         **(dict(momentum=0.9) if name == "SGD" else {}))
    for call in range(3):
        _set_grads(params, twin_params)
        if call == 0:
            ours.step()  # creates the state
        else:
            step_without_sync(ours)
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_cuda_graph_replays_a_dense_step(name):
    params, eager_params = _twin_params("cuda")
    captured = _cuda_optimizer(params, name)
    eager = _cuda_optimizer(eager_params, name)
    _set_grads(params, eager_params)
    graph = capture_step(captured, eager)
    for call in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, eager_params, grads):
            p.grad.copy_(g)  # the graph reads the grads it was captured with, in place
            q.grad.copy_(g)
        if call == 2:  # a schedule changes the lr tensor in place; the graph reads it
            for opt in (captured, eager):
                opt.param_groups[0]["lr"].fill_(LR / 2)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
