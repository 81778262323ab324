"""A state_dict that does not fit the params, and a step counter shared by two params,
are refused with an error naming the param, before anything changes."""
import copy

import pytest
import torch
from torch import nn

import incrkern


def model_a():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))


def model_b():
    """Another model with as many param tensors, of other sizes."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def train(model, opt, steps=3):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, model[0].in_features, generator=g)
        model(x).square().sum().backward()
        opt.step()


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def assert_unchanged(model, opt, before):
    params, saved = before
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["param_groups"] == saved["param_groups"]
    assert now["state"].keys() == saved["state"].keys()
    for k, state in saved["state"].items():
        assert state.keys() == now["state"][k].keys()
        for key, value in state.items():
            assert torch.equal(value, now["state"][k][key]), key


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("mask", ["fixed", 2])
def test_checkpoint_of_another_model_is_refused(name, mask):
    kwargs = dict(lr=0.01, density=0.3, mask=mask)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    a, b = model_a(), model_b()
    opt_a = getattr(incrkern.optim, name)(a.parameters(), **kwargs)
    opt_b = getattr(incrkern.optim, name)(b.parameters(), **kwargs)
    train(a, opt_a)
    train(b, opt_b)
    before = snapshot(b, opt_b)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\].*another model"):
        opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert_unchanged(b, opt_b, before)
    train(b, opt_b, 1)  # still usable


def corrupt(saved, how):
    state = saved["state"][1]
    idx = state["indices"]
    if how == "negative":
        idx[0] = -1
    elif how == "past the end":
        idx[-1] = 24 * 12  # param 1 (the first bias) has 24 elements; this is a weight's size
    elif how == "dtype":
        state["indices"] = idx.to(torch.int16)
    elif how == "2-D":
        state["indices"] = idx.reshape(1, -1)
    elif how == "repeated":
        idx[1] = idx[0]
    elif how == "length":
        state["indices"] = idx[:-1]
    elif how == "state size":
        state["exp_avg"] = state["exp_avg"][:-1]
    elif how == "max size":
        state["max_exp_avg_sq"] = state["max_exp_avg_sq"][:-1]


@pytest.mark.parametrize("how,match", [
    ("negative", "outside"), ("past the end", "outside"), ("dtype", "int32 or int64"),
    ("2-D", "1-D"), ("repeated", "more than once"), ("length", "exp_avg has"),
    ("state size", "exp_avg has"), ("max size", "max_exp_avg_sq has"),
])
def test_bad_kept_indices_are_refused(how, match):
    model = model_a()
    opt = incrkern.optim.Adam(model.parameters(), lr=0.01, density=0.3, mask="fixed",
                              amsgrad=True)
    train(model, opt)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][1]["indices"].dtype == torch.int32
    corrupt(saved, how)
    twin = model_a()
    opt2 = incrkern.optim.Adam(twin.parameters(), lr=0.01, density=0.3, mask="fixed",
                               amsgrad=True)
    train(twin, opt2, 1)
    before = snapshot(twin, opt2)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*" + match):
        opt2.load_state_dict(saved)
    assert_unchanged(twin, opt2, before)


def test_int64_indices_load():
    model = model_a()
    opt = incrkern.optim.Adam(model.parameters(), lr=0.01, density=0.3, mask="fixed")
    train(model, opt)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["indices"] = state["indices"].long()
    twin = copy.deepcopy(model)
    opt2 = incrkern.optim.Adam(twin.parameters(), lr=0.01, density=0.3, mask="fixed")
    opt2.load_state_dict(saved)
    train(model, opt, 2)
    train(twin, opt2, 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("split_groups", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(density=0.3)])
def test_shared_step_tensor_is_refused(split_groups, options):
    model = model_a()
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:]}] if split_groups else params
    opt = incrkern.optim.AdamW(groups, lr=0.01, **options)
    train(model, opt, 2)
    opt.state[params[3]]["step"] = opt.state[params[0]]["step"]
    opt.zero_grad()
    model(torch.randn(4, 12)).sum().backward()
    before = snapshot(model, opt)
    where = r"param_groups\[1\]\['params'\]\[1\]" if split_groups else \
        r"param_groups\[0\]\['params'\]\[3\]"
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] and "
                       + where + r" share one state\['step'\]"):
        opt.step()
    assert_unchanged(model, opt, before)
