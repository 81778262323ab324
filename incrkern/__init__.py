"""incrkern: incremental (sparse) training updates for PyTorch, with fused kernels.

At each step only a chosen fraction of the parameters is updated. The optimizers in
`incrkern.optim` are drop-in replacements for torch.optim.SGD / Adam / AdamW; the ops in
`incrkern.ops` are the kernels underneath (C++/CUDA, with a pure-torch fallback in
`incrkern.reference`).
"""
from ._extension import EXTENSION_LOADED, build_info
from . import ops, reference, optim

__version__ = build_info()["version"]
__all__ = ["ops", "optim", "reference", "build_info", "EXTENSION_LOADED", "__version__"]
