"""Mixed precision as torch's fused optimizers take it (torch.amp.GradScaler with
_step_supports_amp_scaling): the kernels read the grads unscaled by `amp_scale` and
change nothing when `found_inf` is set, the residual of error feedback stays
unscaled, and a GradScaler loop gives the params and state of a loop that unscales
the grads itself. GPU-only tests at the end."""
import copy
import math
import types

import pytest
import torch
from torch import nn

import incrkern
from incrkern import ops, reference
from incrkern.optim.device_steps import skips_on_device
from helpers import needs_ext, step_without_sync

SCALE = 2.0 ** 12  # GradScaler's scales are powers of two: unscaling is exact


def amp(device="cpu", scale=SCALE, inf=0.0):
    return (torch.tensor(scale, device=device), torch.tensor(inf, device=device))


def adam_inputs(dtype, n=1000, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    math_dt = ops.math_dtype(dtype)
    p = torch.randn(n, generator=gen).to(device, dtype)
    g = torch.randn(n, generator=gen).to(device, dtype)
    m = (torch.randn(n, generator=gen) * 0.1).to(device, math_dt)
    v = (torch.rand(n, generator=gen) * 0.01).to(device, math_dt)
    r = (torch.randn(n, generator=gen) * 0.5).to(device, math_dt)
    return dict(p=p, g=g, m=m, v=v, r=r, step=torch.tensor(2.0))


def clone(x):
    return {k: t.clone() for k, t in x.items()}


def assert_same(a, b):
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------
# the ops


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("form", ["dense", "indices", "mask"])
def test_adam_update_reads_unscaled_grads(dtype, form):
    """amp_scale: the same result as the grads divided by the scale beforehand (exact
    for a power of two), and as the reference."""
    x = adam_inputs(dtype)
    scaled, plain, ref = clone(x), clone(x), clone(x)
    scaled["g"] = scaled["g"] * SCALE
    where = dict(dense={}, indices=dict(indices=[torch.arange(0, 1000, 7)]),
                 mask=dict(masks=[torch.arange(1000) % 3 == 0]))[form]
    hyper = dict(lr=1e-2, weight_decay=0.1, grad_scale=0.5, increment_steps=True, **where)
    scale, found = amp()
    ops.adam_update_([scaled["p"]], [scaled["g"]], [scaled["m"]], [scaled["v"]],
                     [scaled["step"]], amp_scale=scale, found_inf=found, **hyper)
    ops.adam_update_([plain["p"]], [plain["g"]], [plain["m"]], [plain["v"]], [plain["step"]],
                     **hyper)
    for key in ("p", "m", "v", "step"):
        assert torch.equal(scaled[key], plain[key]), key
    ref["g"] = ref["g"] * SCALE
    reference.adam_update_([ref["p"]], [ref["g"]], [ref["m"]], [ref["v"]], [ref["step"]],
                           **{k: v for k, v in where.items()}, lr=1e-2, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.1,
                           decoupled_weight_decay=False, maximize=False, grad_scale=0.5,
                           increment_steps=True, amp_scale=scale)
    torch.testing.assert_close(scaled["p"], ref["p"])


@needs_ext
@pytest.mark.parametrize("op", ["adam", "amsgrad", "aged", "sgd", "accumulate", "fused",
                                "fused_residual"])
def test_found_inf_changes_nothing(op):
    x = adam_inputs(torch.bfloat16)
    x["g"][5] = math.inf
    x["vmax"] = x["v"].clone()
    x["age"] = torch.full((1000,), 3, dtype=torch.int32)
    before = clone(x)
    scale, found = amp(inf=1.0)
    kw = dict(amp_scale=scale, found_inf=found)
    if op in ("adam", "amsgrad", "aged"):
        ops.adam_update_([x["p"]], [x["g"]], [x["m"]], [x["v"]], [x["step"]], lr=1e-2,
                         increment_steps=True, consume_grad=True,
                         max_exp_avg_sqs=[x["vmax"]] if op == "amsgrad" else None,
                         indices=[torch.arange(10)] if op == "aged" else None,
                         ages=[x["age"]] if op == "aged" else None, **kw)
    elif op == "sgd":
        ops.sgd_update_([x["p"]], [x["g"]], [x["m"]], lr=1e-2, momentum=0.9,
                        consume_grad=True, **kw)
    elif op == "accumulate":
        ops.accumulate_([x["r"]], [x["g"]], 1.0, [x["v"]], sq_alpha=0.1, sq_decay=0.9, **kw)
    else:
        counts = ops.adam_select_update_([x["p"]], [x["g"]], [x["m"]], [x["v"]], [x["step"]],
                                         [100], [x["r"]] if op == "fused_residual" else None,
                                         lr=1e-2, increment_steps=True, **kw)
        assert counts.tolist() == [0]
    assert_same(x, before)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_accumulate_unscales_both_moments(dtype):
    x = adam_inputs(dtype)
    a, b = clone(x), clone(x)
    scale, found = amp()
    ops.accumulate_([a["r"]], [a["g"] * SCALE], 0.5, [a["v"]], sq_alpha=0.1, sq_decay=0.9,
                    amp_scale=scale, found_inf=found)
    ops.accumulate_([b["r"]], [b["g"]], 0.5, [b["v"]], sq_alpha=0.1, sq_decay=0.9)
    assert torch.equal(a["r"], b["r"]) and torch.equal(a["v"], b["v"])


@needs_ext
@pytest.mark.parametrize("n", [1000, 2 ** 18 + 5, 600_000])  # small, large (band) tensors
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
@pytest.mark.parametrize("approx", [False, True])
def test_fused_keeps_the_residual_unscaled(n, residual, approx):
    """The fused op with amp_scale: the same chosen set, params, moments and residual
    (r + g / scale, unscaled) as with the grads unscaled beforehand."""
    x = adam_inputs(torch.float32, n)
    a, b = clone(x), clone(x)
    scale, found = amp()
    k = n // 100
    got = ops.adam_select_update_([a["p"]], [a["g"] * SCALE], [a["m"]], [a["v"]], [a["step"]],
                                  [k], [a["r"]] if residual else None, approx=approx, lr=1e-2,
                                  increment_steps=True, amp_scale=scale, found_inf=found)
    want = ops.adam_select_update_([b["p"]], [b["g"]], [b["m"]], [b["v"]], [b["step"]], [k],
                                   [b["r"]] if residual else None, approx=approx, lr=1e-2,
                                   increment_steps=True)
    assert torch.equal(got, want)
    for key in ("p", "m", "v", "r", "step"):
        assert torch.equal(a[key], b[key]), key


@needs_ext
def test_bad_amp_arguments_touch_nothing():
    x = adam_inputs(torch.float32)
    before = clone(x)
    for bad, exc in ((dict(amp_scale=torch.tensor(2.0, dtype=torch.float64)), TypeError),
                     (dict(found_inf=torch.zeros(2)), TypeError),
                     (dict(amp_scale=torch.tensor([1.0, 2.0])), TypeError)):
        with pytest.raises(exc, match="amp_scale|found_inf"):
            ops.adam_update_([x["p"]], [x["g"]], [x["m"]], [x["v"]], [x["step"]], lr=1e-2,
                             increment_steps=True, **bad)
        with pytest.raises(RuntimeError, match="amp_scale|found_inf"):
            torch.ops.incrkern.adam_update_([x["p"]], [x["g"]], [x["m"]], [x["v"]],
                                            [x["step"]], [], [], [], [], 1e-2, 0.9, 0.999,
                                            1e-8, 0.0, False, False, increment_steps=True,
                                            **bad)
    assert_same(x, before)


# ----------------------------------------------------------------------------------
# the optimizers under torch.amp.GradScaler


OPTIONS = [
    ("AdamW", dict()),
    ("AdamW", dict(density=0.1)),
    ("AdamW", dict(density=0.05, select="accumulated")),
    ("AdamW", dict(density=0.1, select="grad_sq")),
    ("AdamW", dict(density=0.1, accumulate_steps=2)),
    ("AdamW", dict(density=0.1, mask="fixed", bias_correction="element")),
    ("Adam", dict(density=0.1, amsgrad=True)),
    ("SGD", dict(momentum=0.9)),
    ("SGD", dict(momentum=0.9, density=0.1, select="accumulated", momentum_correction=True)),
]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 700), nn.Tanh(), nn.Linear(700, 3))


