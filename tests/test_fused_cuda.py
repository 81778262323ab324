"""The CUDA kernel of incrkern.ops.adam_select_update_ (csrc/fused/fused_cuda.cu)
against select then adam_update_ on the same GPU (the composed path, which the
other CUDA tests check against the CPU): bit-identical params, moments, residuals,
grads, steps and counts, on every gradient structure, dtype and edge size, in exact
and approximate mode; against the CPU kernel and its own host run; in the optimizer;
past 2^31 elements.
GPU only."""
import copy
import math

import pytest
import torch

import incrkern
from incrkern import ops
from helpers import assert_param_close
from test_fused import assert_close_nan, clone, grads_of, ks_for, make, same

pytestmark = pytest.mark.cuda

KINDS = ["normal", "student_t", "lognormal", "rows", "sparse", "zeros", "ties", "special"]
SIZES = [0, 1, 5, 4099, 65536 * 3 + 7]  # the last spans 13 select chunks
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
             decoupled_weight_decay=True)


def to_cuda(x, device_steps=False):
    out = {k: [t.cuda() for t in v] for k, v in x.items()}
    if not device_steps:
        out["steps"] = [s.clone() for s in x["steps"]]  # host steps, as without capturable
    return out


def run(x, ks, fused, approx=False, **hyper):
    """The op with the CUDA kernel (fused) or composed from select and adam_update_."""
    saved = ops.FUSED_CUDA
    ops.FUSED_CUDA = fused
    try:
        counts = ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"],
                                         ks, x["r"] or None, approx=approx,
                                         increment_steps=True, **{**HYPER, **hyper})
    finally:
        ops.FUSED_CUDA = saved
    torch.cuda.synchronize()
    return counts.cpu()


