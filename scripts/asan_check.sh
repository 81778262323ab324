#!/usr/bin/env bash
# `make asan-check`: the CPU kernels' tests under AddressSanitizer. The tracked tree (as
# it stands, changes included) is copied to a scratch folder, the extension built there
# for the CPU with INCRKERN_SANITIZE=address, and the tests run from there with the
# sanitizer's runtime preloaded into the venv's python; the checkout's own build is not
# touched. A read or write outside a tensor, or a use after free, aborts the test run
# with the sanitizer's report.
#   ASAN_CHECK_TESTS  pytest arguments (default: the kernels' and the steps' test files)
# libstdc++ is preloaded too: loaded after the sanitizer's runtime, torch's first C++
# exception fails its check of __cxa_throw. Leaks are not reported: the interpreter
# keeps its objects to the end by design.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}  # not resolved: the venv's link leads out of it
CXX=${CXX:-c++}
TESTS=${ASAN_CHECK_TESTS:-tests/test_fused.py tests/test_fused_weight.py tests/test_fused_keyed.py
  tests/test_fused_sgd.py
  tests/test_select.py
  tests/test_select_mask.py tests/test_update.py tests/test_accumulate.py
  tests/test_one_rounding.py tests/test_fast_step.py
  tests/test_optim_sparse.py tests/test_optim_incremental.py tests/test_master_weights.py
  tests/test_amp.py tests/test_select_on_host.py tests/test_fused_on_host.py}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$work"
cd "$work"
INCRKERN_SANITIZE=address INCRKERN_CPU_ONLY=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py --quiet build_ext --inplace
runtime="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libstdc++.so)"
# shellcheck disable=SC2086  # TESTS: a list of pytest arguments
LD_PRELOAD="$runtime" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$work" \
  "$PY" -m pytest -q -p no:cacheprovider $TESTS
