"""Whether an error raised in an extension's C++ reaches Python as a RuntimeError on
this machine, or crashes the process, and under which of setup.py's compile flags.

Builds one tiny op per flag set (torch.utils.cpp_extension.load_inline, registered
with TORCH_LIBRARY as incrkern's ops are), each in its own process, calls it with a
failing TORCH_CHECK and prints one line per flag set: "raises" or the signal that
killed the process. incrkern's own extension is checked first, in seconds, so that a
run stopped during the builds still says whether its errors raise. Run by
scripts/gpu_check.sh; needs ninja and a C++ compiler, not a GPU.

    python scripts/check_cpp_errors.py --own        # incrkern's extension alone
    python scripts/check_cpp_errors.py --compilers  # torch's flags, each C++ compiler

--compilers needs no incrkern: it builds the op with torch's flags once per C++
compiler found (CXX, c++, g++, clang++ and the system's /usr/bin ones), and its last
line names the first whose errors raise ("raising compiler: PATH", or "none"), for
gpu_check.sh to build incrkern with (where the image's default compiler's errors
crash the process, as on the H200's of 4 December, every bad-input test would)."""
import os
import shutil
import subprocess
import sys
import tempfile

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
    import incrkern

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


def compilers():
    """The C++ compilers found, each once (by the file it resolves to), CXX's first."""
    found = {}
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++", "/usr/bin/g++",
                 "/usr/bin/clang++"):
        path = shutil.which(name) if name else None
        if path and os.path.realpath(path) not in found:
            found[os.path.realpath(path)] = path
    return list(found.values())


def build_and_call(work, source, tag, flags, env=None):
    """The child's outcome: its op built with `flags` (and `env`'s CXX) and called."""
    build = os.path.join(work, tag)
    os.makedirs(build)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, f"check_cpp_errors_{tag}", " ".join(flags), build,
         source], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def scratch_source():
    """A scratch folder holding the op's source, and the source's path."""
    work = tempfile.mkdtemp(prefix="check_cpp_errors_")
    source = os.path.join(work, "op.cpp")
    with open(source, "w") as f:
        f.write(SOURCE)
    return work, source


def check_compilers():
    work, source = scratch_source()
    procs = {cxx: build_and_call(work, source, f"c{i}", [], dict(os.environ, CXX=cxx))
             for i, cxx in enumerate(compilers())}
    raising = None
    for cxx, proc in procs.items():
        out, err = proc.communicate()
        result = outcome(proc.returncode, out, err)
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True)
        print(f"{cxx} ({version.stdout.splitlines()[0] if version.stdout else '?'}): {result}")
        if result == "raises" and raising is None:
            raising = cxx
    print(f"raising compiler: {raising or 'none'}")


def main():
    if sys.argv[1:] == ["--compilers"]:
        return check_compilers()
    own = subprocess.run([sys.executable, "-c", OWN], capture_output=True, text=True)
    print(f"incrkern's extension: {outcome(own.returncode, own.stdout, own.stderr)}",
          flush=True)
    if sys.argv[1:] == ["--own"]:
        return
    work, source = scratch_source()
    procs = {label: build_and_call(work, source, f"b{i}", flags)
             for i, (label, flags) in enumerate(flag_sets().items())}
    for label, proc in procs.items():
        out, err = proc.communicate()
        print(f"{label}: {outcome(proc.returncode, out, err)}")


if __name__ == "__main__":
    main()
