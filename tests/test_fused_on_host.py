"""The CUDA fused select-and-update (csrc/fused/fused_cuda_ops.cpp, then
fused_cuda.cu), run on the host by incrkern._C.cuda_fused_on_host over float32,
bfloat16 and float16 tensors with the code the GPU runs: the glue's groups, tensor table and options
(fused_table.h), the select's passes (select_on_host.h), the blocks' split of each
chunk and the per-element step (fused_pass.h) and the Adam rule (update_ops.h).
It is held to the reference as the CPU kernel is (test_fused.check): the chosen
set, params and moments to fp32 rounding, everything unchosen bit-identical,
residuals bit for bit; on every gradient structure, at chunk and share edges, with
k = 0 and k = n, error feedback, approximate mode, the learning rate and steps read
through pointers, mixed precision's unscale and skipped steps. The host run checks
what the kernel takes on trust: every element of a chunk is visited once, each pack
aligned. On a GPU, tests/test_fused_cuda.py holds the kernel itself to select then
adam_update_."""
import math

import pytest
import torch

from helpers import assert_param_close, needs_ext
from incrkern import ops
from test_fused import HYPERS, check, clone, ks_for, make, same

pytestmark = needs_ext

CHUNK = 16384  # select_tables.h's kSelectChunk
KINDS = ["normal", "student_t", "lognormal", "rows", "sparse", "zeros", "ties", "special"]
# Chunk edges; a last chunk of 7 elements splits 4 + 3 over the two blocks, one of 3
# leaves the second block nothing.
SIZES = [0, 1, 5, 4099, CHUNK - 1, CHUNK + 3, 2 * CHUNK + 7]


def on_host(x, ks, approx=False, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.0, decoupled_weight_decay=False, maximize=False, grad_scale=1.0,
            lr_tensor=None, amp_scale=None, found_inf=None, steps_on_device=False,
            increment_steps=False):
    """run_kernel's call, through the host run of the CUDA kernel."""
    from incrkern import _C
    hyper = (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
             grad_scale)
    return _C.cuda_fused_on_host(x["params"], x["grads"], x["m"], x["v"], x["steps"],
                                 list(ks), x["r"] or None, approx, hyper, lr_tensor,
                                 amp_scale, found_inf, steps_on_device, increment_steps)


