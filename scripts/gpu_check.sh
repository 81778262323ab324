#!/usr/bin/env bash
# `make gpu-check`: for a machine with a GPU and no network. Uses that machine's own
# python3 and torch (no venv, no install), builds for the GPU it finds, runs the test
# suite (CUDA tests included), compute-sanitizer (memcheck, racecheck, synccheck) over
# every CUDA kernel, a profile of the sparse steps (scripts/profile_sparse.py) and
# the benchmarks, and writes it all to bench/results/<date>-<gpu>.md and .json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0))") || {
  echo "gpu-check: torch sees no CUDA device"; exit 1; }
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
tag="$(date -u +%Y-%m-%d)-$(echo "$gpu" | tr -c 'A-Za-z0-9.\n' '-' | sed 's/--*/-/g; s/-$//')"
mkdir -p bench/results
work=$(mktemp -d)

echo "== build for sm_${arch/./} ($gpu)"
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-8} INCRKERN_PTXAS_VERBOSE=1 \
  $PY setup.py build_ext --inplace >"$work/build.log" 2>&1
build_rc=$?
grep -E "registers|error|warning" "$work/build.log" | sort | uniq -c | sort -rn | head -40 \
  >"$work/ptxas.txt"

echo "== tests"
$PY -m pytest -q -rs tests >"$work/tests.log" 2>&1
tests_rc=$?
tail -n 30 "$work/tests.log"

echo "== compute-sanitizer memcheck"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
"$sanitizer" --tool memcheck --error-exitcode 1 $PY scripts/sanitize_kernels.py \
  >"$work/memcheck.log" 2>&1
memcheck_rc=$?
tail -n 20 "$work/memcheck.log"

for tool in racecheck synccheck; do
  echo "== compute-sanitizer $tool"
  "$sanitizer" --tool $tool --error-exitcode 1 $PY scripts/sanitize_kernels.py \
    >"$work/$tool.log" 2>&1
  echo "$tool exit code $?" >>"$work/memcheck.log"
  tail -n 5 "$work/$tool.log" | tee -a "$work/memcheck.log"
done

echo "== profile of the sparse steps"
$PY scripts/profile_sparse.py >"$work/profile.md" 2>&1
profile_rc=$?
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
if [ -x "$ncu" ]; then
  for case in $($PY scripts/profile_sparse.py --list); do
    "$ncu" --profile-from-start off --csv --page raw \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum \
      $PY scripts/profile_sparse.py --case "$case" >"$work/ncu-$case.csv" 2>&1
    echo "- $case: $($PY scripts/profile_sparse.py --ncu-csv "$work/ncu-$case.csv" 2>&1 | tail -n 1)" \
      >>"$work/profile.md"
  done
else
  echo "(no ncu: DRAM bytes not measured)" >>"$work/profile.md"
fi
cat "$work/profile.md"

echo "== benchmarks"
$PY -m incrkern.bench all --device cuda --out "$work/bench" >"$work/bench.log" 2>&1
bench_rc=$?
tail -n 60 "$work/bench.log"

$PY - "$tag" "$work" "$build_rc" "$tests_rc" "$memcheck_rc" "$bench_rc" "$profile_rc" <<'PYEOF'
import glob, json, os, sys
import torch
tag, work = sys.argv[1], sys.argv[2]
rcs = dict(zip(["build", "tests", "memcheck", "bench", "profile"], map(int, sys.argv[3:8])))
import incrkern
read = lambda name: open(os.path.join(work, name), errors="replace").read()
tests_tail = read("tests.log").strip().splitlines()[-1:] or [""]
bench_json = {}
for path in glob.glob(os.path.join(work, "bench", "*.json")):
    bench_json[os.path.basename(path)] = json.load(open(path))
bench_md = "\n\n".join(open(p).read() for p in sorted(glob.glob(os.path.join(work, "bench", "*.md"))))
report = {
    "gpu": torch.cuda.get_device_name(0),
    "capability": list(torch.cuda.get_device_capability(0)),
    "build_info": incrkern.build_info(),
    "exit_codes": rcs,
    "tests": tests_tail[0],
    "memcheck": read("memcheck.log").strip().splitlines()[-3:],
    "bench": bench_json,
}
os.makedirs("bench/results", exist_ok=True)
for path in glob.glob(os.path.join(work, "bench", "*.png")):
    os.replace(path, os.path.join("bench/results", tag + "-" + os.path.basename(path)))
json.dump(report, open(f"bench/results/{tag}.json", "w"), indent=1, default=str)
with open(f"bench/results/{tag}.md", "w") as f:
    f.write(f"# GPU check: {report['gpu']} (sm_{''.join(map(str, report['capability']))})\n\n")
    f.write(f"torch {torch.__version__}, CUDA {torch.version.cuda}; exit codes {rcs}\n\n")
    f.write("## Tests\n\n```\n" + "\n".join(read("tests.log").strip().splitlines()[-25:]) + "\n```\n\n")
    f.write("## compute-sanitizer memcheck\n\n```\n" + "\n".join(report["memcheck"]) + "\n```\n\n")
    f.write("## ptxas (registers per kernel)\n\n```\n" + read("ptxas.txt") + "```\n\n")
    f.write("## Profile of the sparse steps\n\n" + read("profile.md") + "\n\n")
    f.write("## Benchmarks\n\n" + (bench_md or "```\n" + read("bench.log")[-6000:] + "\n```") + "\n")
print(f"wrote bench/results/{tag}.md and .json")
PYEOF
[ $build_rc -eq 0 ] && [ $tests_rc -eq 0 ] && [ $memcheck_rc -eq 0 ] && [ $bench_rc -eq 0 ] \
  && [ $profile_rc -eq 0 ]
