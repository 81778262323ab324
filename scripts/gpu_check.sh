#!/usr/bin/env bash
# `make gpu-check`: for a machine with a GPU and no network. Uses that machine's own
# python3 and torch (no venv, no install), builds for the GPU it finds, runs the test
# suite (CUDA tests included), the benchmarks, compute-sanitizer (memcheck, racecheck,
# synccheck) over every CUDA kernel, a profile of the sparse steps
# (scripts/profile_sparse.py) and the one-call step against the Python step on the GPU
# (scripts/fast_step_host.py), and the forms of the histogram and fused passes timed
# alone (bench/cuda_passes.cu), and writes it all to bench/results/<date>-<gpu>.md and .json.
#
# For a machine lent for minutes, each stage can be bounded and the order is by value:
#   GPU_CHECK_TESTS   pytest arguments (default: tests; tests -k cuda where an error raised
#                     in the extension's C++ crashes the process, as on some images)
#   GPU_CHECK_WORKERS pytest-xdist workers for the tests where xdist is installed (default
#                     4; 0: none): a test that crashes its worker fails alone
#   GPU_CHECK_LIMIT   seconds per stage (default 3600); GPU_CHECK_LIMIT_<STAGE> for one
#                     stage: COMPILERS BUILD PASSES CPP_ERRORS TESTS FAST_STEP BENCH
#                     BENCH_SPARSE MEMCHECK RACECHECK SYNCCHECK PROFILE BREAKDOWN NCU
#   GPU_CHECK_NCU_CASES the cases Nsight Compute profiles (default: all of them)
#   GPU_CHECK_DEADLINE seconds for the whole check: a stage's limit is cut to what is left
#   GPU_CHECK_OUT     a folder that gets logs.tgz after every stage and the results at
#                     the end, so that a run stopped from outside still leaves its logs
#   GPU_CHECK_PRESET=loan  limits for a machine lent for about 15 minutes (any variable
#                     set beside it wins): 480 s in all, the stages that measure the
#                     sparse step first; the kernel benchmark, racecheck and synccheck
#                     are left out, and the tests are the CUDA ones (tests -k cuda: the
#                     whole suite's CPU tests alone take longer than the loan). From
#                     the H200's runs of 4 December: build 77-93 s, CUDA tests 106 s in
#                     one process, sparse benchmark 28-36 s, memcheck 12-15 s, profile
#                     13-16 s, breakdown 17 s, ncu about 17 s a case; the CUDA tests in
#                     four workers passed half their tests in 50 s, then printed
#                     nothing more before the stage's limit of 100 s.
set -uo pipefail
if [ "${GPU_CHECK_PRESET:-}" = loan ]; then
  : "${GPU_CHECK_DEADLINE:=480}" "${GPU_CHECK_LIMIT_BUILD:=150}" "${GPU_CHECK_LIMIT_CPP_ERRORS:=0}"
  : "${GPU_CHECK_LIMIT_COMPILERS:=45}"
  : "${GPU_CHECK_LIMIT_PASSES:=60}" "${GPU_CHECK_LIMIT_TESTS:=150}"
  : "${GPU_CHECK_LIMIT_FAST_STEP:=25}" "${GPU_CHECK_LIMIT_BENCH:=0}"
  : "${GPU_CHECK_LIMIT_BENCH_SPARSE:=45}" "${GPU_CHECK_LIMIT_MEMCHECK:=20}"
  : "${GPU_CHECK_LIMIT_RACECHECK:=0}" "${GPU_CHECK_LIMIT_SYNCCHECK:=0}"
  : "${GPU_CHECK_LIMIT_PROFILE:=20}" "${GPU_CHECK_LIMIT_BREAKDOWN:=30}" "${GPU_CHECK_LIMIT_NCU:=40}"
  : "${GPU_CHECK_NCU_CASES:=d0.01-exact d0.1-exact}" "${GPU_CHECK_TESTS:=tests -k cuda}"
  export "${!GPU_CHECK_@}"
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0))") || {
  echo "gpu-check: torch sees no CUDA device"; exit 1; }
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
base="$(date -u +%Y-%m-%d)-$(echo "$gpu" | tr -c 'A-Za-z0-9.\n' '-' | sed 's/--*/-/g; s/-$//')"
tag=$base n=2  # a second check on the same day keeps the first one's files
while [ -e "bench/results/$tag.md" ]; do tag="$base-$n"; n=$((n + 1)); done
mkdir -p bench/results
work=$(mktemp -d)
out=${GPU_CHECK_OUT:-}
started=$SECONDS
declare -A rc