def host_check(x, ks, approx=False, **hyper):
    return check(x, ks, approx=approx, kernel=on_host, **hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_exact_matches_reference(dtype, kind, residual):
    x = make(SIZES, dtype, kind, residual=residual)
    for ks in ([math.ceil(0.01 * n) for n in SIZES], [n // 3 for n in SIZES]):
        assert host_check(clone(x), ks, **HYPERS["adamw"]).tolist() == ks


@pytest.mark.parametrize("n", [1, 17, CHUNK + 1, 2 * CHUNK + 3])
def test_every_k(n):
    """k = 0 (only the residuals move), k = 1, n - 1, n (every element updated)."""
    for k in ks_for(n):
        x = make([n, 9], torch.float32, "ties", seed=k, residual=bool(k % 2))
        assert host_check(x, [k, min(k, 9)], **HYPERS["adam"]).tolist() == [k, min(k, 9)]


@pytest.mark.parametrize("kind", ["normal", "student_t", "rows", "sparse", "ties"])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_approx_keeps_the_contract(kind, residual):
    """approx=True is the select's approximate mode: within max(1, k // 100) of k."""
    sizes = [1000, 300_007]
    ks = [10, 3000]
    counts = host_check(make(sizes, torch.float32, kind, residual=residual), ks,
                        approx=True, **HYPERS["adamw"])
    for c, k in zip(counts.tolist(), ks):
        assert abs(c - k) <= max(1, k // 100)


@pytest.mark.parametrize("hyper", [HYPERS["adam"], HYPERS["maximize"],
                                   dict(HYPERS["adamw"], grad_scale=0.25)])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_hyperparameters(hyper, residual):
    x = make([3 * CHUNK + 11, 100], torch.float32, "student_t", seed=3, residual=residual)
    host_check(x, [500, 7], **hyper)


def test_many_tensors_in_one_call():
    """Segment s is the s-th non-empty tensor: the table and counts line up past
    empty tensors and tensors settled with k = 0 or k = n."""
    gen = torch.Generator().manual_seed(11)
    sizes = [0] + torch.randint(1, 40_000, (60,), generator=gen).tolist() + [0, 5]
    densities = [0.01, 0.001, 0.05, 0.0, 1.0]
    ks = [min(n, math.ceil(densities[i % 5] * n)) for i, n in enumerate(sizes)]
    for residual in (False, True):
        x = make(sizes, torch.float32, "student_t", seed=5, residual=residual)
        assert host_check(x, ks, **HYPERS["adamw"]).tolist() == ks


def test_lr_and_steps_read_through_pointers():
    """A learning-rate tensor and device steps: read by the kernel, after the glue
    counts the steps; the same result as the host values."""
    x = make([2 * CHUNK + 9, 100], torch.float32, "normal", seed=1, residual=True)
    ks = [700, 7]
    lr = torch.tensor(3e-3)  # the value path reads it as the float the tensor holds
    hyper = HYPERS["maximize"] | {"lr": float(lr)}
    by_value, by_pointer = clone(x), clone(x)
    on_host(by_value, ks, increment_steps=True, **hyper)
    on_host(by_pointer, ks, lr_tensor=lr, steps_on_device=True, increment_steps=True,
            **hyper | {"lr": 1.0})
    for key in ("params", "m", "v", "r", "steps"):
        for a, b in zip(by_value[key], by_pointer[key]):
            assert same(a, b), key
    assert [float(s) for s in by_pointer["steps"]] == [4.0, 4.0]
    # increment_steps: the update reads the count after it.
    counted = clone(x)
    for s in counted["steps"]:
        s.fill_(4.0)
    on_host(counted, ks, **hyper)
    for key in ("params", "m", "v", "r"):
        for a, b in zip(counted[key], by_value[key]):
            assert same(a, b), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_mixed_precision_unscale(dtype, residual):
    """Grads scaled by a power of two and read with amp_scale: bit for bit the call on
    the unscaled grads (the residual adds g / scale, the update reads the rest)."""
    x = make([CHUNK + 5, 333], dtype, "lognormal", seed=4, residual=residual)
    scaled = clone(x)
    scaled["grads"] = [g * 1024.0 for g in scaled["grads"]]
    ks = [200, 3]
    plain = on_host(x, ks, **HYPERS["adamw"])
    counts = on_host(scaled, ks, amp_scale=torch.tensor(1024.0), **HYPERS["adamw"])
    assert torch.equal(counts, plain)
    for key in ("params", "m", "v", "r"):
        for a, b in zip(x[key], scaled[key]):
            assert same(a, b), key


@pytest.mark.parametrize("steps_on_device", [False, True])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_found_inf_changes_nothing(steps_on_device, residual):
    """A skipped step: no element, residual or count moves; a device step gains
    1 - found_inf (0), a host one is never counted."""
    x = make([CHUNK + 5, 20], torch.float32, "normal", seed=6, residual=residual)
    before = clone(x)
    counts = on_host(x, [100, 20], amp_scale=torch.tensor(2.0), found_inf=torch.tensor(1.0),
                     steps_on_device=steps_on_device, increment_steps=True,
                     **HYPERS["adamw"])
    assert counts.tolist() == [0, 0]
    for key in before:
        for a, b in zip(x[key], before[key]):
            assert same(a, b), key
    # found_inf = 0: the step runs and is counted.
    counts = on_host(x, [100, 20], amp_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0),
                     steps_on_device=steps_on_device, increment_steps=True,
                     **HYPERS["adamw"])
    assert counts.tolist() == [100, 20]
    assert [float(s) for s in x["steps"]] == [4.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["grad", "accumulated"])
def test_same_as_the_cpu_kernel(dtype, residual):
    """The CPU kernel and the host run of the CUDA one choose the same elements and
    leave the same residuals; params to the rounding of their two Adam loops."""
    sizes = [7, 5000, 1_000_003]
    ks = [3, 50, 10_000]
    x = make(sizes, dtype, "student_t", residual=residual)
    before, cpu, host = clone(x), clone(x), clone(x)
    ops.adam_select_update_(cpu["params"], cpu["grads"], cpu["m"], cpu["v"], cpu["steps"], ks,
                            cpu["r"] or None, increment_steps=True, **HYPERS["adamw"])
    assert on_host(host, ks, increment_steps=True, **HYPERS["adamw"]).tolist() == ks
    for i in range(len(sizes)):
        for key in ("m", "v"):
            moved_cpu = (cpu[key][i] != before[key][i]).nonzero()
            moved_host = (host[key][i] != before[key][i]).nonzero()
            assert torch.equal(moved_cpu, moved_host), f"tensor {i}: chosen sets differ"
        assert_param_close(host["params"][i], cpu["params"][i], before["params"][i])
        if residual:
            assert same(host["r"][i], cpu["r"][i])
        assert torch.equal(host["steps"][i], cpu["steps"][i])


def test_bad_input_touches_nothing():
    x = make([100, 50], torch.float32, "normal", residual=True)
    before = clone(x)
    with pytest.raises(RuntimeError, match="ks"):
        on_host(x, [10], **HYPERS["adamw"])
    with pytest.raises(RuntimeError, match=r"ks\[1\]"):
        on_host(x, [10, 51], **HYPERS["adamw"])
    doubles = make([100, 50], torch.float64, "normal")
    with pytest.raises(RuntimeError, match="float32"):
        on_host(doubles, [10, 5], **HYPERS["adamw"])
    for key in before:
        for a, b in zip(x[key], before[key]):
            assert same(a, b), key
