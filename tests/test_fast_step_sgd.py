"""SGD's one-call C++ step (incrkern._C.fused_sgd_step, incrkern/optim/fast_step.py)
against the Python step it replaces: bit-identical params, state and counters wherever
it runs (by |grad|, with error feedback, at the end of a cycle of accumulate_steps),
and a step that falls back, untouched, wherever it does not."""
import pytest
import torch

import incrkern
from incrkern.optim import base, fast_step

from helpers import recorded
from test_fast_step import (SIZES, assert_bad_step_touches_nothing,
                            assert_changed_step_as_python, assert_same, heavy_tailed_grads,
                            make_params, one_group, other_dtype_grad, run, two_groups)

pytestmark = pytest.mark.skipif(fast_step._fused_sgd_step is None,
                                reason="the extension is not built")

# momentum 0.9 with nesterov and weight decay, no momentum (no state to read), and
# dampening with maximize.
MOMENTA = [dict(momentum=0.9, nesterov=True, weight_decay=0.05), dict(momentum=0.0),
           dict(momentum=0.5, dampening=0.3, maximize=True)]


@pytest.fixture
def spy(monkeypatch):
    """The call's answers: per taken step, a bool per group (whether it had grads)."""
    return recorded(monkeypatch, "_fused_sgd_step")


@pytest.mark.parametrize("dtype, topk", [(torch.float32, "exact"), (torch.float32, "approx"),
                                         (torch.bfloat16, "exact"), (torch.float16, "approx")])
@pytest.mark.parametrize("select, accumulate_steps",
                         [("grad", 1), ("accumulated", 1), ("grad", 2)])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3])
@pytest.mark.parametrize("groups_of", [one_group, two_groups])
@pytest.mark.parametrize("momenta", MOMENTA, ids=["nesterov", "plain", "dampening"])
def test_same_as_the_python_step(dtype, select, accumulate_steps, topk, density, groups_of,
                                 momenta, spy, monkeypatch):
    options = dict(lr=1e-2, density=density, select=select, topk=topk,
                   accumulate_steps=accumulate_steps, **momenta)
    steps = 4 * accumulate_steps
    fast_params, slow_params = make_params(SIZES, dtype), make_params(SIZES, dtype)
    fast = run(incrkern.optim.SGD, fast_params, groups_of, steps, True, monkeypatch, **options)
    # Every update is the C++ call but the first, which makes the params' state in
    # Python (an empty dict without momentum or a residual), unless a first micro-step
    # has made it and no momentum buffer is needed.
    made_before = momenta["momentum"] == 0 and accumulate_steps > 1
    assert len(spy) == 4 and (spy[0] is None) != made_before
    assert all(answer is not None and all(answer) for answer in spy[1:])
    slow = run(incrkern.optim.SGD, slow_params, groups_of, steps, False, monkeypatch,
               **options)
    assert len(spy) == 4  # the disabled run never called it
    assert_same(fast, slow, fast_params, slow_params)
    assert all(g["updates"] == 4 and g["accumulated_calls"] == 0 for g in fast.param_groups)


@pytest.mark.parametrize("enabled", [True, False])
def test_each_written_tensor_version_bumped_once(enabled, spy, monkeypatch):
    """The params, momentum buffers and residuals the call writes, as the op's
    dispatcher kernel bumps them in the Python step."""
    opt, params = stepped_once(select="accumulated")
    written = params + [opt.state[p][key] for p in params
                        for key in ("momentum_buffer", "residual")]
    before = [t._version for t in written]
    monkeypatch.setattr(fast_step, "ENABLED", enabled)
    opt.step()
    assert (spy[-1] is not None) == enabled
    assert [t._version for t in written] == [v + 1 for v in before]


def test_a_group_without_grads_is_not_counted(spy):
    params = make_params([50, 60, 70], torch.float32)
    opt = incrkern.optim.SGD([dict(params=params[:2]), dict(params=params[2:])], lr=0.1,
                             momentum=0.9, density=0.1)
    heavy_tailed_grads(params, 0)
    opt.step()
    params[2].grad = None
    opt.step()
    assert spy[-1] == [True, False]
    assert [g["updates"] for g in opt.param_groups] == [2, 1]


def stepped_once(sizes=(40, 50, 60), **options):
    params = make_params(sizes, torch.float32)
    opt = incrkern.optim.SGD(params, lr=0.1, momentum=0.9, density=0.1, **options)
    heavy_tailed_grads(params, 0)
    opt.step()
    heavy_tailed_grads(params, 1)
    return opt, params


@pytest.mark.parametrize("spoil, error", [
    (lambda opt, ps: other_dtype_grad(ps[1]), "dtype"),
    (lambda opt, ps: opt.state[ps[2]].__setitem__("momentum_buffer", torch.zeros(59)),
     "momentum_buffers"),
    (lambda opt, ps: opt.state[ps[0]].__setitem__("residual", torch.zeros(40).double()),
     "residuals"),
])
def test_a_bad_step_falls_back_and_touches_nothing(spoil, error, spy):
    opt, params = stepped_once(select="accumulated")
    assert_bad_step_touches_nothing(opt, params, spoil, error, spy)


def test_a_bad_param_among_many_falls_back_and_touches_nothing(spy):
    """Among more params than one thread checks, a bad one near the end still stops
    the call before anything is touched."""
    opt, params = stepped_once(sizes=(24,) * 1300)
    assert_bad_step_touches_nothing(
        opt, params, lambda opt, ps: opt.state[ps[1290]].__setitem__(
            "momentum_buffer", torch.zeros(23)), "momentum_buffers", spy)


@pytest.mark.parametrize("change, taken", [
    (lambda opt, ps: setattr(ps[1], "grad", ps[1].grad.to_sparse()), False),
    (lambda opt, ps: opt.param_groups[0].__setitem__("density", 1.0), False),
    (lambda opt, ps: opt.param_groups[0].__setitem__("select", "weight"), False),
    (lambda opt, ps: setattr(opt, "grad_scale", torch.tensor(1.0)), False),
    (lambda opt, ps: setattr(ps[2], "grad", None), True),
    (lambda opt, ps: opt.param_groups[0].__setitem__("lr", torch.tensor(1e-3)), True),
    (lambda opt, ps: opt.state[ps[0]].pop("momentum_buffer"), False),
])
def test_other_steps_as_the_python_step(change, taken, spy, monkeypatch):
    opt, params = stepped_once(sizes=(80, 50, 60))
    assert_changed_step_as_python(opt, params, change, taken, spy, monkeypatch)


def test_the_cost_model_leaves_the_step_to_python(spy, monkeypatch):
    """Below FUSED_SGD_DENSITY a group takes select then update, in Python."""
    monkeypatch.setattr(base, "FUSED_SGD_DENSITY", 0.5)
    opt, params = stepped_once()
    opt.step()
    assert spy == []
