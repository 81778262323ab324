import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_copy(t, offset=0):
    """t copied to the GPU at storage offset `offset`. The storage is allocated on
    the device, so the offset (and the misalignment it makes) survives; t.cuda() of
    a CPU view copies only the view, to offset 0."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
    return buf[offset:].view(t.shape).copy_(t)
