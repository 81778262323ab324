"""Sparse COO gradients (nn.Embedding(sparse=True) and others): lazy updates of the
present elements, equal to torch.optim.SparseAdam (Adam) and torch.optim.SGD at
density 1, and to a dense reference at any density."""
import copy
import math

import pytest
import torch
from torch import nn

import incrkern
from incrkern import reference
from reference_optim import topk_lowest_index


def embedding_pair(sparse=True, num=50, dim=8, dtype=torch.float32):
    torch.manual_seed(0)
    a = nn.Embedding(num, dim, sparse=sparse).to(dtype)
    b = copy.deepcopy(a)
    return a, b


def embedding_steps(modules_and_opts, steps=8, num=50):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, num // 2, (30,), generator=g)  # repeats: duplicate indices
        w = torch.randn(30, modules_and_opts[0][0].embedding_dim, generator=g)
        for module, opt in modules_and_opts:
            opt.zero_grad()
            (module(x) * w.to(module.weight.dtype)).sum().backward()
            assert module.weight.grad.layout == torch.sparse_coo
            opt.step()


@pytest.mark.parametrize("kwargs", [dict(lr=0.01), dict(lr=0.05, betas=(0.8, 0.99),
                                                        eps=1e-9, maximize=True)])
def test_equals_sparse_adam(kwargs):
    ours_module, their_module = embedding_pair()
    ours = incrkern.optim.Adam(ours_module.parameters(), **kwargs)
    theirs = torch.optim.SparseAdam(their_module.parameters(), **kwargs)
    untouched = ours_module.weight.detach()[25:].clone()
    embedding_steps([(ours_module, ours), (their_module, theirs)])
    # Adam's eps is added to sqrt(v) / sqrt(1 - beta2^t), SparseAdam's to sqrt(v): the
    # same up to eps, far below these tolerances for gradients of this size.
    torch.testing.assert_close(ours_module.weight, their_module.weight, rtol=1e-5, atol=1e-6)
    p, q = ours_module.weight, their_module.weight
    assert float(ours.state[p]["step"]) == theirs.state[q]["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours.state[p][key], theirs.state[q][key], rtol=1e-5,
                                   atol=1e-7)
    assert torch.equal(ours_module.weight.detach()[25:], untouched)  # rows never present
    assert not ours.state[p]["exp_avg"][25:].any()


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.1, maximize=True)])
def test_equals_torch_sgd(kwargs):
    ours_module, their_module = embedding_pair()
    ours = incrkern.optim.SGD(ours_module.parameters(), **kwargs)
    theirs = torch.optim.SGD(their_module.parameters(), **kwargs)
    embedding_steps([(ours_module, ours), (their_module, theirs)])
    torch.testing.assert_close(ours_module.weight, their_module.weight, rtol=1e-5, atol=1e-6)


def coo_grad(shape, sparse_dim, nnz, generator, dtype=torch.float32):
    """A random uncoalesced COO gradient with repeated indices, some values zero."""
    indices = torch.stack([torch.randint(0, max(1, shape[d] // 2), (nnz,), generator=generator)
                           for d in range(sparse_dim)])
    values = torch.randn((nnz, *shape[sparse_dim:]), generator=generator).to(dtype)
    values[::5] = 0  # present but zero: still a candidate, still decays the state
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)


def dense_reference_step(kind, p, state, grad, density, hyper):
    """The same step written from dense tensors: present elements from the indices
    (duplicates summed by to_dense), top-k of |g| among them, the pure-torch update."""
    dense = grad.to_dense().reshape(-1)
    present = torch.zeros(grad.shape, dtype=torch.bool)
    present[tuple(grad._indices())] = True
    positions = present.reshape(-1).nonzero().squeeze(1)
    k = math.ceil(density * positions.numel())
    chosen = positions[topk_lowest_index(dense[positions].abs().float(), k)]
    flat = p.view(-1)
    if kind == "adam":
        hyper = dict(hyper)
        amsgrad = hyper.pop("amsgrad", False)
        if "exp_avg" not in state:
            state.update(exp_avg=torch.zeros(flat.numel()), exp_avg_sq=torch.zeros(flat.numel()),
                         step=torch.tensor(0.0))
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros(flat.numel())
        state["step"] += 1
        reference.adam_update_([flat], [dense], [state["exp_avg"]], [state["exp_avg_sq"]],
                               [state["step"]], [chosen], [], [],
                               [state["max_exp_avg_sq"]] if amsgrad else [], **hyper)
    else:
        first = "momentum_buffer" not in state
        if first:
            state["momentum_buffer"] = torch.zeros(flat.numel())
        reference.sgd_update_([flat], [dense], [state["momentum_buffer"]], [chosen], [],
                              [first], **hyper)


ADAM = ("Adam", "adam", dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
        dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
             decoupled_weight_decay=False, maximize=False))
ADAMW = ("AdamW", "adam", dict(lr=0.01, weight_decay=0.1),
         dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
              decoupled_weight_decay=True, maximize=False))
AMSGRAD = ("AdamW", "adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True),
           dict(ADAMW[3], amsgrad=True))
SGD = ("SGD", "sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
       dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
            maximize=False))


@pytest.mark.parametrize("optimizer", [ADAM, ADAMW, AMSGRAD, SGD],
                         ids=["Adam", "AdamW", "AdamW-amsgrad", "SGD"])
