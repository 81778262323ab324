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


@needs_ext
def test_breakdown_names_each_case_and_its_ops_on_the_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--numel", "40000",
                          "--repeats", "1", "--breakdown"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    sections = out.split("### ")[1:]
    assert [s.split(":")[0] for s in sections] == list(load_script().CASES)
    for section in sections:
        host, device = (float(section.split(word)[1].split(" ms")[0])
                        for word in ("host ", "device "))
        assert host > 0 and device > 0, section
        ops = [line.split("|")[1].strip() for line in section.splitlines()
               if line.startswith("| ") and "kernel" not in line]
        assert ops and all(op.endswith("_") for op in ops), section  # incrkern's ops
        assert any(op.startswith(("adam_select_update", "select", "adam_update")) for op in ops)


def test_kernel_names_are_shortened():
    short = load_script().short_name
    assert short("void incrkern::cuda::(anonymous namespace)::fused_adam_kernel<float>"
                 "(incrkern::cuda::SelectLaunch, int)") == "fused_adam_kernel"
    assert short("incrkern::adam_select_update_") == "adam_select_update_"
    assert short("incrkern::<unnamed>::find_kernel(incrkern::SelectLaunch, int)") == "find_kernel"


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


# As --page raw writes it on the H200: the device's attributes beside the metrics, one
# of them a word.
NCU_CSV_TIMED = '''"ID","Kernel Name","CC","device__attribute_architecture","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum"
"","","","","Mbyte","Kbyte","usecond"
"0","incrkern::<unnamed>::hist_input_kernel(incrkern::SelectLaunch, int)","No-CC","384","40.00","12.5","11.5"
"1","Memset (Device)","No-CC","384","0","8","1,200.5"
'''


def test_ncu_kernels_are_listed_with_bytes_and_time(capsys):
    script = load_script()
    kernels = script.ncu_kernels(NCU_CSV_TIMED)
    assert [name for name, _ in kernels][1] == "Memset (Device)"
    assert kernels[0][1] == {"dram__bytes_read.sum": pytest.approx(40e6),
                             "dram__bytes_write.sum": pytest.approx(12.5e3),
                             "gpu__time_duration.sum": pytest.approx(11.5e3)}
    assert kernels[1][1]["gpu__time_duration.sum"] == pytest.approx(1200.5e3)
    script.print_ncu(NCU_CSV_TIMED, 10_000_000)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  - hist_input_kernel: read 1.00 gradient reads, written 0.0 MB, 11.5 us",
                     "  - Memset: read 0.00 gradient reads, written 0.0 MB, 1200.5 us",
                     "DRAM read 40.0 MB (1.00 reads of the fp32 gradient), written 0.0 MB"]


def test_ncu_output_without_rows_is_refused():
    with pytest.raises(ValueError, match="no CSV rows"):
        load_script().ncu_dram_bytes("==PROF== No kernels were profiled.\n")