def _loss(model, step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


@needs_ext
@pytest.mark.parametrize("name,options", OPTIONS)
def test_grad_scaler_loop_equals_unscaled_loop(name, options):
    """GradScaler's steps (the kernels unscale and skip) against the same steps taken
    on grads unscaled by hand and skipped by hand; one step's grads hold an inf."""
    assert incrkern.optim.Adam._step_supports_amp_scaling
    kwargs = dict(lr=1e-2, **options)
    a, b = _model(), _model()
    opt_a = getattr(incrkern.optim, name)(a.parameters(), **kwargs)
    opt_b = getattr(incrkern.optim, name)(b.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=2)
    skipped = 0
    for step in range(6):
        opt_a.zero_grad()
        opt_b.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(_loss(a, step)).backward()
        _loss(b, step).backward()
        if step == 3:  # an overflow: the scaler skips this step and halves its scale
            next(a.parameters()).grad[0, 0] = math.inf
        before = [p.detach().clone() for p in a.parameters()]
        scaler.step(opt_a)
        scaler.update()
        if step == 3:
            skipped += 1
            assert scaler.get_scale() == scale / 2
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
            continue
        opt_b.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), step
    assert skipped == 1
    for p, q in zip(a.parameters(), b.parameters()):
        for key, value in opt_a.state[p].items():
            if torch.is_tensor(value):
                assert torch.equal(value, opt_b.state[q][key]), key


