"""bench/cuda_passes.cu, which `make gpu-check` compiles and runs: it compiles here,
with no warnings, against csrc's headers (where nvcc is found, as the build finds it)."""
import os
import pathlib
import shutil
import subprocess

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
        [find_nvcc(), "-O3", "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings", "-Xcompiler", "-Wall",
         "-I", str(REPO / "csrc"), "-c", str(REPO / "bench" / "cuda_passes.cu"),
         "-o", str(tmp_path / "cuda_passes.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cuda_passes.o").stat().st_size > 0
