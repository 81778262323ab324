"""density=1.0: incrkern's optimizers are torch.optim's, to float32 rounding."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import incrkern
from incrkern import ops
from helpers import DEVICES

SHAPES = [(0,), (1,), (7,), (31, 3), (4, 5, 6), (1000,)]

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True)),
    ("Adam", dict(lr=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, weight_decay=0.05, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.3)),
    ("AdamW", dict(lr=3e-3, weight_decay=0.0, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, betas=(0.5, 0.9), weight_decay=0.3, amsgrad=True, maximize=True)),
]


def make_params(dtype=torch.float32, device="cpu"):
    params = [torch.randn(s, dtype=dtype, device=device) for s in SHAPES]
    # a non-contiguous leaf (a transposed matrix) among them
    params.append(torch.randn(6, 9, dtype=dtype, device=device).t())
    return [p.requires_grad_() for p in params]


def clone_params(params):
    return [p.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            for p in params]


def groups(params, lr):
    """Two param groups with different learning rates."""
    return [{"params": params[:4]}, {"params": params[4:], "lr": lr * 0.3}]


def run(opt, params, grads_per_step, scheduler=None):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def random_grads(params, steps):
    out = []
    for s in range(steps):
        # one param has no grad on some steps: it must be skipped, not zeroed
        out.append([None if (i == 2 and s % 5 == 0) else torch.randn_like(p)
                    for i, p in enumerate(params)])
    return out


def assert_state_equal(ours, theirs, rtol=1e-5, atol=1e-6):
    for p_state, q_state in zip(ours, theirs):
        assert set(p_state) == set(q_state)
        for key in p_state:
            a, b = p_state[key], q_state[key]
            torch.testing.assert_close(a.to(b.dtype).cpu(), b.cpu(), rtol=rtol, atol=atol,
                                       msg=key)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_equals_torch_optim(name, kwargs):
    params = make_params()
    ref_params = clone_params(params)
    ours = getattr(incrkern.optim, name)(groups(params, kwargs["lr"]), **kwargs)
    theirs = getattr(torch.optim, name)(groups(ref_params, kwargs["lr"]), foreach=False,
                                        **kwargs)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=10, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=10, gamma=0.5)
    grads = random_grads(params, 50)
    run(ours, params, grads, sched_ours)
    run(theirs, ref_params, grads, sched_theirs)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert p.stride() == q.stride()
    assert_state_equal([ours.state[p] for p in params], [theirs.state[q] for q in ref_params])
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("name,kwargs", [CASES[10], CASES[11]])
def test_amsgrad_equals_torch_multi_tensor_and_fused(name, kwargs, impl):
    """amsgrad=True against torch's foreach and fused implementations too, with a
    NaN gradient element on one step (its maximum stays NaN, as in torch)."""
    params = make_params()
    ref_params = clone_params(params)
    ours = getattr(incrkern.optim, name)(params, **kwargs)
    theirs = getattr(torch.optim, name)(ref_params, **{impl: True}, **kwargs)
    grads = random_grads(params, 12)
    grads[6][3].view(-1)[1] = float("nan")
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, equal_nan=True)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(ours.state[p]["max_exp_avg_sq"],
                                   theirs.state[q]["max_exp_avg_sq"], rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
    assert ours.state[params[3]]["max_exp_avg_sq"].view(-1)[1].isnan()


@pytest.mark.parametrize("name,kwargs", [CASES[2], CASES[5], CASES[8], CASES[10]])
def test_float64_equals_torch_optim(name, kwargs):
    params = make_params(torch.float64)
    ref_params = clone_params(params)
    ours = getattr(incrkern.optim, name)(params, **kwargs)
    theirs = getattr(torch.optim, name)(ref_params, foreach=False, **kwargs)
    grads = random_grads(params, 20)
    run(ours, params, grads)
    run(theirs, ref_params, grads)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.fixture
def reference_path(monkeypatch):
    """Runs every op on incrkern.reference instead of the compiled kernels."""
    monkeypatch.setattr(ops, "_kernel", lambda name, device: None)


def run_low_precision(name, kwargs, dtype, steps=20):
    params = make_params(dtype)
    opt = getattr(incrkern.optim, name)(params, **kwargs)
    grads = random_grads(params, steps)
    run(opt, params, grads)
    return params, opt, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kwargs", [CASES[3], CASES[6], CASES[8], CASES[11]])
def test_low_precision_params_equal_reference(name, kwargs, dtype, monkeypatch):
    torch.manual_seed(1)
    params, opt, _ = run_low_precision(name, kwargs, dtype)
    torch.manual_seed(1)
    monkeypatch.setattr(ops, "_kernel", lambda n, d: None)
    ref_params, ref_opt, _ = run_low_precision(name, kwargs, dtype)
    for p, q in zip(params, ref_params):
        assert p.dtype == dtype
        # fp32 math, one rounding to the param dtype per step: equal to the reference
        # up to an occasional last-bit difference of that rounding.
        torch.testing.assert_close(p, q, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                   atol=1e-3)
    for p, q in zip(params, ref_params):
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32  # state stays fp32
            torch.testing.assert_close(value, ref_opt.state[q][key], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,kwargs", [CASES[2], CASES[6], CASES[8], CASES[11]])
def test_state_dict_round_trip_is_bit_identical(name, kwargs):
    params = make_params()
    opt = getattr(incrkern.optim, name)(groups(params, kwargs["lr"]), **kwargs)
    grads = random_grads(params, 30)
    run(opt, params, grads[:10])
    saved = copy.deepcopy(opt.state_dict())
    params2 = clone_params(params)
    opt2 = getattr(incrkern.optim, name)(groups(params2, kwargs["lr"]), **kwargs)
    opt2.load_state_dict(saved)
    run(opt, params, grads[10:])
    run(opt2, params2, grads[10:])
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name,kwargs", [CASES[2], CASES[6], CASES[8], CASES[10]])
def test_torch_state_dict_loads_and_back(name, kwargs):
    params = make_params()
    theirs = getattr(torch.optim, name)(clone_params(params), foreach=False, **kwargs)
    grads = random_grads(params, 20)
    run(theirs, theirs.param_groups[0]["params"], grads[:10])
    ours_params = [p.detach().clone().requires_grad_() for p in theirs.param_groups[0]["params"]]
    ours = getattr(incrkern.optim, name)(ours_params, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    run(ours, ours_params, grads[10:])
    run(theirs, theirs.param_groups[0]["params"], grads[10:])
    for p, q in zip(ours_params, theirs.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # and back: torch continues from incrkern's state
    back_params = [p.detach().clone().requires_grad_() for p in ours_params]
    back = getattr(torch.optim, name)(back_params, foreach=False, **kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    run(back, back_params, grads[:5])
    run(ours, ours_params, grads[:5])
    for p, q in zip(ours_params, back_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lr_tensor_and_closure():
    params = make_params()
    ref_params = clone_params(params)
    ours = incrkern.optim.AdamW(params, lr=torch.tensor(0.01))
    theirs = torch.optim.AdamW(ref_params, lr=0.01, foreach=False)
    target = [torch.randn_like(p) for p in params]

    def closure_for(ps, opt):
        def closure():
            opt.zero_grad()
            loss = sum(((p - t) ** 2).sum() for p, t in zip(ps, target))
            loss.backward()
            return loss
        return closure

    for _ in range(10):
        l1 = ours.step(closure_for(params, ours))
        l2 = theirs.step(closure_for(ref_params, theirs))
        torch.testing.assert_close(l1, l2)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_grad_raises_and_touches_nothing(bad):
    params = make_params()
    opt = incrkern.optim.Adam(params, lr=0.1)
    run(opt, params, random_grads(params, 2))
    for p in params:
        p.grad = torch.randn_like(p)
    before = copy.deepcopy((params, opt.state_dict()))
    if bad == "shape":
        params[-2].grad.set_(torch.randn(3))
    else:
        if hasattr(params[-2], "grad_dtype"):
            params[-2].grad_dtype = None  # let autograd's own guard through, to test ours
        params[-2].grad = torch.randn_like(params[-2], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="param_groups\\[0\\]\\['params'\\]\\[5\\]"):
        opt.step()
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for k, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, after[k][key])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "learning rate"),
    (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    (dict(eps=-1e-8), "epsilon"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(select="loss"), "select"),
    (dict(scope="layer"), "scope"),
    (dict(topk="fast"), "topk"),
    (dict(accumulate_steps=0), "accumulate_steps"),
    (dict(mask="sometimes"), "mask"),
    (dict(bias_correction="global"), "bias_correction"),
    (dict(fisher_beta=1.0), "fisher_beta"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        incrkern.optim.Adam(make_params(), **kwargs)


def test_integer_param_rejected():
    with pytest.raises(TypeError, match="floating point"):
        incrkern.optim.SGD([torch.zeros(3, dtype=torch.int64)], lr=0.1)


def test_build_info():
    info = incrkern.build_info()
    assert info["version"] == incrkern.__version__
    assert info["extension_loaded"] is True, info["load_error"]
    assert set(info) >= {"torch", "cuda_kernels", "cuda_archs", "nvcc", "cxx", "cxx_flags"}
    # the flags the extension's rounding depends on (docs/design.md, Build)
    assert "-ffp-contract=off" in info["cxx_flags"]
    if info["cuda_kernels"]:
        assert info["cuda_kernels_loaded"]
        assert "--fmad=false" in info["nvcc_flags"]


def test_an_unknown_sanitizer_is_refused_before_the_build():
    # Refused before setup.py writes incrkern/_build_info.py or builds anything.
    repo = Path(__file__).resolve().parent.parent
    before = (repo / "incrkern" / "_build_info.py").read_bytes()
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=repo,
                            env={**os.environ, "INCRKERN_SANITIZE": "thread"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "INCRKERN_SANITIZE='thread': only 'address' is supported" in result.stderr
    assert (repo / "incrkern" / "_build_info.py").read_bytes() == before


def test_import_without_extension_warns_and_works():
    code = (
        "import sys, warnings\n"
        "sys.modules['incrkern._C'] = None  # the extension fails to import\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import incrkern, torch\n"
        "assert len([x for x in w if 'reference path' in str(x.message)]) == 1, w\n"
        "assert not incrkern.EXTENSION_LOADED\n"
        "p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)\n"
        "incrkern.optim.AdamW([p], lr=0.1).step()\n"
        "assert torch.all(p < 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(
        __import__("pathlib").Path(__file__).parent.parent))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kwargs", [CASES[3], CASES[6], CASES[8], CASES[11]])
def test_cuda_equals_cpu(name, kwargs, dtype):
    torch.manual_seed(2)
    params = make_params(dtype)
    params.append(torch.randn(300001, dtype=dtype).requires_grad_())  # > 4 chunks, odd
    cuda_params = [p.detach().cuda().requires_grad_() for p in params]
    opt = getattr(incrkern.optim, name)(params, **kwargs)
    cuda_opt = getattr(incrkern.optim, name)(cuda_params, **kwargs)
    for _ in range(10):
        for p, q in zip(params, cuda_params):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.cuda()
        opt.step()
        cuda_opt.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for p, q in zip(params, cuda_params):
        torch.testing.assert_close(q.cpu(), p, **tol)
