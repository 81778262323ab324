"""What `make gpu-check` runs before its build: bench/cuda_passes.cu compiles here with no
warnings against csrc's headers (where nvcc is found, as the build finds it), and the
compiler probe of scripts/check_cpp_errors.py finds one whose errors raise."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(find_nvcc() is None, reason="no nvcc")
def test_the_passes_benchmark_compiles_without_warnings(tmp_path):
    result = subprocess.run(
        [find_nvcc(), "-O3", "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings",
         "-Xcompiler", "-Wall", "-I", str(REPO / "csrc"), "-c",
         str(REPO / "bench" / "cuda_passes.cu"),
         "-o", str(tmp_path / "cuda_passes.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cuda_passes.o").stat().st_size > 0


def test_the_compiler_probe_names_a_compiler_whose_errors_raise_here():
    """scripts/check_cpp_errors.py --compilers, which gpu_check.sh builds with: on this
    machine a TORCH_CHECK in an extension raises, so the first compiler found does."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_cpp_errors.py"), "--compilers"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].endswith(": raises"), lines
    assert lines[-1] == "raising compiler: " + lines[0].split(" (")[0]
