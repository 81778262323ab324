"""Loads the compiled extension, or explains once why the reference path is used."""
import warnings

import torch

VERSION = "0.1.0"

try:
    from . import _C  # noqa: F401  (registers torch.ops.incrkern.*)

    EXTENSION_LOADED = True
    _LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    EXTENSION_LOADED = False
    _LOAD_ERROR = exc
    warnings.warn(
        f"incrkern: the compiled extension could not be loaded ({exc}); every op runs on "
        "the pure-torch reference path (correct, but slower). Build it with "
        "`make build` or `python setup.py build_ext --inplace`.",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_kernels_loaded():
    """Whether the loaded extension has CUDA kernels registered."""
    return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        "incrkern::adam_update_", "CUDA")


def build_info():
    """What was built: versions, whether CUDA kernels were compiled and for which archs."""
    try:
        from ._build_info import BUILD_INFO
        info = dict(BUILD_INFO)
    except ImportError:
        info = {"version": VERSION, "cuda_kernels": False, "cuda_reason": "not built"}
    info["extension_loaded"] = EXTENSION_LOADED
    info["load_error"] = None if _LOAD_ERROR is None else str(_LOAD_ERROR)
    info["cuda_kernels_loaded"] = cuda_kernels_loaded()
    info["torch_runtime"] = torch.__version__
    return info
