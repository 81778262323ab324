"""What several test modules share: the devices to run on, the dtypes each device
takes, the mark for tests that need the compiled extension, the tolerances a
kernel's params and state are compared with, and a recorder of the one-call step's
answers. Fixtures and hooks live in conftest.py."""
import pytest
import torch

from incrkern import EXTENSION_LOADED, reference

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]  # the CPU's
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="needs the compiled extension")


def recorded(monkeypatch, name):
    """The answers of incrkern.optim.fast_step's C++ call `name`, in order: None per
    fallback."""
    from incrkern.optim import fast_step

    answers = []
    real = getattr(fast_step, name)

    def record(*args):
        answers.append(real(*args))
        return answers[-1]

    monkeypatch.setattr(fast_step, name, record)
    return answers


def cuda_copy(t, offset=0):
    """t copied to the GPU at storage offset `offset`. The storage is allocated on
    the device, so the offset (and the misalignment it makes) survives; t.cuda() of
    a CPU view copies only the view, to offset 0."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
    return buf[offset:].view(t.shape).copy_(t)


def assert_param_close(actual, expected, before=None):
    """`before`: the param before the step. Where the step nearly cancels it, the
    fp32 rounding differences of the two devices are of the size of |before|, not
    of the result: two fp32 ulps of |before| are allowed there too."""
    if actual.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        return
    # bf16/fp16 params: kernel and reference both compute in fp32 and round once to
    # the param dtype; torch's vectorised lerp (in the reference) uses a fused
    # multiply-add where the kernel rounds twice, so a fp32 result one fp32 ulp away
    # can round to the neighbouring bf16/fp16 value. Allow that one final ulp.
    a, e = actual.double(), expected.double()
    ulp = torch.finfo(actual.dtype).eps * torch.maximum(a.abs(), e.abs())
    ulp = torch.maximum(ulp, torch.full_like(ulp, torch.finfo(actual.dtype).tiny))
    if before is not None:
        ulp = ulp + 2 * torch.finfo(torch.float32).eps * before.double().abs()
    bad = (a - e).abs() > ulp
    assert not bad.any(), (f"{int(bad.sum())} of {a.numel()} elements more than one ulp "
                           f"apart, e.g. {a[bad][:4].tolist()} vs {e[bad][:4].tolist()}")


def assert_state_close(actual, expected):
    if actual.dtype == torch.int32:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def step_without_sync(opt):
    """opt.step() with CUDA's sync debug mode set to raise: any host synchronisation
    inside the step fails the test."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def capture_step(captured, eager):
    """One step of both optimizers on a side stream (their state made outside any
    capture), then `captured.step()` captured in a CUDA graph, which is returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        captured.step()
        eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    return graph


def cpu_sample_stride(n, s):
    """White-box: the first position and the stride of the CPU Selector's
    constant-stride sample of s keys of n (selector_cpu.h, sample_stride), mirrored."""
    stride = max(1, n // s)
    stride -= stride % 2 == 0
    return reference._fmix32(n ^ 0x9E3779B9) % stride, stride


def cpu_zero_probe(n):
    """White-box: the positions of the 512 keys whose nonzeros (at most 12) send a
    large tensor of n elements to the fused CPU step's listing of its nonzero tiles
    without a sample (fused_cpu.cpp, kNonzeroProbe), mirrored."""
    start, stride = cpu_sample_stride(n, 512)
    return torch.arange(512) * stride + start


# Approximate selection: the scores of test cases whose boundary bucket settles a
# radix search early, and the contract every approximate answer keeps.

def gap_scores(n, spread, gen=None):
    """(scores, big): n small scores with those at `big` (every 97th) raised to
    [4, 4 + spread). spread 1 puts a gap under them that one 11-bit histogram sees
    whole; 0.4 leaves their bucket barely reached."""
    big = torch.arange(0, n, 97)
    x = torch.rand(n, generator=gen) * 1e-3
    x[big] = 4.0 + spread * torch.rand(big.numel(), generator=gen)
    return x, big


def assert_approx_selection(got, x, k):
    """got (positions of x's |scores|) holds k +- max(1, k // 100) positions,
    ascending; every chosen score is at least every unchosen one, and at least
    (1 - APPROX_VALUE_TOLERANCE) times the true k-th."""
    from incrkern import ops
    n = x.numel()
    assert abs(got.numel() - k) <= max(1, int(k * ops.APPROX_COUNT_TOLERANCE)), k
    assert bool((got[1:] > got[:-1]).all())
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[got] = True
    scores = x.abs()
    if 0 < got.numel() < n:
        assert scores[chosen].min() >= scores[~chosen].max()
        kth = scores.topk(k).values[-1]
        assert scores[chosen].min() >= kth * (1 - ops.APPROX_VALUE_TOLERANCE)


def results_in_children(code, settings, tmp_dir):
    """torch.load of what `code` saves at sys.argv[1] when run by a child process under
    each of `settings` (environment variables set over the inherited ones, which lose
    INCRKERN_CPU_BASELINE and INCRKERN_SCAN_AHEAD first): one result per setting."""
    import os
    import subprocess
    import sys
    results = []
    for j, setting in enumerate(settings):
        env = {key: value for key, value in os.environ.items()
               if key not in ("INCRKERN_CPU_BASELINE", "INCRKERN_SCAN_AHEAD")}
        env.update(setting)
        path = os.path.join(str(tmp_dir), f"out{j}.pt")
        subprocess.run([sys.executable, "-c", code, path], check=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       timeout=300)
        results.append(torch.load(path))
    return results


def hot_rows_steps(dtype, steps=3):
    """A model's start and `steps` steps of grads for the fused routes' tests: tensors
    past one block and small ones, one an embedding's gradient of 40 hot rows (its
    k-th among zeros at the higher densities), the grads growing step by step."""
    torch.manual_seed(0)
    shapes = [(700, 1001), (3000, 128), (300, 257), (17,), (2, 3)]
    start = [torch.randn(s).to(dtype) for s in shapes]
    grads = []
    for i in range(steps):
        gs = [(torch.randn(s) * (i + 1)).to(dtype) for s in shapes]
        gs[1] = torch.zeros(shapes[1], dtype=dtype)
        gs[1][torch.randperm(3000)[:40]] = torch.randn(40, 128).to(dtype)
        grads.append(gs)
    return start, grads
