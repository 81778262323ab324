"""What several test modules share: the devices to run on, the dtypes each device
takes, and the mark for tests that need the compiled extension. Fixtures and hooks
live in conftest.py."""
import pytest
import torch

from incrkern import EXTENSION_LOADED

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]  # the CPU's
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

needs_ext = pytest.mark.skipif(not EXTENSION_LOADED, reason="needs the compiled extension")


def cuda_copy(t, offset=0):
    """t copied to the GPU at storage offset `offset`. The storage is allocated on
    the device, so the offset (and the misalignment it makes) survives; t.cuda() of
    a CPU view copies only the view, to offset 0."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
    return buf[offset:].view(t.shape).copy_(t)
