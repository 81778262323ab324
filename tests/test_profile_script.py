"""scripts/profile_sparse.py, which `make gpu-check` runs: every case runs on the CPU
and is printed, and Nsight Compute's CSV is summed as ncu writes it."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from helpers import needs_ext

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "profile_sparse.py"


def load_script():
    spec = importlib.util.spec_from_file_location("profile_sparse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_ext
def test_every_case_runs_on_the_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--numel", "40000",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "case" not in line]
    assert [r.split("|")[1].strip() for r in rows] == list(load_script().CASES)
    for row in rows:
        launches = int(row.split("|")[2])
        assert 1 <= launches <= 4, row  # the fused op, or select and update (+ accumulate)


NCU_CSV = '''==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","dram__bytes_read.sum","dram__bytes_write.sum"
"","","","","","","","Mbyte","Kbyte"
"0","1234","python3","127.0.0.1","select_hist","1","7","40.00","12.5"
"1","1234","python3","127.0.0.1","adam_indexed","1","7","1,200.50","500"
'''


def test_ncu_csv_is_summed_with_its_units():
    read, written = load_script().ncu_dram_bytes(NCU_CSV)
    assert read == pytest.approx(1240.5e6)
    assert written == pytest.approx(512.5e3)


def test_ncu_output_without_rows_is_refused():
    with pytest.raises(ValueError, match="no CSV rows"):
        load_script().ncu_dram_bytes("==PROF== No kernels were profiled.\n")