@needs_ext
def test_unscale_then_step_still_works():
    """scaler.unscale_(opt) first (for clipping): the step is handed found_inf only and
    reads the grads as they are."""
    a, b = _model(), _model()
    opt_a = incrkern.optim.AdamW(a.parameters(), lr=1e-2, density=0.1)
    opt_b = incrkern.optim.AdamW(b.parameters(), lr=1e-2, density=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    for step in range(3):
        for opt in (opt_a, opt_b):
            opt.zero_grad()
        scaler.scale(_loss(a, step)).backward()
        _loss(b, step).backward()
        scaler.unscale_(opt_a)
        scaler.step(opt_a)
        scaler.update()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_device_skip_eligibility():
    """Which steps leave a GPU's found_inf to the kernels (no host sync); the choice
    reads only the flag's device."""
    model = _model()
    fake_gpu_flag = types.SimpleNamespace(device=torch.device("cuda"))
    opt = incrkern.optim.AdamW(model.parameters(), lr=1e-2, density=0.1)
    plans = [(g, g["params"], None, None) for g in opt.param_groups]
    assert not skips_on_device(opt, plans, [], fake_gpu_flag)  # first step: no state yet
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert skips_on_device(opt, plans, [], fake_gpu_flag)
    assert not skips_on_device(opt, plans, [], torch.zeros(()))  # a CPU flag: read, free
    for options in (dict(accumulate_steps=2), dict(mask=3), dict(select="layer")):
        other = incrkern.optim.AdamW(model.parameters(), lr=1e-2, density=0.5, **options)
        other.state = opt.state
        plans = [(g, g["params"], None, None) for g in other.param_groups]
        assert not skips_on_device(other, plans, [], fake_gpu_flag), options


# ----------------------------------------------------------------------------------
# GPU


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True], ids=["composed", "fused"])
@pytest.mark.parametrize("options", [dict(), dict(density=0.05),
                                     dict(density=0.05, select="accumulated")])
def test_cuda_skipped_step_does_not_sync(monkeypatch, fused, options):
    """Device step counts (capturable=True), state made: an inf step is skipped by the
    kernels, with no host sync, and leaves params and state (step counts included)
    as they were. The scale and flag are handed over as GradScaler.step hands them."""
    monkeypatch.setattr(ops, "FUSED_CUDA", fused)
    model = _model().cuda()
    opt = incrkern.optim.AdamW(model.parameters(), lr=1e-2, capturable=True, **options)
    scaler = torch.amp.GradScaler("cuda", init_scale=SCALE)
    x = torch.randn(16, 12, device="cuda")
    for step in range(2):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.grad_scale, opt.found_inf = scaler._scale, torch.ones((), device="cuda")
    try:
        step_without_sync(opt)
    finally:
        del opt.grad_scale, opt.found_inf
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    for i, entry in before["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(value, after[i][key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_unscale_as_the_cpu_ones(dtype):
    x = adam_inputs(dtype, 70_000)
    on_gpu = {k: t.cuda() if k != "step" else t.clone() for k, t in x.items()}
    scale, found = amp()
    scale_gpu, found_gpu = amp("cuda")
    for y, s, f in ((x, scale, found), (on_gpu, scale_gpu, found_gpu)):
        ops.adam_update_([y["p"]], [y["g"]], [y["m"]], [y["v"]], [y["step"]], lr=1e-2,
                         increment_steps=True, amp_scale=s, found_inf=f)
        ops.accumulate_([y["r"]], [y["g"]], 1.0, amp_scale=s, found_inf=f)
    torch.testing.assert_close(on_gpu["p"].cpu(), x["p"])
    assert torch.equal(on_gpu["r"].cpu(), x["r"])
    assert torch.equal(on_gpu["step"], x["step"])
