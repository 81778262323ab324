"""Version counters. Torch's in-place ops bump the version of every tensor they write,
and autograd refuses a backward through a saved tensor whose version has moved since.
incrkern's ops bump those their schema marks written, through the dispatcher and in the
one-call steps, so a step between forward and backward raises as torch.optim's default
step does, instead of giving a wrong gradient. A call that fails bumps nothing."""
import pytest
import torch

import incrkern
from incrkern import ops
from incrkern.optim import base, fast_step

from helpers import needs_ext, recorded

pytestmark = needs_ext

# A tensor past the small-tensor limit (it takes the large-tensor paths), a small one,
# an odd one-element tensor.
SIZES = (base.FUSED_SMALL_NUMEL + 1000, 3000, 1)

# (optimizer, options): every way a CPU step reaches the kernels.
STEPS = [
    pytest.param(incrkern.optim.AdamW, dict(density=1.0), id="adamw-dense"),
    pytest.param(incrkern.optim.AdamW, dict(density=0.01), id="adamw-fused-0.01"),
    pytest.param(incrkern.optim.AdamW, dict(density=0.3), id="adamw-stream-0.3"),
    pytest.param(incrkern.optim.AdamW, dict(density=0.01, select="accumulated"),
                 id="adamw-error-feedback"),
    pytest.param(incrkern.optim.AdamW, dict(density=0.01, select="weight"),
                 id="adamw-select-then-update"),
    pytest.param(incrkern.optim.AdamW, dict(density=0.2, select="weight"),
                 id="adamw-by-mask"),
    pytest.param(incrkern.optim.AdamW, dict(density=0.01, mask="fixed"),
                 id="adamw-fixed-mask"),
    pytest.param(incrkern.optim.Adam, dict(density=0.01, amsgrad=True), id="adam-amsgrad"),
    pytest.param(incrkern.optim.SGD, dict(density=1.0, momentum=0.9), id="sgd-dense"),
    pytest.param(incrkern.optim.SGD, dict(density=0.01, momentum=0.9), id="sgd-sparse"),
]


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.numel(), generator=gen)
        g[torch.rand(p.numel(), generator=gen) < 0.3] = 0.0  # exact zeros, as real grads
        p.grad = g


def versions(tensors):
    return [t._version for t in tensors]


@pytest.mark.parametrize("fast", [True, False], ids=["one-call", "python-step"])
@pytest.mark.parametrize("opt_cls,options", STEPS)
def test_every_step_bumps_every_param(opt_cls, options, fast, monkeypatch):
    monkeypatch.setattr(fast_step, "ENABLED", fast)
    params = make_params()
    opt = opt_cls(params, lr=1e-2, **options)
    for step in range(3):  # the first step creates the state; the later ones reuse it
        set_grads(params, step)
        before = versions(params)
        opt.step()
        assert all(a > b for a, b in zip(versions(params), before)), (step, before)


@pytest.mark.parametrize("many", [False, True], ids=["few", "over-the-threads"])
def test_the_one_call_step_ran_and_bumped_its_state(many, monkeypatch):
    """Every written tensor once; with more params than one thread bumps, in runs of
    params over the threads."""
    answers = recorded(monkeypatch, "_fused_adam_step")
    params = make_params()
    if many:
        params = [torch.nn.Parameter(torch.randn(16)) for _ in range(1300)] + params
    opt = incrkern.optim.AdamW(params, lr=1e-2, density=0.01, select="accumulated")
    set_grads(params, 0)
    opt.step()
    set_grads(params, 1)
    state = [opt.state[p][key] for p in params
             for key in ("exp_avg", "exp_avg_sq", "step", "residual")]
    before_params, before_state = versions(params), versions(state)
    opt.step()
    assert answers and answers[-1] is not None  # the C++ call took the step
    assert versions(params) == [v + 1 for v in before_params]
    assert versions(state) == [v + 1 for v in before_state]


