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