def assert_same_runs(x, ks, approx=False, **hyper):
    fused, composed = clone(x), clone(x)
    got = run(fused, ks, True, approx, **hyper)
    want = run(composed, ks, False, approx, **hyper)
    assert torch.equal(got, want), (got, want)
    for key in ("params", "grads", "m", "v", "r", "steps"):
        for i, (a, b) in enumerate(zip(fused[key], composed[key])):
            assert same(a.cpu(), b.cpu()), f"{key}[{i}] differs"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_exact_matches_composed(dtype, kind, residual):
    x = to_cuda(make(SIZES, dtype, kind, residual=residual))
    for ks in ([math.ceil(0.01 * n) for n in SIZES], [n // 3 for n in SIZES]):
        assert assert_same_runs(x, ks).tolist() == ks


@pytest.mark.parametrize("n", [1, 17, 65536 * 2 + 1])
def test_every_k_matches_composed(n):
    for k in ks_for(n):
        x = to_cuda(make([n], torch.float32, "ties", seed=k, residual=bool(k % 2)))
        assert assert_same_runs(x, [k]).tolist() == [k]


@pytest.mark.parametrize("kind", ["normal", "student_t", "rows", "sparse", "ties"])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_approx_matches_composed(kind, residual):
    """approx=True on CUDA is select's approximate mode in both paths."""
    sizes = [1000, 1_000_003]
    x = to_cuda(make(sizes, torch.float32, kind, residual=residual))
    counts = assert_same_runs(x, [10, 10_000], approx=True)
    for c, k in zip(counts.tolist(), [10, 10_000]):
        assert abs(c - k) <= max(1, k // 100)


@pytest.mark.parametrize("hyper", [dict(weight_decay=0.0, maximize=True, beta1=0.8),
                                   dict(decoupled_weight_decay=False), dict(grad_scale=0.25)])
def test_hyper_and_lr_tensor_match_composed(hyper):
    x = to_cuda(make([300_001], torch.bfloat16, "student_t", residual=True), device_steps=True)
    assert_same_runs(x, [3000], **hyper)
    assert_same_runs(x, [3000], lr_tensor=torch.tensor(3e-3, device="cuda"), **hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_matches_the_cpu_kernel(dtype, residual):
    """Exact mode on both devices: the same chosen elements, params to the devices'
    rounding, residuals bit for bit (r + g rounds once in fp32 on both)."""
    sizes = [7, 5000, 1_000_003]
    ks = [3, 50, 10_000]
    x = make(sizes, dtype, "student_t", residual=residual)
    before, on_cpu, on_gpu = clone(x), clone(x), to_cuda(x)
    ops.adam_select_update_(on_cpu["params"], on_cpu["grads"], on_cpu["m"], on_cpu["v"],
                            on_cpu["steps"], ks, on_cpu["r"] or None, increment_steps=True,
                            **HYPER)
    run(on_gpu, ks, True)
    for i in range(len(sizes)):
        moved_cpu = (on_cpu["m"][i] != before["m"][i]).nonzero()
        moved_gpu = (on_gpu["m"][i].cpu() != before["m"][i]).nonzero()
        assert torch.equal(moved_cpu, moved_gpu), f"tensor {i}: chosen sets differ"
        assert_param_close(on_gpu["params"][i].cpu(), on_cpu["params"][i], before["params"][i])
        torch.testing.assert_close(on_gpu["m"][i].cpu(), on_cpu["m"][i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(on_gpu["v"][i].cpu(), on_cpu["v"][i], rtol=1e-5, atol=1e-9)
        if residual:
            assert same(on_gpu["r"][i].cpu(), on_cpu["r"][i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["student_t", "sparse", "ties", "special"])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_matches_its_host_run(dtype, kind, residual):
    """The kernel against its host run (incrkern._C.cuda_fused_on_host, which the CPU
    tests hold to the reference), with GradScaler's scale and device steps: the same
    counts, chosen sets, residuals and steps; params and moments to the rounding of
    the two devices' bias corrections."""
    from test_fused_on_host import on_host
    sizes = [5, 16384 * 2 + 7, 300_001]
    ks = [2, 300, 3000]
    x = make(sizes, dtype, kind, residual=residual)
    x["grads"] = [g * 256.0 for g in x["grads"]]
    before, host, gpu = clone(x), clone(x), to_cuda(x, device_steps=True)
    amp, found = torch.tensor(256.0), torch.tensor(0.0)
    want = on_host(host, ks, amp_scale=amp, found_inf=found, steps_on_device=True,
                   increment_steps=True, **HYPER)
    got = run(gpu, ks, True, amp_scale=amp.cuda(), found_inf=found.cuda())
    assert torch.equal(got, want), (got, want)
    for i in range(len(sizes)):
        moved_gpu = (gpu["m"][i].cpu() != before["m"][i]).nonzero()
        moved_host = (host["m"][i] != before["m"][i]).nonzero()
        assert torch.equal(moved_gpu, moved_host), f"tensor {i}: chosen sets differ"
        assert_close_nan(gpu["params"][i].cpu(), host["params"][i], before["params"][i])
        for key in ("m", "v"):
            assert_close_nan(gpu[key][i].cpu(), host[key][i])
        if residual:
            assert same(gpu["r"][i].cpu(), host["r"][i])
        assert torch.equal(gpu["steps"][i].cpu(), host["steps"][i])


def test_counts_stay_on_the_device_and_nothing_syncs():
    x = to_cuda(make([4099, 200_003], torch.float32, "normal", residual=True),
                device_steps=True)
    saved = ops.FUSED_CUDA
    ops.FUSED_CUDA = True
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts = ops.adam_select_update_(x["params"], x["grads"], x["m"], x["v"], x["steps"],
                                         [40, 2000], x["r"], increment_steps=True, **HYPER)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        ops.FUSED_CUDA = saved
    assert counts.is_cuda and counts.tolist() == [40, 2000]


def test_bad_input_touches_nothing():
    x = to_cuda(make([100], torch.float32, "normal"))
    before = clone(x)
    bad = [dict(ks=[101]), dict(grads=[x["grads"][0].half()]),
           dict(residuals=[torch.zeros(100, device="cuda", dtype=torch.float64)]),
           dict(params=[x["params"][0].cpu()])]
    for change in bad:
        args = dict(params=x["params"], grads=x["grads"], exp_avgs=x["m"], exp_avg_sqs=x["v"],
                    steps=x["steps"], ks=[10], residuals=[])
        args.update(change)
        with pytest.raises(RuntimeError, match="adam_select_update_"):
            torch.ops.incrkern.adam_select_update_(
                args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"],
                args["steps"], args["ks"], args["residuals"], False, 1e-2, 0.9, 0.999, 1e-8,
                0.0, False, False, increment_steps=True)
    for key in before:
        for a, b in zip(x[key], before[key]):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("options", [dict(density=0.01), dict(density=0.1, select="accumulated"),
                                     dict(density=0.05, accumulate_steps=2),
                                     dict(density=0.01, topk="approx")])
def test_optimizer_takes_the_kernel_with_the_same_result(monkeypatch, options):
    calls = []
    original = ops.adam_select_update_

    def counting(*args, **kwargs):
        calls.append(ops.FUSED_CUDA)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "adam_select_update_", counting)
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 700), (4099,), (17,)]
    params = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in shapes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opts = []
    for fused, ps in ((True, params), (False, twins)):
        monkeypatch.setattr(ops, "FUSED_CUDA", fused)
        opts.append(incrkern.optim.AdamW(ps, lr=1e-2, **options))
    for step in range(4):
        grads = [grads_of("student_t", p.numel(), gen).view(p.shape).cuda() for p in params]
        for fused, ps, opt in ((True, params, opts[0]), (False, twins, opts[1])):
            monkeypatch.setattr(ops, "FUSED_CUDA", fused)
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert calls and all(calls), "the fused kernel was not called"
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    a, b = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    for i in a:
        for key, value in a[i].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[i][key]), key


def test_past_2_31_elements():
    """One tensor of 2^31 + 5 bf16 elements (26 GB with its fp32 moments): the
    chosen elements past 2^31 are found and updated, nothing else moves."""
    free, _ = torch.cuda.mem_get_info()
    n = 2 ** 31 + 5
    if free < 40 * 2 ** 30:
        pytest.skip("needs 40 GB of free GPU memory")
    hot = torch.tensor([3, 2 ** 31 - 1, 2 ** 31, n - 1], device="cuda")
    p = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    g[hot] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16, device="cuda")
    m = torch.zeros(n, device="cuda")
    v = torch.zeros(n, device="cuda")
    saved = ops.FUSED_CUDA
    ops.FUSED_CUDA = True
    try:
        counts = ops.adam_select_update_([p], [g], [m], [v], [torch.tensor(0.0)], [4],
                                         increment_steps=True, lr=1e-2)
    finally:
        ops.FUSED_CUDA = saved
    assert counts.tolist() == [4]
    assert int((m != 0).sum()) == 4 and bool((m[hot] != 0).all())
    assert int((p != 0).sum()) == 4
    del p, g, m, v
    torch.cuda.empty_cache()


def test_resumed_optimizer_steps_like_the_original():
    """An optimizer loaded from the state dict of one whose step took the kernel
    steps as the original does (the kernel keeps no state of its own)."""
    params = [torch.randn(1000, device="cuda", requires_grad=True)]
    saved = ops.FUSED_CUDA
    ops.FUSED_CUDA = True
    try:
        opt = incrkern.optim.AdamW(params, lr=1e-2, density=0.1)
        params[0].grad = torch.randn(1000, device="cuda")
        opt.step()
        twin_params = [params[0].detach().clone().requires_grad_()]
        twin = incrkern.optim.AdamW(twin_params, lr=1e-2, density=0.1)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        g = torch.randn(1000, device="cuda")
        params[0].grad, twin_params[0].grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    finally:
        ops.FUSED_CUDA = saved
    assert torch.equal(params[0], twin_params[0])