def test_micro_steps_bump_their_buffers_not_the_params():
    params = make_params()
    opt = incrkern.optim.AdamW(params, lr=1e-2, density=0.01, accumulate_steps=3)
    for cycle in range(2):
        for micro in range(3):
            set_grads(params, 3 * cycle + micro)
            before = versions(params)
            buffers = [opt.state[p]["grad_acc"] for p in params] if opt.state else []
            before_buffers = versions(buffers)
            opt.step()
            if micro < 2:
                assert versions(params) == before
                assert all(a > b for a, b in zip(versions(buffers), before_buffers))
            else:
                assert all(a > b for a, b in zip(versions(params), before))


@pytest.mark.parametrize("make_opt", [
    # torch.optim's default (foreach) step raises here; its fused step, in torch 2.14,
    # bumps no counter and does not.
    pytest.param(lambda ps: torch.optim.AdamW(ps, lr=1e-2), id="torch-default"),
    pytest.param(lambda ps: incrkern.optim.AdamW(ps, lr=1e-2, density=0.01), id="incrkern"),
    pytest.param(lambda ps: incrkern.optim.AdamW(ps, lr=1e-2, density=1.0),
                 id="incrkern-dense"),
    pytest.param(lambda ps: incrkern.optim.SGD(ps, lr=1e-2, density=0.01, momentum=0.9),
                 id="incrkern-sgd"),
])
def test_a_backward_through_a_stepped_param_is_refused(make_opt):
    params = make_params()
    opt = make_opt(params)
    for step in range(2):  # the second step runs on existing state (the one-call path)
        set_grads(params, step)
        x = torch.randn(params[1].shape, requires_grad=True)
        loss = (params[1] * x).sum()  # saves params[1] for x's gradient
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def adam_lists(n=5000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(n, generator=gen), torch.randn(7, generator=gen)]
    g = [torch.randn_like(t) for t in p]
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    steps = [torch.tensor(0.0) for _ in p]
    return p, g, m, v, steps


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
             decoupled_weight_decay=True)


def test_ops_bump_what_their_schema_marks_written():
    p, g, m, v, steps = adam_lists()
    idx = ops.select(g, [50, 1], score="grad")
    ops.adam_update_(p, g, m, v, steps, indices=idx, increment_steps=True, **HYPER)
    for written in (p, g, m, v, steps):
        assert versions(written) == [1, 1]
    assert versions(idx) == [0, 0]

    p, g, m, v, steps = adam_lists(seed=1)
    r = [torch.zeros_like(t) for t in p]
    ops.adam_select_update_(p, g, m, v, steps, [50, 1], r, increment_steps=True, **HYPER)
    for written in (p, m, v, steps, r):
        assert versions(written) == [1, 1]
    assert versions(g) == [0, 0]

    acc = [torch.zeros_like(t) for t in g]
    sq = [torch.zeros_like(t) for t in g]
    ops.accumulate_(acc, g, 0.5, sq)
    assert versions(acc) == versions(sq) == [1, 1]
    assert versions(g) == [0, 0]

    buf = [torch.zeros_like(t) for t in p]
    before = versions(p)
    ops.sgd_update_(p, g, buf, lr=1e-2, momentum=0.9)
    assert versions(p) == [b + 1 for b in before]
    assert versions(buf) == versions(g) == [1, 1]


def test_a_call_that_fails_bumps_nothing():
    p, g, m, v, steps = adam_lists()
    v[1] = torch.zeros(8)  # the wrong size
    with pytest.raises(RuntimeError, match="exp_avg_sqs"):
        ops.adam_update_(p, g, m, v, steps, increment_steps=True, validate=False, **HYPER)
    for tensors in (p, g, m, v, steps):
        assert versions(tensors) == [0, 0]


def test_inference_mode_steps_without_counters():
    with torch.inference_mode():
        p, g, m, v, steps = adam_lists()
        before = [t.clone() for t in p]
        ops.adam_update_(p, g, m, v, steps, increment_steps=True, **HYPER)
        ops.adam_select_update_(p, g, m, v, steps, [50, 1], increment_steps=True, **HYPER)
    assert not any(torch.equal(a, b) for a, b in zip(p, before))
