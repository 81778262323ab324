"""Every entry of the README's "Not supported" list raises an error that names it."""
import pytest
import torch

import incrkern


def params(dtype=torch.float32, device="cpu"):
    return [torch.zeros(3, dtype=dtype, device=device, requires_grad=True)]


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_differentiable(name):
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        getattr(incrkern.optim, name)(params(), lr=0.1, differentiable=True)


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