@pytest.mark.parametrize("shape,sparse_dim", [((40, 6), 1), ((40, 6), 2), ((7, 5, 3), 2),
                                              ((101,), 1)])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_equals_dense_reference(optimizer, shape, sparse_dim, density):
    name, kind, kwargs, hyper = optimizer
    torch.manual_seed(0)
    p = torch.randn(shape, requires_grad=True)
    q = p.detach().clone()
    opt = getattr(incrkern.optim, name)([p], density=density, **kwargs)
    ref_state = {}
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        grad = coo_grad(shape, sparse_dim, 17, g)
        assert not grad.is_coalesced()
        p.grad = grad
        opt.step()
        dense_reference_step(kind, q, ref_state, grad, density, hyper)
    torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    for key, value in ref_state.items():
        torch.testing.assert_close(opt.state[p][key].reshape(-1), value.reshape(-1),
                                   rtol=1e-5, atol=1e-6, msg=key)
    assert not opt._sparse_scratch_buffers[(p.device, p.dtype)].any()  # left zeroed


def test_mixed_sparse_and_dense_params_in_one_optimizer():
    """An embedding with sparse grads and a linear layer with dense ones: each part
    equals its torch counterpart (SparseAdam and Adam)."""
    torch.manual_seed(0)
    emb, lin = nn.Embedding(30, 4, sparse=True), nn.Linear(4, 3)
    emb2, lin2 = copy.deepcopy(emb), copy.deepcopy(lin)
    ours = incrkern.optim.Adam([*emb.parameters(), *lin.parameters()], lr=0.02)
    sparse_ref = torch.optim.SparseAdam(emb2.parameters(), lr=0.02)
    dense_ref = torch.optim.Adam(lin2.parameters(), lr=0.02, foreach=False)
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        x = torch.randint(0, 30, (12,), generator=g)
        w = torch.randn(12, 3, generator=g)  # gradients of order 1: see test_equals_sparse_adam
        ours.zero_grad()
        (lin(emb(x)) * w).sum().backward()
        ours.step()
        sparse_ref.zero_grad()
        dense_ref.zero_grad()
        (lin2(emb2(x)) * w).sum().backward()
        sparse_ref.step()
        dense_ref.step()
    for p, q in zip([*emb.parameters(), *lin.parameters()],
                    [*emb2.parameters(), *lin2.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_low_precision_and_element_bias_correction():
    """bf16 params keep fp32 state; bias_correction='element' ages only what moved."""
    torch.manual_seed(0)
    p = torch.randn(64, 4).to(torch.bfloat16).requires_grad_()
    opt = incrkern.optim.Adam([p], lr=0.01, density=0.5, bias_correction="element")
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        p.grad = coo_grad((64, 4), 1, 10, g, torch.bfloat16)
        opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == torch.float32
    assert state["age"].max() >= 1
    assert int((state["age"] > 0).sum()) == int((state["exp_avg_sq"] > 0).sum())


def test_empty_sparse_grad_counts_a_step():
    p = torch.randn(10, requires_grad=True)
    before = p.detach().clone()
    opt = incrkern.optim.Adam([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(0),
                                     (10,), check_invariants=True)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 1.0  # as SparseAdam counts it


@pytest.mark.parametrize("options,match", [
    (dict(select="weight", density=0.5), "select='grad'"),
    (dict(select="accumulated", density=0.5), "select='grad'"),
    (dict(scope="global", density=0.5), "scope='tensor'"),
    (dict(mask="fixed", density=0.5), "mask='dynamic'"),
    (dict(mask=3, density=0.5), "mask='dynamic'"),
    (dict(accumulate_steps=2), "accumulate_steps=1"),
])
def test_unsupported_options_raise_and_touch_nothing(options, match):
    emb, _ = embedding_pair()
    lin = nn.Linear(8, 2)
    opt = incrkern.optim.Adam([*lin.parameters(), *emb.parameters()], lr=0.1, **options)
    x = torch.randint(0, 50, (6,))
    opt.zero_grad()
    lin(emb(x)).sum().backward()
    before = [p.detach().clone() for p in (*lin.parameters(), *emb.parameters())]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\]: a sparse "
                       r"gradient needs " + match):
        opt.step()
    for p, b in zip((*lin.parameters(), *emb.parameters()), before):
        assert torch.equal(p, b)
    assert not opt.state


def test_sparse_grad_of_another_shape_raises():
    p = torch.randn(4, 4, requires_grad=True)
    opt = incrkern.optim.SGD([p], lr=0.1)
    p.grad = torch.randn(4, 4).to_sparse()
    p.grad.sparse_resize_and_clear_((4, 5), 2, 0)  # past autograd's own guard, to test ours
    with pytest.raises(RuntimeError, match="grad has shape"):
        opt.step()


@pytest.mark.cuda
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_cuda_equals_cpu(density):
    torch.manual_seed(0)
    p = torch.randn(40, 6, requires_grad=True)
    q = p.detach().cuda().requires_grad_()
    opts = [incrkern.optim.Adam([t], lr=0.01, density=density) for t in (p, q)]
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        grad = coo_grad((40, 6), 1, 17, g)
        p.grad, q.grad = grad, grad.cuda()
        for opt in opts:
            opt.step()
    torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
