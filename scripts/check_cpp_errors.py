"""Whether an error raised in an extension's C++ reaches Python as a RuntimeError on
this machine, or crashes the process, and under which of setup.py's compile flags.

Builds one tiny op per flag set (torch.utils.cpp_extension.load_inline, registered
with TORCH_LIBRARY as incrkern's ops are), each in its own process, calls it with a
failing TORCH_CHECK and prints one line per flag set: "raises" or the signal that
killed the process. incrkern's own extension is checked first, in seconds, so that a
run stopped during the builds still says whether its errors raise. Run by
scripts/gpu_check.sh; needs ninja and a C++ compiler, not a GPU.

    python scripts/check_cpp_errors.py --own   # incrkern's extension alone"""
import os
import subprocess
import sys
import tempfile

import incrkern

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <torch/library.h>
at::Tensor fail(const at::Tensor& x) {
  TORCH_CHECK(x.numel() < 0, "check_cpp_errors: x has ", x.numel(), " elements");
  return x;
}
TORCH_LIBRARY(NAME, m) { m.def("fail(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(NAME, CPU, m) { m.impl("fail", &fail); }
"""


def flag_sets():
    """torch's defaults, then three of setup.py's flags alone, then all of them as the
    installed extension was built (incrkern.build_info(), its defines left out)."""
    built = [f for f in incrkern.build_info()["cxx_flags"] if not f.startswith("-D")]
    sets = {"torch's defaults": []}
    sets.update({flag: [flag] for flag in ("-std=c++20", "-fopenmp",
                                           "-fno-semantic-interposition")})
    sets["setup.py's"] = built
    return sets


CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
name, flags, build = sys.argv[1], sys.argv[2].split(), sys.argv[3]
load_inline(name, cpp_sources=[open(sys.argv[4]).read().replace("NAME", name)],
            is_python_module=False, extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], build_directory=build)
try:
    getattr(torch.ops, name).fail(torch.zeros(2))
except RuntimeError as exc:
    print("raises" if "x has 2 elements" in str(exc) else "raises, other text: " + str(exc))
"""

OWN = r"""
import torch, incrkern
try:
    torch.ops.incrkern.adam_update_([torch.zeros(3)], [torch.zeros(4)], [torch.zeros(3)],
                                    [torch.zeros(3)], [torch.tensor(0.0)])
except RuntimeError as exc:
    print("raises")
"""


def outcome(returncode, stdout, stderr):
    if returncode < 0:
        return f"crashes (signal {-returncode})"
    lines = stdout.strip().splitlines()
    return lines[-1] if lines else f"exit {returncode}: {stderr.strip()[-300:]}"


def main():
    own = subprocess.run([sys.executable, "-c", OWN], capture_output=True, text=True)
    print(f"incrkern's extension: {outcome(own.returncode, own.stdout, own.stderr)}",
          flush=True)
    if sys.argv[1:] == ["--own"]:
        return
    work = tempfile.mkdtemp(prefix="check_cpp_errors_")
    source = os.path.join(work, "op.cpp")
    with open(source, "w") as f:
        f.write(SOURCE)
    procs = {}
    for i, (label, flags) in enumerate(flag_sets().items()):
        build = os.path.join(work, f"b{i}")
        os.makedirs(build)
        procs[label] = subprocess.Popen(
            [sys.executable, "-c", CHILD, f"check_cpp_errors_{i}", " ".join(flags), build,
             source], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for label, proc in procs.items():
        out, err = proc.communicate()
        print(f"{label}: {outcome(proc.returncode, out, err)}")


if __name__ == "__main__":
    main()
