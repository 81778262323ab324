"""The CUDA sgd_select_update_ (csrc/fused/fused_cuda_ops.cpp, then fused_cuda.cu: the
Adam kernel's selection and fused pass with SGD's rule), run on the host by
incrkern._C.cuda_sgd_fused_on_host over float32, bfloat16 and float16 tensors with the
code the GPU runs: the glue's groups, SGD's tensor table and options (fused_table.h),
the select's passes (select_on_host.h), the blocks' split of each chunk, the element
step and update (fused_pass.h) and SgdOp (update_ops.h). Held to the reference as the
CPU kernel is (test_fused_sgd.check), and to the CPU kernel bit for bit; the host run
checks that every element of a chunk is visited once. On a GPU,
test_fused_sgd.test_cuda_as_the_cpu_kernel holds the kernel itself to the CPU's."""
import math

import pytest
import torch

from helpers import needs_ext
from test_fused import same
from test_fused_on_host import CHUNK, KINDS, SIZES
from test_fused_sgd import HYPERS, check, clone, full, make, run

pytestmark = needs_ext


def on_host(x, ks, approx=False, first=None, lr=1e-3, momentum=0.0, dampening=0.0,
            weight_decay=0.0, nesterov=False, maximize=False, grad_scale=1.0,
            lr_tensor=None, amp_scale=None, found_inf=None):
    """test_fused_sgd.run's call, through the host run of the CUDA kernel."""
    from incrkern import _C
    hyper = (lr, momentum, dampening, weight_decay, nesterov, maximize, grad_scale)
    return _C.cuda_sgd_fused_on_host(x["params"], x["grads"], x["bufs"], list(ks), x["r"],
                                     [int(f) for f in first or []], approx, hyper, lr_tensor,
                                     amp_scale, found_inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_exact_matches_reference(dtype, kind, residual):
    x = make(SIZES, dtype, kind, residual=residual)
    for ks in ([math.ceil(0.01 * n) for n in SIZES], [n // 3 for n in SIZES], SIZES):
        counts = check(clone(x), ks, kernel=on_host, **HYPERS["nesterov"])
        assert counts.tolist() == ks


@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("first", [False, True])
def test_every_option(hyper, first):
    """Momentum (a new buffer takes the gradient as it is), nesterov, dampening,
    weight decay, maximize, and no momentum (no buffers)."""
    sizes = [2 * CHUNK + 7, 1000, 1]
    x = make(sizes, torch.float32, "student_t", seed=3, buffers=hyper != "plain",
             residual=True)
    check(x, [CHUNK // 7, 0, 1], first=[first] * 3 if x["bufs"] else None, kernel=on_host,
          **HYPERS[hyper])


@pytest.mark.parametrize("kind", ["normal", "rows", "ties"])
def test_approx_keeps_the_contract(kind):
    sizes = [3 * CHUNK + 1, 900]
    check(make(sizes, torch.float32, kind, seed=5, residual=True), [CHUNK // 3, 90],
          approx=True, kernel=on_host, **HYPERS["dampening"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_same_as_the_cpu_kernel(dtype, residual):
    """The CPU kernel and the host run of the CUDA one leave the same params, buffers
    and residuals, bit for bit: the same set, and SGD's rule in fp32 on both; with
    grad_scale, GradScaler's scale and lr as a tensor too."""
    sizes = [7, 5000, 1_000_003]
    ks = [3, 50, 10_000]
    amp = dict(amp_scale=torch.tensor(256.0), found_inf=torch.tensor(0.0))
    for extra in ({}, dict(amp, grad_scale=0.5, lr_tensor=torch.tensor(0.02))):
        x = make(sizes, dtype, "student_t", residual=residual)
        cpu, host = clone(x), clone(x)
        hyper = dict(full(HYPERS["nesterov"]), **extra)
        assert run(cpu, ks, **hyper).tolist() == ks
        assert on_host(host, ks, **hyper).tolist() == ks
        for key in ("params", "bufs", "r"):
            for a, b in zip(host[key], cpu[key]):
                assert same(a, b), (key, extra.keys())


def test_found_inf_changes_nothing():
    x = make([CHUNK + 3, 40], torch.float32, "normal", residual=True)
    before = clone(x)
    counts = on_host(x, [100, 4], amp_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0),
                     **HYPERS["momentum"])
    assert counts.tolist() == [0, 0]
    for key in before:
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key


def test_bad_input_touches_nothing():
    x = make([100, 50], torch.float32, "normal", residual=True)
    before = clone(x)
    with pytest.raises(RuntimeError, match=r"ks\[1\]"):
        on_host(x, [10, 51], **HYPERS["momentum"])
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        on_host(dict(x, bufs=x["bufs"][:1]), [10, 5], **HYPERS["momentum"])
    doubles = make([100, 50], torch.float64, "normal")
    with pytest.raises(RuntimeError, match="float32"):
        on_host(doubles, [10, 5], **HYPERS["momentum"])
    for key in before:
        assert all(same(a, b) for a, b in zip(x[key], before[key])), key
