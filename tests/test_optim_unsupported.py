"""Every entry of the README's "Not supported" list raises an error that names it."""
import pytest
import torch

import incrkern


def params(dtype=torch.float32, device="cpu"):
    return [torch.zeros(3, dtype=dtype, device=device, requires_grad=True)]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("options", [dict(density=0.5), dict(accumulate_steps=2),
                                     dict(select="accumulated")])
def test_differentiable_sparse_steps(name, options):
    """differentiable=True steps with torch's differentiable ops: a sparse step (the
    kernels) is refused, at construction and for a param group added later, before
    anything changes."""
    with pytest.raises(ValueError, match="differentiable=True .* needs the dense defaults"):
        getattr(incrkern.optim, name)(params(), lr=0.1, differentiable=True, **options)
    leaf = params()[0]
    p = leaf.clone()
    opt = getattr(incrkern.optim, name)([p], lr=0.1, differentiable=True)
    q = leaf.clone()
    opt.add_param_group(dict(params=[q], **options))
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="needs the dense defaults"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_differentiable_half_params(name):
    p = params(torch.bfloat16)[0].clone()
    opt = getattr(incrkern.optim, name)([p], lr=0.1, differentiable=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="differentiable=True takes float32 or float64"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_complex_params(name):
    with pytest.raises(TypeError, match="complex params are not supported"):
        getattr(incrkern.optim, name)(params(torch.complex64), lr=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_float64_on_cuda(name):
    ps = params(torch.float64, "cuda")
    opt = getattr(incrkern.optim, name)(ps, lr=0.1)
    ps[0].grad = torch.ones_like(ps[0])
    with pytest.raises(RuntimeError, match="float64 params are supported on the CPU only"):
        opt.step()
    assert not ps[0].detach().any()