# stage NAME LOGFILE COMMAND...: runs COMMAND under the stage's time limit, logs its
# output, records its exit code (124: over the limit) and its seconds.
stage() {
  local name=$1 log=$2; shift 2
  local var="GPU_CHECK_LIMIT_${name^^}" t0=$SECONDS
  local limit=${!var:-${GPU_CHECK_LIMIT:-3600}}
  local left=$(( ${GPU_CHECK_DEADLINE:-86400} - (SECONDS - started) - 15 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "${!var:-}" = 0 ]; then
    echo "$name: skipped (its limit is 0)" | tee -a "$work/stages.txt"; return 0
  elif [ "$limit" -le 0 ]; then
    echo "$name: skipped, no time left" | tee -a "$work/stages.txt"; return 0
  fi
  echo "== $name (limit ${limit} s, at ${t0} s)"
  timeout --kill-after=10 "$limit" "$@" >>"$work/$log" 2>&1
  rc[$name]=$?
  echo "$name: exit ${rc[$name]} in $((SECONDS - t0)) s" | tee -a "$work/stages.txt"
  [ -n "$out" ] && tar czf "$out/logs.tgz" -C "$work" . 2>/dev/null
  return 0
}

# The build takes the first C++ compiler whose errors reach Python (on some images
# the default one's crash the process, and every bad-input test with them).
stage compilers compilers.log $PY scripts/check_cpp_errors.py --compilers
cat "$work/compilers.log" 2>/dev/null
cxx=$(sed -n 's/^raising compiler: //p' "$work/compilers.log" 2>/dev/null)
[ -n "$cxx" ] && [ "$cxx" != none ] && export CXX="$cxx"
stage build build.log env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  INCRKERN_PTXAS_VERBOSE=1 $PY setup.py build_ext --inplace
grep -E "registers|error|warning" "$work/build.log" | sort | uniq -c | sort -rn | head -40 \
  >"$work/ptxas.txt"
tail -n 5 "$work/build.log"

# The passes' forms need nvcc alone, not the build: seconds.
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
stage passes passes.md bash -c "'$nvcc' -O3 -std=c++17 -arch=sm_${arch/./} -I csrc \
  bench/cuda_passes.cu -o '$work/cuda_passes' && '$work/cuda_passes'"
cat "$work/passes.md"

if [ "${rc[build]}" -eq 0 ]; then
  # Whether an error raised in the extension's C++ reaches Python (a crash there would
  # also end the test stage at its first bad-input test).
  stage cpp_errors cpp_errors.log $PY scripts/check_cpp_errors.py
  cat "$work/cpp_errors.log"

  # The stage's first line says whether incrkern's errors raise; where it was left out,
  # that check alone (seconds).
  tests_args=${GPU_CHECK_TESTS:-}
  if [ -z "$tests_args" ] && [ "${GPU_CHECK_LIMIT_TESTS:-}" != 0 ]; then
    own=$(grep -m 1 "^incrkern's extension:" "$work/cpp_errors.log" 2>/dev/null) ||
      own=$($PY scripts/check_cpp_errors.py --own 2>&1 | tee -a "$work/cpp_errors.log" | tail -n 1)
    tests_args=tests
    if [ "$own" != "incrkern's extension: raises" ]; then
      tests_args="tests -k cuda"
      echo "errors raised in C++ crash the process here: the CUDA tests only" \
        | tee -a "$work/cpp_errors.log"
    fi
  fi
  workers=${GPU_CHECK_WORKERS:-4}
  if [ "$workers" -gt 0 ] && $PY -c "import xdist" 2>/dev/null; then
    tests_args="-n $workers --max-worker-restart 100 $tests_args"
  fi
  # shellcheck disable=SC2086
  stage tests tests.log $PY -m pytest -q -rfEs -p no:cacheprovider $tests_args
  tail -n 25 "$work/tests.log"

  # The one-call step's GPU route (on by default; the tests above hold it to the
  # Python step): its time against the Python step's.
  stage fast_step fast_step.md $PY scripts/fast_step_host.py --device cuda
  cat "$work/fast_step.md"

  mkdir -p "$work/bench"
  stage bench bench.log $PY -m incrkern.bench kernels --device cuda --no-progress --out "$work/bench"
  stage bench_sparse bench.log $PY -m incrkern.bench sparse --device cuda --no-progress \
    --out "$work/bench"
  tail -n 40 "$work/bench.log"

  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck synccheck; do
    stage $tool $tool.log "$sanitizer" --tool $tool --error-exitcode 1 \
      $PY scripts/sanitize_kernels.py
    tail -n 4 "$work/$tool.log"
  done

  stage profile profile.md $PY scripts/profile_sparse.py --device cuda
  stage breakdown breakdown.md $PY scripts/profile_sparse.py --device cuda --breakdown
  ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  if [ -x "$ncu" ]; then
    ncu_cases() {
      for case in ${GPU_CHECK_NCU_CASES:-$($PY scripts/profile_sparse.py --list)}; do
        "$ncu" --clock-control none --profile-from-start off --csv --page raw \
          --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
          $PY scripts/profile_sparse.py --device cuda --case "$case" --fused \
          >"$work/ncu-$case.csv" 2>&1
        $PY scripts/profile_sparse.py --ncu-csv "$work/ncu-$case.csv" >"$work/ncu-$case.md" 2>&1
        echo "- $case (fused): $(tail -n 1 "$work/ncu-$case.md")" >>"$work/profile.md"
        head -n -1 "$work/ncu-$case.md" >>"$work/profile.md"
      done
    }
    export -f ncu_cases; export work PY ncu
    stage ncu ncu.log bash -c ncu_cases
  else
    echo "(no ncu: DRAM bytes not measured)" >>"$work/profile.md"
  fi
  cat "$work/profile.md"
fi

codes=""
for name in "${!rc[@]}"; do codes+="$name=${rc[$name]} "; done
$PY - "$tag" "$work" "$codes" <<'PYEOF'
import glob, json, os, sys
import torch
tag, work, codes = sys.argv[1], sys.argv[2], sys.argv[3]
rcs = dict(item.split("=") for item in codes.split())
rcs = {k: int(v) for k, v in sorted(rcs.items())}
def read(name):
    path = os.path.join(work, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""
def tail(name, n):
    return "\n".join(read(name).strip().splitlines()[-n:])
try:
    import incrkern
    build_info = incrkern.build_info()
except Exception as exc:  # the build failed: the report still says how
    build_info = repr(exc)
bench_json = {os.path.basename(p): json.load(open(p))
              for p in glob.glob(os.path.join(work, "bench", "*.json"))}
bench_md = "\n\n".join(open(p).read() for p in sorted(glob.glob(os.path.join(work, "bench", "*.md"))))
sanitizers = {tool: tail(tool + ".log", 3) for tool in ("memcheck", "racecheck", "synccheck")}
report = {
    "gpu": torch.cuda.get_device_name(0),
    "capability": list(torch.cuda.get_device_capability(0)),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "build_info": build_info,
    "exit_codes": rcs,
    "stages": read("stages.txt").splitlines(),
    "tests": tail("tests.log", 1),
    "sanitizers": sanitizers,
    "bench": bench_json,
}
os.makedirs("bench/results", exist_ok=True)
for path in glob.glob(os.path.join(work, "bench", "*.png")):
    short = "-".join(os.path.basename(path).split("-")[-2:])  # kernels-density.png
    os.replace(path, os.path.join("bench/results", f"{tag}-{short}"))
json.dump(report, open(f"bench/results/{tag}.json", "w"), indent=1, default=str)
with open(f"bench/results/{tag}.md", "w") as f:
    f.write(f"# GPU check: {report['gpu']} (sm_{''.join(map(str, report['capability']))})\n\n")
    f.write(f"torch {torch.__version__}, CUDA {torch.version.cuda}; exit codes {rcs} "
            "(124: stopped at the stage's time limit)\n\n")
    f.write("```\n" + read("stages.txt") + "```\n\n")
    if rcs.get("build", 0):
        f.write("## Build\n\n```\n" + tail("build.log", 60) + "\n```\n\n")
    f.write("## Errors raised in C++\n\n```\n" + read("compilers.log") + read("cpp_errors.log")
            + "```\n\n")
    f.write("## Tests\n\n```\n" + tail("tests.log", 40) + "\n```\n\n")
    for tool, text in sanitizers.items():
        f.write(f"## compute-sanitizer {tool}\n\n```\n{text}\n```\n\n")
    f.write("## ptxas (registers per kernel)\n\n```\n" + read("ptxas.txt") + "```\n\n")
    f.write("## The one-call step on the GPU\n\n" + read("fast_step.md") + "\n\n")
    f.write("## Profile of the sparse steps\n\n" + read("profile.md") + "\n\n")
    f.write("## The passes' forms alone (bench/cuda_passes.cu)\n\n" + read("passes.md") + "\n\n")
    f.write("## Where the sparse steps' time goes\n\n" + read("breakdown.md") + "\n\n")
    f.write("## Benchmarks\n\n" + (bench_md or "```\n" + read("bench.log")[-6000:] + "\n```") + "\n")
print(f"wrote bench/results/{tag}.md and .json")
PYEOF
if [ -n "$out" ]; then
  tar czf "$out/logs.tgz" -C "$work" . 2>/dev/null
  cp bench/results/"$tag"* "$out"/ 2>/dev/null
fi
echo "gpu-check: $codes in $((SECONDS - started)) s"
for code in "${rc[@]}"; do [ "$code" -eq 0 ] || exit 1; done
