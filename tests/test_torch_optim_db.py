"""torch's own optimizer test data (torch.testing._internal.common_optimizers.optim_db)
run against incrkern.optim: every configuration of Adam, AdamW and SGD gives torch's
params and state to float32 rounding, and every error input raises torch's error type
with a message matching torch's pattern."""
import copy
import re
import warnings

import pytest
import torch

pytest.importorskip("expecttest", reason="torch's test data imports expecttest")
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import incrkern

NAMES = ("Adam", "AdamW", "SGD")
INFOS = {info.optim_cls.__name__: info for info in optim_db
         if info.optim_cls.__name__ in NAMES}

def configurations(device):
    """(name, kwargs) for each configuration, plain and with each of torch's
    implementation flags (foreach=True, differentiable=True, fused=True) that the
    optimizer takes."""
    out = []
    for name in NAMES:
        info = INFOS[name]
        for config in info.optim_inputs_func(device=device):
            for impl in (None, *info.supported_impls):
                kwargs = dict(config.kwargs, **({impl: True} if impl else {}))
                out.append(pytest.param(name, kwargs, id=f"{name}-{config.desc}-{impl}"))
    return out


def error_inputs():
    out = []
    for name in NAMES:
        for error in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32):
            out.append(pytest.param(name, error,
                                    id=f"{name}-{error.optimizer_error_input.desc}"))
    return out


def make_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(0,), (1,), (7,), (31, 3), (4, 5, 6)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    params.append(torch.randn(6, 9, generator=gen).to(device).t())  # non-contiguous
    return [p.requires_grad_() for p in params]


def differentiable_params(leaves):
    """Non-leaf params, as a differentiable step takes them (torch refuses in-place
    steps on leaves that require grad): clones of `leaves`, keeping their grads."""
    params = [leaf.clone() for leaf in leaves]
    for p in params:
        p.retain_grad()
    return params


def compare_with_torch(name, kwargs, device, steps=5):
    """Ours with `kwargs` against torch's for-loop implementation; where torch itself
    refuses `kwargs` (a Tensor lr with foreach=True, say), ours must refuse them too."""
    try:
        getattr(torch.optim, name)(make_params(device), **copy.deepcopy(kwargs))
    except (ValueError, RuntimeError, TypeError) as error:
        with pytest.raises(type(error), match=re.escape(str(error))):
            getattr(incrkern.optim, name)(make_params(device), **copy.deepcopy(kwargs))
        return
    leaves, ref_leaves = make_params(device), make_params(device)
    params, ref_params = leaves, ref_leaves
    if kwargs.get("differentiable"):
        params, ref_params = differentiable_params(leaves), differentiable_params(ref_leaves)
    # Each side gets its own copy of tensor hyperparameters (lr, betas), as a user
    # constructing one optimizer would.
    ours = getattr(incrkern.optim, name)(params, **copy.deepcopy(kwargs))
    reference_kwargs = {k: v for k, v in kwargs.items() if k not in ("foreach", "fused")}
    theirs = getattr(torch.optim, name)(ref_params, foreach=False,
                                        **copy.deepcopy(reference_kwargs))
    for _ in range(steps):
        for p, q in zip(params, ref_params):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if kwargs.get("differentiable"):  # the steps were recorded: the same derivatives
        weights = [torch.randn_like(p) for p in params]

        def derivatives(ps, wrt):
            return torch.autograd.grad(sum((p * w).sum() for p, w in zip(ps, weights)), wrt,
                                       allow_unused=True)
        try:
            theirs_grads = derivatives(ref_params, ref_leaves)
        except RuntimeError as error:
            # torch's own steps cannot always be differentiated (amsgrad with L2 weight
            # decay saves a moment it later changes in place): ours fail alike
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                derivatives(params, leaves)
            assert "modified by an inplace operation" in str(error)
        else:
            for a, b in zip(derivatives(params, leaves), theirs_grads):
                assert a is not None and b is not None
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(params, ref_params):
        ours_state, theirs_state = ours.state[p], theirs.state[q]
        assert set(ours_state) == set(theirs_state)
        for key, value in theirs_state.items():
            torch.testing.assert_close(ours_state[key].cpu(), value.cpu(), rtol=1e-5,
                                       atol=1e-6, msg=key)


@pytest.mark.parametrize("name,kwargs", configurations("cpu"))
def test_configuration_equals_torch(name, kwargs):
    compare_with_torch(name, kwargs, "cpu")


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("kwargs", [
    dict(lr=torch.tensor(0.01), betas=(torch.tensor([[0.8]]), torch.tensor(0.99))),
    dict(betas=(torch.tensor([0.5]), torch.tensor([[[0.9]]])), weight_decay=0.1),
], ids=["tensor-lr-and-betas", "betas-of-several-dims"])
def test_tensor_betas_on_the_cpu(name, kwargs):
    """torch's list has Tensor betas only among its CUDA (capturable) configurations;
    torch takes them on the CPU too."""
    compare_with_torch(name, kwargs, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("name,kwargs", configurations("cuda"))
def test_cuda_configuration_equals_torch(name, kwargs):
    """The CUDA list adds capturable configurations, tensor lr and tensor betas."""
    compare_with_torch(name, kwargs, "cuda")


def default_params():
    return [torch.randn(3, requires_grad=True)]


@pytest.mark.parametrize("name,error", error_inputs())
def test_error_input_raises_as_torch(name, error):
    config = error.optimizer_error_input
    cls = getattr(incrkern.optim, name)
    params = default_params() if config.params is None else config.params

    def build_and_maybe_step():
        opt = cls(params, **config.kwargs)
        if error.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            build_and_maybe_step()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(error.error_type, match=error.error_regex):
                build_and_maybe_step()


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_is_covered(name):
    """torch's data is there: an empty list would leave the tests above vacuous."""
    assert INFOS[name].optim_inputs_func(device="cpu")
    assert INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
