"""pytest-benchmark suites (not part of `make test`): run them with

    python -m pytest bench/ --benchmark-only
    python -m pytest bench/ --benchmark-only --benchmark-autosave \\
        --benchmark-storage=bench/results/pytest-benchmark     # keep a history
    python -m pytest bench/ --benchmark-only --benchmark-compare   # against the last one

Small sizes: these track regressions of the main kernels from commit to commit on one
machine; `python -m incrkern.bench` gives the figures against torch and the roofline.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def bench_sync(benchmark, device):
    """benchmark(fn) that waits for the GPU after each call, so a CUDA kernel is timed
    to its end, not to its launch."""
    def run(fn, *args, **kwargs):
        if device.type == "cuda":
            def synced():
                out = fn(*args, **kwargs)
                torch.cuda.synchronize()
                return out
            return benchmark(synced)
        return benchmark(fn, *args, **kwargs)
    return run
