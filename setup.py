"""Builds incrkern._C: the CPU kernels always, the CUDA kernels when nvcc is found and
torch was built with CUDA (a GPU need not be present). INCRKERN_CPU_ONLY=1 forces a
CPU-only build; TORCH_CUDA_ARCH_LIST chooses the GPU archs (default 8.0 and 9.0)."""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """CUDA_HOME, else the toolkit of the nvcc on PATH, else /usr/local/cuda: the first
    that holds both bin/nvcc and the runtime headers (torch alone would take /usr/local
    for a /usr/local/bin/nvcc wrapper script, and find no headers there)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
with open(os.path.join(ROOT, "incrkern", "_extension.py")) as _f:
    VERSION = re.search(r'^VERSION = "(.+)"', _f.read(), re.M).group(1)


def _run(cmd):
    try:
        return subprocess.check_output(cmd, stderr=subprocess.STDOUT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _nvcc():
    """Path and version of the nvcc torch would use, or (None, None)."""
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        return None, None
    out = _run([nvcc, "--version"]) or ""
    match = re.search(r"release (\d+\.\d+)", out)
    return nvcc, match.group(1) if match else None


def _want_cuda():
    if os.environ.get("INCRKERN_CPU_ONLY", "0") not in ("", "0"):
        return False, "INCRKERN_CPU_ONLY is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    nvcc, nvcc_version = _nvcc()
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if nvcc_version and nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(
            f"incrkern: nvcc {nvcc_version} ({nvcc}) and torch's CUDA {torch.version.cuda} "
            "differ in major version, and the extension would not load. Install a torch "
            "built for your CUDA, point CUDA_HOME at a matching toolkit, or build with "
            "INCRKERN_CPU_ONLY=1.")
    return True, f"nvcc {nvcc_version}"


def _sources(with_cuda):
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_glue = [s for s in cpp if s.endswith("_cuda_ops.cpp")]
    cpu = [s for s in cpp if s not in cuda_glue]
    if not with_cuda:
        return cpu
    return cpu + cuda_glue + sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))


def _write_build_info(with_cuda, reason, archs, cxx_flags, nvcc_flags):
    cxx = os.environ.get("CXX", "c++")
    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": with_cuda,
        "cuda_reason": reason,
        "cuda_archs": archs if with_cuda else None,
        "nvcc": _nvcc()[1] if with_cuda else None,
        "cxx": (_run([cxx, "--version"]) or "unknown").splitlines()[0],
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if with_cuda else None,
        "python": platform.python_version(),
    }
    with open(os.path.join(ROOT, "incrkern", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\nBUILD_INFO = %r\n" % (info,))


def extension():
    with_cuda, reason = _want_cuda()
    archs = None
    # -O3 and no -march=native: the binary must run on any x86-64 CPU. -fopenmp: ATen's
    # at::parallel_for is an OpenMP pragma in a header, so without it every parallel
    # loop of the extension runs on one thread. The libgomp.so.1 it links to is the
    # one torch has already loaded (same soname). -fno-semantic-interposition: calls
    # between the library's own functions (std::vector growth in the select kernels
    # among them) go direct, not through the PLT as -fPIC alone would have them.
    # -ffp-contract=off: as nvcc's --fmad=false below. gcc contracted the rule's
    # multiply-adds into FMAs in some loops and not in others (the vector body of the
    # masked stream against its scalar peel and the positional loop), so an element's
    # result depended on the path that updated it and on the tensor's alignment: a
    # shard cut at another offset rounded differently.
    # -fno-trapping-math: without it gcc may not compute a floating-point operation
    # that the source computes only under a condition (it could raise an exception
    # that the source would not), so a loop whose rule holds a select it has not
    # unswitched stays scalar where the ISA lacks masked operations (the tile loop's
    # AVX2 and SSE2 clones). No value changes: nothing reads the exception flags.
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
                 "-fno-semantic-interposition", "-ffp-contract=off"]
    # --fmad=false: nvcc contracts a multiply and an add into one FMA where it sees fit,
    # and sees fit differently in each kernel the same rule is inlined into, so the
    # update kernel and the fused select-and-update, which must agree bit for bit,
    # would round the same rule differently. The kernels are bound by memory and
    # launches, not by the few extra instructions.
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--fmad=false"]
    # INCRKERN_SANITIZE=address: the C++ built for AddressSanitizer (scripts/asan_check.sh).
    sanitize = os.environ.get("INCRKERN_SANITIZE", "")
    if sanitize not in ("", "address"):
        sys.exit(f"incrkern: INCRKERN_SANITIZE={sanitize!r}: only 'address' is supported")
    link_flags = ["-fopenmp"]
    if sanitize:
        cxx_flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        link_flags.append("-fsanitize=address")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        cxx_flags.append("-DINCRKERN_WITH_CUDA")
        if os.environ.get("INCRKERN_PTXAS_VERBOSE"):
            nvcc_flags.append("-Xptxas=-v")
    _write_build_info(with_cuda, reason, archs, cxx_flags, nvcc_flags)
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    args = {"cxx": cxx_flags}
    if with_cuda:
        args["nvcc"] = nvcc_flags
    return cls(
        name="incrkern._C",
        sources=_sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=args,
        extra_link_args=link_flags,
    )


setup(
    name="incrkern",
    version=VERSION,
    packages=find_packages(include=["incrkern", "incrkern.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)
