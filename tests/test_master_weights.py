"""master_weights=True: bf16/fp16 params are stepped through an fp32 master copy
(state key "master_weight"), as apex's and torchao's optimizers offer: the master
follows fp32 training exactly, the param is the master rounded, updates smaller than
a bf16 ulp are kept, and the sparse paths change only their chosen elements."""
import copy
import math

import pytest
import torch

import incrkern
from helpers import needs_ext

SHAPES = [(300,), (17, 9), (1,)]


def params_of(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def grads_for(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_dense_master_follows_fp32_training(dtype, name):
    """At density 1 the master is torch's fp32 optimizer fed the same (bf16) grads,
    and the param is the master rounded to its dtype."""
    ours = params_of(dtype)
    fp32 = [p.detach().float().requires_grad_() for p in ours]
    kwargs = dict(lr=1e-2) if name == "AdamW" else dict(lr=1e-2, momentum=0.9)
    opt = getattr(incrkern.optim, name)(ours, master_weights=True, **kwargs)
    ref = getattr(torch.optim, name)(fp32, **kwargs)
    for step in range(5):
        for p, q, g in zip(ours, fp32, grads_for(ours, step)):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
    for p, q in zip(ours, fp32):
        master = opt.state[p]["master_weight"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master.to(dtype))


@needs_ext
def test_updates_below_a_bf16_ulp_are_kept():
    """Steps of 1e-5 on params near 0.75 (a bf16 ulp there is 2^-8): each rounds away
    without a master, so the params never move; with one they add up, and after 400
    steps every param has moved."""
    plain = [torch.full(s, 0.75, dtype=torch.bfloat16, requires_grad=True) for s in SHAPES]
    mastered = [p.detach().clone().requires_grad_() for p in plain]
    opts = [incrkern.optim.SGD(plain, lr=1e-5),
            incrkern.optim.SGD(mastered, lr=1e-5, master_weights=True)]
    for step in range(400):
        for ps, opt in zip((plain, mastered), opts):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
    assert all(bool((p == 0.75).all()) for p in plain)
    assert all(bool((p < 0.75).all()) for p in mastered)
    fp32 = torch.full((1,), 0.75, requires_grad=True)
    ref = torch.optim.SGD([fp32], lr=1e-5)
    for step in range(400):
        fp32.grad = torch.ones_like(fp32)
        ref.step()
    for p in mastered:
        master = opts[1].state[p]["master_weight"]
        torch.testing.assert_close(master, fp32.detach().expand_as(master))


OPTIONS = [dict(density=0.1), dict(density=0.1, select="accumulated"),
           dict(density=0.1, mask="fixed"), dict(density=0.5, select="weight"),
           dict(density=0.1, accumulate_steps=2), dict(density=0.1, topk="approx")]


@needs_ext
@pytest.mark.parametrize("options", OPTIONS)
def test_sparse_steps_change_only_the_chosen_elements(options):
    """The masters of unchosen elements stay as they were, the params are the masters
    rounded, and a bf16 run with masters equals an fp32 run whose params are rounded
    to bf16 only for reading."""
    ours = params_of(torch.bfloat16)
    opt = incrkern.optim.AdamW(ours, lr=1e-2, master_weights=True, **options)
    twin = [p.detach().float().requires_grad_() for p in ours]
    ref = incrkern.optim.AdamW(twin, lr=1e-2, **options)
    for step in range(4):
        masters_before = [opt.state[p]["master_weight"].clone()
                          if "master_weight" in opt.state[p] else None for p in ours]
        grads = grads_for(ours, step)
        for p, q, g in zip(ours, twin, grads):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        for p, q, before in zip(ours, twin, masters_before):
            if "master_weight" not in opt.state[p]:  # accumulate_steps: no update yet
                continue
            master = opt.state[p]["master_weight"]
            assert torch.equal(p.detach(), master.to(torch.bfloat16))
            torch.testing.assert_close(master, q.detach(), rtol=1e-5, atol=1e-6)
            if before is not None and "exp_avg" in opt.state[p]:
                moved = master != before
                assert int(moved.sum()) <= math.ceil(options["density"] * p.numel() * 1.01) + 1


@needs_ext
def test_state_dict_round_trip_keeps_the_master():
    ps = params_of(torch.bfloat16)
    opt = incrkern.optim.AdamW(ps, lr=1e-2, density=0.1, master_weights=True)
    for p, g in zip(ps, grads_for(ps, 0)):
        p.grad = g
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all("master_weight" in s for s in saved["state"].values())
    qs = [p.detach().clone().requires_grad_() for p in ps]
    other = incrkern.optim.AdamW(qs, lr=1e-2, density=0.1, master_weights=True)
    other.load_state_dict(saved)
    for step in (1, 2):
        for p, q, g in zip(ps, qs, grads_for(ps, step)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        other.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_weight"], other.state[q]["master_weight"])


@needs_ext
def test_fp32_params_keep_no_master_and_sparse_grads_work():
    emb = torch.nn.Embedding(40, 6, sparse=True).to(torch.bfloat16)
    lin = torch.nn.Linear(6, 2)
    opt = incrkern.optim.Adam([*emb.parameters(), *lin.parameters()], lr=1e-2, density=0.5,
                              master_weights=True)
    lin(emb(torch.tensor([1, 2, 2, 7])).float()).sum().backward()
    before = emb.weight.detach().clone()
    opt.step()
    assert "master_weight" not in opt.state[lin.weight]
    master = opt.state[emb.weight]["master_weight"]
    assert torch.equal(emb.weight.detach(), master.to(torch.bfloat16))
    changed_rows = (emb.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert set(changed_rows) <= {1, 2, 7} and changed_rows


def test_master_weights_refuse_differentiable():
    with pytest.raises(ValueError, match="master_weights"):
        incrkern.optim.AdamW(params_of(torch.float32), differentiable=True,
                             master_weights=True)
