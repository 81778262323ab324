"""The compiled CPU loops over scattered positions, and the vector scans over every
key, keep their prefetches; the update loops stay vectorised in their ISA clones. A
compiler may drop a prefetch without a trace (GCC takes a function that only
prefetches for a pure one), or leave a loop scalar (a select turned into a branch,
an operation it may not speculate, a struct it does not load as a vector, a lambda
not inlined into a clone and so compiled for the baseline ISA): the results stay
right and only the speed changes, so no other test would notice. These read the
extension's machine code."""
import re
import shutil
import subprocess

import pytest

from helpers import needs_ext

# Functions (demangled-name fragments) whose loop over scattered elements requests
# its lines ahead: the update ops' per-dtype loops, the fused call's small tensors
# (inlined into its parallel loop), its tile lists (update_listed: a block's, for
# one tensor's band and for a global group's), the selection's listed tiles
# (the sample's constant stride is left to the hardware prefetcher); then the
# vector scans, which request the lines 2 KB ahead of them.
# A fragment may also be found in its mangled form (MANGLED): objdump leaves the
# names of the lambdas of claimed passes (parallel_for_claimed inside parallel_claims
# inside at::parallel_for) mangled.
PREFETCHING = [
    "adam_ranges<float, float, float>",
    "adam_ranges<c10::BFloat16, c10::BFloat16, float>",
    "adam_ranges<c10::Half, float, float>",
    "adam_ranges<double, double, double>",
    "sgd_ranges<float, float, float>",
    "sgd_ranges<c10::BFloat16, c10::BFloat16, float>",
    "adam_select_update_checked(",
    "update_listed<float>(",
    "run_zero_floor<float>(",
    "tiles_at_least_avx2<float, false>(",
    "list_tiles_avx2<float>(",
    "band_keys_avx2<float, false>(",
    "band_avx2<float, false>(",
    "tile_max_avx2<float, false>(",
]
MANGLED = {"run_zero_floor<float>(": "14run_zero_floorIfE"}


# The loops compiled once per ISA (update/adam_stream_cpu.h, IK_ISA_CLONES), the
# clones whose loop runs on packed vectors, and the packed instruction that shows it
# (Adam's square root, SGD's multiply): every clone of the streaming loops (fp32,
# bf16 and fp16 params); the AVX2 and AVX-512 ones of the tile loops, whose baseline
# clones stay scalar.
ALL_CLONES = ["[clone .default]", "[clone .arch_x86_64_v3]", "[clone .arch_x86_64_v4]"]
TYPES = ["float*, float*", "c10::BFloat16*, c10::BFloat16*", "c10::BFloat16*, float*",
         "c10::Half*, c10::Half*", "c10::Half*, float*"]
VECTORISED = {
    **{f"adam_stream{kind}_cloned({types},": (ALL_CLONES, "sqrtps")
       for kind in ("", "_above") for types in TYPES},
    **{f"adam_tiles_cloned({types},": (ALL_CLONES[1:], "sqrtps") for types in TYPES},
    **{f"sgd_stream_cloned({types},": (ALL_CLONES, "mulps") for types in TYPES},
    **{f"adam_stream_amsgrad_cloned({types},": (ALL_CLONES, "sqrtps") for types in TYPES},
}


def disassembly():
    """The extension's functions (demangled names) and their instructions."""
    from incrkern import _C  # only once needs_ext has seen it load

    if not _C.__file__.endswith(".so"):
        pytest.skip("not an ELF shared object")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
                         capture_output=True, text=True, check=True).stdout
    functions = {}
    name = None
    for line in asm.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            functions.setdefault(name, [])
        elif name:
            functions[name].append(line)
    return functions


@needs_ext
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_positional_loops_keep_their_prefetches():
    prefetching = {name for name, lines in disassembly().items()
                   if any("prefetcht" in line for line in lines)}
    for fragment in PREFETCHING:
        forms = [fragment] + ([MANGLED[fragment]] if fragment in MANGLED else [])
        assert any(form in n for n in prefetching for form in forms), (
            f"no prefetch instruction left in any function named like {fragment!r}")


@needs_ext
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_update_loops_vectorised_in_their_clones():
    functions = disassembly()
    for fragment, (clones, packed) in VECTORISED.items():
        for clone in clones:
            bodies = [lines for name, lines in functions.items()
                      if fragment in name and clone in name and not name.endswith("@plt")]
            assert bodies, f"no {clone} of a function named like {fragment!r}"
            assert any(re.search(rf"\bv?{packed}\b", line) for lines in bodies for line in lines), (
                f"{fragment!r} {clone} has no {packed}: its loop runs scalar")
