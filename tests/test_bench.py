"""Smoke test of `python -m incrkern.bench`: every entry point runs end to end on tiny
sizes and writes valid JSON, markdown and plots. No timing is asserted."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import incrkern
from incrkern.bench import cli, common, convergence, gradients, kernels, report, sparse
from incrkern.bench.shapes import SIZES, numel, transformer_shapes
from helpers import needs_ext

TIMED = ("median_s", "min_s", "max_s", "gb_per_s", "frac_copy_bw", "speedup_vs_ref")


def _positive(x):
    return common.finite_positive(x)


def _check_figure(rec):
    assert isinstance(rec["impl"], str) and rec["impl"]
    assert isinstance(rec["available"], bool)
    if not rec["available"]:
        assert rec["reason"], rec
        return
    for key in TIMED:
        assert _positive(rec[key]), (key, rec)
    assert rec["min_s"] <= rec["median_s"] <= rec["max_s"]
    assert rec["bytes"] > 0 and rec["repeats"] >= 1
    for value in rec.get("speedup_vs", {}).values():
        assert _positive(value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results, paths = cli.run_bench("all", "tiny", "cpu", str(out), progress=False, quiet=True)
    return results, paths


def test_measure_counts_every_sample():
    calls = []
    timing = common.measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and timing["repeats"] == 3
    calls.clear()
    timing = common.measure(lambda: time.sleep(0.01), warmup=0, repeats=10, max_time_s=0.02)
    assert timing["repeats"] == 3  # min_repeats, once max_time_s is spent
    timing = common.measure(lambda: None, warmup=0, repeats=2, min_time_s=1.0, max_repeats=7)
    assert timing["repeats"] == 7
    assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]


def test_measure_pair_takes_turns():
    calls = []
    timed, reference = common.measure_pair(lambda: calls.append("a"),
                                           lambda: calls.append("b"), warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4
    assert timed["repeats"] == reference["repeats"] == 3
    # the stopping rule counts both calls' time
    calls.clear()
    timed, reference = common.measure_pair(lambda: time.sleep(0.005), lambda: time.sleep(0.005),
                                           warmup=0, repeats=10, max_time_s=0.03)
    assert timed["repeats"] == reference["repeats"] == 3


def test_measure_turns_takes_turns_in_order():
    calls = []
    timings = common.measure_turns([lambda: calls.append("a"), lambda: calls.append("b"),
                                    lambda: calls.append("c")], warmup=1, repeats=2)
    assert calls == ["a", "b", "c"] * 3
    assert [t["repeats"] for t in timings] == [2, 2, 2]


def test_sparse_rows_are_paired_with_the_reference(tiny_run):
    results, _ = tiny_run
    rows = [r for r in results["sparse"]["records"]
            if r["available"] and r["impl"].startswith("incrkern")]
    assert rows
    for r in rows:
        assert r["speedup_vs_ref"] == pytest.approx(r["reference_s"] / r["median_s"])


def test_sparse_global_rows_count_the_global_selection(tiny_run):
    """The scope="global" rows choose k over the concatenation (one ceil of the total,
    where the per-tensor rows take one per tensor), and their bound counts the lines of
    those positions."""
    results, _ = tiny_run
    records = results["sparse"]["records"]
    density = sparse.SPARSE_SIZES["tiny"].global_densities[0]
    global_rows = [r for r in records if r.get("scope") == "global" and r["available"]]
    assert global_rows and all(r["density"] == density for r in global_rows)
    for r in global_rows:
        assert r["k"] == incrkern.ops.density_k(density, r["numel"])
        assert 0 < r["touched_lines"] <= r["total_lines"]
        assert report._sparse_row(r) == f"grad {density:g} global"


def test_copy_bandwidth_is_positive():
    bw = common.copy_bandwidth(10_000, repeats=2)
    probe = common.CopyProbe(10_000)
    probe.measure()
    probe.measure()
    assert len(probe.samples) == 2 and _positive(probe.best)
    assert _positive(bw["bytes_per_s"]) and bw["bytes"] == 2 * 4 * 10_000


def test_transformer_shapes_match_bert_base():
    shapes = transformer_shapes()
    assert len(shapes) == 5 + 12 * 12
    # 12 layers of 7.09M, plus 23.8M of embeddings and their layer norm
    assert numel(shapes) == 108_891_648


def test_sampled_threshold_keeps_about_k():
    scores = torch.rand(100_000)
    gen = torch.Generator().manual_seed(0)
    found = kernels.sampled_threshold_topk(scores, 1000, gen)
    assert 500 < found.numel() < 2000
    assert scores[found].min() >= torch.topk(scores, 3000).values.min()


def test_state_bytes_counts_nested_tensors():
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.ones(10)
    opt = torch.optim.AdamW([p])
    opt.step()
    assert common.state_bytes(opt) == 10 * 4 * 2 + 4  # exp_avg, exp_avg_sq, step


def test_run_writes_valid_files(tiny_run):
    results, paths = tiny_run
    with open(paths["json"]) as f:
        loaded = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert set(loaded) >= {"machine", "kernels", "convergence", "command", "total_s"}
    assert loaded["machine"]["torch"] == torch.__version__
    assert loaded["machine"]["torch_threads"] >= 1
    with open(paths["markdown"]) as f:
        md = f.read()
    assert loaded["machine"]["device_name"] in md and "| impl |" in md
    assert any(k.startswith("plot") for k in paths)
    for key, path in paths.items():
        if key.startswith("plot"):
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_implementation_is_measured(tiny_run):
    """A record without a figure is an implementation that raised: a failure."""
    results, _ = tiny_run
    records = results["kernels"]["records"] + results["convergence"]["records"]
    failed = [(r.get("impl") or r.get("row") or r.get("mode"), r["reason"])
              for r in records if not r["available"]]
    assert not failed


def test_kernel_records(tiny_run):
    results, _ = tiny_run
    kern = results["kernels"]
    assert _positive(kern["copy_bandwidth"]["roofline_bytes_per_s"])
    benches = {r["bench"] for r in kern["records"]}
    assert benches == {"dense_step", "topk", "select", "sparse_step", "accumulate",
                       "state_bytes"}
    for rec in kern["records"]:
        if rec["bench"] == "state_bytes":
            if rec["available"]:
                assert _positive(rec["bytes_per_param"])
            continue
        _check_figure(rec)
    # the torch counterparts are always measured, and are their own reference
    refs = [r for r in kern["records"] if "reference" in r and r["impl"] == r["reference"]]
    assert refs and all(r["available"] and r["speedup_vs_ref"] == 1.0 for r in refs)
    ops = [r for r in kern["records"] if r["bench"] == "dense_step"
           and r["impl"] == "incrkern ops"]
    assert len(ops) == 10 and all(r["available"] for r in ops)
    assert {r["dtype"] for r in ops} == {"float32", "bfloat16", "float16"}
    assert all(set(r["speedup_vs"]) == set(kernels.TORCH_IMPLS) for r in ops)


def test_convergence_records(tiny_run):
    results, _ = tiny_run
    conv = results["convergence"]
    assert len(conv["records"]) == len(convergence.plan("tiny").jobs())
    assert len(convergence.plan("quick").jobs()) < 2 * len(convergence.plan("quick").rows)
    assert len(convergence.plan("full").jobs()) == 2 * len(convergence.plan("full").rows)
    dense = conv["records"][0]
    assert dense["torch_dense"] and dense["available"]
    for rec in conv["records"]:
        if not rec["available"]:
            assert rec["reason"]
            continue
        assert 0.0 <= rec["final_test_acc"] <= 1.0
        assert _positive(rec["wall_s"]) and _positive(rec["state_bytes"])
        assert _positive(rec["step_ms_median"])
        assert rec["curve"][0]["calls"] == 0 and rec["curve"][-1]["calls"] == rec["steps"]
        assert rec["acc_at_equal_updates"] is not None


def test_tables_render(tiny_run):
    results, _ = tiny_run
    titles = [title for title, _, _ in report.sections(results)]
    assert len(titles) == 10 and titles[0].startswith("Summary")
    for _, rows, columns in report.sections(results):
        text = report.text_table(rows, columns)
        assert len(text.splitlines()) == len(rows) + 2


def test_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "incrkern.bench", "convergence", "--tiny",
                           "--device", "cpu", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Convergence on digits" in proc.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("-tiny-convergence.json") for f in files), files
    assert any(f.endswith("-tiny-convergence.md") for f in files), files


def test_results_go_to_the_checkout_or_the_current_folder(tmp_path, monkeypatch):
    repo = Path(cli.__file__).resolve().parents[2]
    if (repo / "setup.py").is_file() and (repo / "bench" / "results").is_dir():
        assert cli.default_out() == str(repo / "bench" / "results")
    installed = tmp_path / "site-packages" / "incrkern" / "bench" / "cli.py"
    monkeypatch.chdir(tmp_path)
    assert Path(cli.default_out(str(installed))).resolve() == tmp_path.resolve()


def test_sizes_are_consistent():
    for sizes in SIZES.values():
        sets = sizes.shape_sets()
        assert set(sets) == {"one_tensor", "many_small", "transformer"}
        assert all(numel(s) > 0 for s in sets.values())
        assert all(0 < d <= 1 for d in sizes.densities)
    assert math.isclose(numel(SIZES["quick"].shape_sets()["one_tensor"]) * 10,
                        numel(SIZES["full"].shape_sets()["one_tensor"]))


@pytest.mark.parametrize("mode", ["quick", "full"])
@pytest.mark.parametrize("llc", [260 * 2 ** 20, 491520 * 2 ** 10, 1 * 2 ** 20])
def test_kernel_sizes_grow_from_the_cache(mode, llc):
    from incrkern.bench.shapes import (CACHE_FACTOR, COPY_BYTES, SELECT_BYTES, STEP_BYTES,
                                       sizes_for)
    floor = SIZES[mode]
    sizes = sizes_for(mode, "cpu", (llc, "test"))
    least = CACHE_FACTOR * llc
    sets = sizes.shape_sets()
    for name, shapes in sets.items():
        n = numel(shapes)
        assert n * STEP_BYTES >= least, name
        assert n >= numel(floor.shape_sets()[name]), name  # never below the fixed sizes
    assert sets["many_small"][0] == (floor.many_numel,)  # more tensors, not larger ones
    assert all(n * SELECT_BYTES >= least and n >= max(floor.select_sizes)
               for n in sizes.select_sizes)
    assert numel(sizes.select_shapes()) * SELECT_BYTES >= least
    assert sizes.copy_numel * COPY_BYTES >= least and sizes.copy_numel >= floor.copy_numel
    assert sizes.cache["llc_bytes"] == llc and sizes.cache["cache_factor"] == CACHE_FACTOR
    # the smallest such sizes: one transformer width step (32) less falls short
    smaller = dict(sizes.transformer, hidden=sizes.transformer["hidden"] - 32)
    if sizes.transformer["hidden"] > floor.transformer["hidden"]:
        assert numel(transformer_shapes(**smaller)) * STEP_BYTES < least
    line = report.kernel_sizes_line(kernels.sizes_summary(sizes))
    assert "last-level cache" in line and "(test)" in line
    assert f"{sizes.many_count} x 10k" in line or f"{sizes.many_count} x 100k" in line


def test_kernel_sizes_stay_within_memory():
    from incrkern.bench.shapes import MEMORY_SHARE, PEAK_BYTES, sizes_for
    llc, memory = 480 * 2 ** 20, 8 * 2 ** 30  # a cache asking for more than 8 GB hold
    sizes = sizes_for("quick", "cpu", (llc, "test"), memory)
    most = MEMORY_SHARE * memory / PEAK_BYTES
    assert sizes.cache["memory_capped"]
    assert sizes.one_tensor <= most and max(sizes.select_sizes) <= most
    assert sizes.one_tensor >= SIZES["quick"].one_tensor  # still never below the floor
    assert "memory" in report.kernel_sizes_line(kernels.sizes_summary(sizes))
    roomy = sizes_for("quick", "cpu", (llc, "test"), 2 ** 40)
    assert not roomy.cache["memory_capped"]
    assert roomy.one_tensor == sizes_for("quick", "cpu", (llc, "test")).one_tensor


def test_smoke_sizes_stay_fixed():
    from incrkern.bench.shapes import sizes_for
    assert sizes_for("tiny", "cpu", (2 ** 40, "test")) is SIZES["tiny"]
    assert sizes_for("quick", "cpu") is SIZES["quick"]


def test_full_sizes_on_a_gpu_add_the_billion_element_topk():
    from incrkern.bench.shapes import sizes_for
    assert 1_000_000_000 in sizes_for("full", "cuda").select_sizes
    assert 1_000_000_000 not in sizes_for("full", "cpu").select_sizes
    assert sizes_for("quick", "cuda") is SIZES["quick"]


def test_file_stem_names_date_device_and_variant():
    assert cli.file_stem("cpu", "all", "quick", date="2026-01-02").startswith("2026-01-02-cpu")
    stem = cli.file_stem("cpu", "kernels", "full", date="2026-01-02", threads=1)
    assert stem.endswith("-full-kernels-t1")


# ----------------------------------------------------------------------------------
# the sparse-step benchmark's pieces


def _lines_brute_force(tensor, indices, line_bytes):
    size = tensor.element_size()
    return len({(tensor.data_ptr() + i * size) // line_bytes for i in indices.tolist()})


@pytest.mark.parametrize("line_bytes", [32, 64])
def test_touched_lines_match_a_brute_force_count(line_bytes):
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(1000)
    # views starting inside a line, an odd size, a tensor with no chosen element
    tensors = [base, base[3:], base[17:530], torch.zeros(7), torch.zeros(33, dtype=torch.float64)]
    indices = [torch.randperm(t.numel(), generator=gen)[:k] for t, k in
               zip(tensors, (1, 50, 200, 0, 33))]
    indices.append(torch.tensor([0, 1, 2, 15, 16, 31]))
    tensors.append(torch.zeros(64))
    want = sum(_lines_brute_force(t, i, line_bytes) for t, i in zip(tensors, indices))
    assert sparse.touched_lines(tensors, indices, line_bytes) == want
    assert sparse.touched_lines(tensors, [None] * len(tensors), line_bytes) == 0
    every = [torch.arange(t.numel()) for t in tensors]
    assert sparse.touched_lines(tensors, every, line_bytes) == sparse.total_lines(tensors,
                                                                                  line_bytes)


def test_bound_counts_the_score_read_and_six_transfers_per_line():
    assert sparse.bound_bytes(1000, 10, 64, "grad") == 4 * 1000 + 6 * 10 * 64
    assert sparse.bound_bytes(1000, 10, 32, "accumulated") == 12 * 1000 + 6 * 10 * 32
    # bf16 params: a 2-byte score read (10 with the fp32 residual), p's lines read and
    # written, m's and v's (fp32) each read and written
    assert sparse.bound_bytes(1000, 10, 64, "grad", grad_bytes=2, state_lines=15) == \
        2 * 1000 + 2 * (10 + 2 * 15) * 64
    assert sparse.bound_bytes(1000, 10, 64, "accumulated", grad_bytes=2, state_lines=15) == \
        10 * 1000 + 2 * (10 + 2 * 15) * 64


def test_state_lines_of_16bit_params_count_fp32_lines():
    grads = [torch.zeros(100, dtype=torch.bfloat16), torch.zeros(64, dtype=torch.bfloat16)]
    # positions 0, 15, 16, 31, 32 lie in fp32 lines 0, 0, 1, 1, 2 (16 a line) and in one
    # bf16 line (32 a line) when the tensor starts a line
    idx = [torch.tensor([0, 15, 16, 31, 32]), torch.tensor([63])]
    assert sparse.touched_lines(grads, idx, 64, element_size=4) == 3 + 1
    want = sum(_lines_brute_force(t, i, 64) for t, i in zip(grads, idx))
    assert sparse.touched_lines(grads, idx, 64) == want


@needs_ext
def test_sparse_case_in_bf16_is_timed_against_torch_in_bf16():
    sizes = sparse.SPARSE_SIZES["tiny"]
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 40), (7,), (5000,)]
    case = sparse.Case("bf16 test", "random normal",
                       [torch.randn(s, generator=gen) for s in shapes],
                       [torch.randn(s, generator=gen) for s in shapes], dict(copies=1),
                       dtype=torch.bfloat16)
    records = sparse.run_case(case, sizes, "cpu")
    n = 300 * 40 + 7 + 5000
    head, rows = records[0], records[1:]
    assert head["impl"] == sparse.REFERENCE and head["available"], head
    assert head["dtype"] == "bfloat16" and head["bound_bytes"] == 14 * n
    assert head["working_set_bytes"] == 8 * n
    assert len(rows) == len(sparse.rows(sizes))
    for rec in rows:
        assert rec["available"], rec
        # fp32 state lines hold half the elements of bf16 p lines: never fewer of them
        assert rec["touched_lines"] <= rec["state_lines"] <= 2 * rec["touched_lines"] + 3
        score = 2 + (8 if rec["select"] == "accumulated" else 0)
        assert rec["bound_bytes"] == score * n + 2 * 64 * (rec["touched_lines"] +
                                                           2 * rec["state_lines"])
        assert _positive(rec["speedup_vs_ref"]) and _positive(rec["median_s"])


def test_cache_size_reading_and_its_fallbacks():
    assert sparse.parse_size("32768K") == 32 * 2 ** 20
    assert sparse.parse_size("260M") == 260 * 2 ** 20 and sparse.parse_size("512") == 512
    assert sparse.parse_size("?") is None
    assert sparse.llc_bytes("cpu", {"L1": "32K", "L2": "1024K", "L3": "32768K"}) == \
        (32 * 2 ** 20, "sysfs cpu0 L3")
    assert sparse.llc_bytes("cpu", {"L1": "48K", "L2": "2048K"})[0] == 2 * 2 ** 20

    def sysconf(name):
        if name == "SC_LEVEL3_CACHE_SIZE":
            raise ValueError(name)
        return 4 * 2 ** 20
    assert sparse.llc_bytes("cpu", {}, sysconf) == (4 * 2 ** 20, "sysconf SC_LEVEL2_CACHE_SIZE")
    size, source = sparse.llc_bytes("cpu", {"L3": "?"}, lambda name: -1)
    assert size == sparse.FALLBACK_LLC and source.startswith("fallback")
    assert sparse.llc_bytes("cpu")[0] > 0  # this machine, whatever it reports
    n = sparse.working_set_numel(32 * 2 ** 20)
    assert n * sparse.BYTES_PER_ELEMENT >= 4 * 32 * 2 ** 20
    assert sparse.probe_numel(n) * 8 >= n * sparse.BYTES_PER_ELEMENT


def test_sparse_sizes_stay_within_memory():
    from incrkern.bench.shapes import MEMORY_SHARE
    llc = 480 * 2 ** 20
    wanted = sparse.working_set_numel(llc)
    assert sparse.memory_capped_numel(wanted, None) == wanted
    assert sparse.memory_capped_numel(wanted, 2 ** 40) == wanted
    memory = 8 * 2 ** 30  # a cache asking for more than 8 GB hold
    capped = sparse.memory_capped_numel(wanted, memory)
    assert 0 < capped < wanted
    assert capped * sparse.PEAK_BYTES_PER_ELEMENT <= MEMORY_SHARE * memory
    summary = dict(llc_bytes=llc, llc_source="test", cache_factor=4, sized_from_cache=True,
                   target_numel=capped, wanted_numel=wanted, memory_capped=True)
    assert "capped by the machine's memory" in sparse.sizes_line(summary)
    roomy = dict(summary, target_numel=wanted, memory_capped=False)
    assert "at least 4x it" in sparse.sizes_line(roomy)
    # the bf16 case: twice the elements for the same bytes, capped on its own
    capped_16bit = sparse.memory_capped_numel(2 * wanted, memory)
    assert capped_16bit * sparse.PEAK_BYTES_PER_ELEMENT <= MEMORY_SHARE * memory
    line = sparse.sizes_line(dict(roomy, target_numel_16bit=capped_16bit,
                                  memory_capped_16bit=True))
    assert "the bf16 case" in line and line.endswith("capped by memory")
    line = sparse.sizes_line(dict(roomy, target_numel_16bit=2 * wanted,
                                  memory_capped_16bit=False))
    assert f"the bf16 case >= {2 * wanted / 1e6:.3g}M elements (8 B each)" in line


def test_real_text_is_found():
    pairs = gradients.docstring_pairs(("json", "os.path"))
    assert len(pairs) >= 10 and all(name and doc for name, doc in pairs)
    assert any(name.startswith("json.dumps(") for name, _ in pairs)
    text = gradients.python_source_bytes(20_000)
    assert 10_000 < text.numel() <= 20_000 and text.dtype == torch.uint8


TINY_CHARLM = dict(steps=3, width=16, layers=1, context=16, batch=4, text_bytes=50_000)


def test_scratch_model_gradients(tmp_path):
    gset = gradients.load("charlm", str(tmp_path), **TINY_CHARLM)
    assert len(gset.names) == len(gset.weights) == len(gset.grads) == gset.meta["tensors"]
    for w, g in zip(gset.weights, gset.grads):
        assert w.shape == g.shape and w.dtype == g.dtype == torch.float32
        assert torch.isfinite(w).all() and torch.isfinite(g).all()
    assert any(g.abs().sum() > 0 for g in gset.grads)
    # bytes absent from the batch: exact-zero rows of the embedding's gradient
    embed = gset.grads[gset.names.index("embed.weight")]
    assert (embed.abs().sum(1) == 0).any()
    again = gradients.load("charlm", str(tmp_path), **TINY_CHARLM)  # from the cache
    assert len(list(tmp_path.iterdir())) == 1
    assert all(torch.equal(a, b) for a, b in zip(gset.grads, again.grads))
    weights, grads, copies = gradients.tile(gset, 3 * gset.numel - 1)
    assert copies == 3 and len(grads) == 3 * len(gset.grads)
    assert grads[0].data_ptr() != grads[len(gset.grads)].data_ptr()
    assert torch.equal(grads[0], grads[len(gset.grads)])


def test_pretrained_model_gradients():
    try:
        gradients.minilm_path()
    except ImportError as exc:
        pytest.skip(f"pretrained case not available: {exc}")
    gset = gradients.pretrained_minilm(batch=4, seq_len=16)
    assert gset.meta["tensors"] == len(gset.grads) == 101  # all but the unused pooler
    assert 22_000_000 < gset.numel < 23_000_000
    words = gset.grads[gset.names.index("embeddings.word_embeddings.weight")]
    assert (words == 0).float().mean() > 0.9  # only the batch's tokens get a gradient
    assert all(torch.isfinite(g).all() for g in gset.grads)


def test_sparse_records(tiny_run):
    results, _ = tiny_run
    sp = results["sparse"]
    assert sp["llc_bytes"] > 0 and not sp["sized_from_cache"]
    cases = {c["name"]: c for c in sp["cases"]}
    assert not cases["pretrained MiniLM-L6"]["available"]
    assert cases["pretrained MiniLM-L6"]["reason"]
    assert not any((c["reason"] or "").startswith("failed") for c in cases.values())
    timed = [c for c in cases.values() if c["available"]]
    assert len(timed) == 3
    records = sp["records"]
    assert len(records) == len(timed) * (1 + len(sparse.rows(sparse.SPARSE_SIZES["tiny"])))
    for rec in records:
        assert rec["available"], rec
        for key in ("median_s", "speedup_vs_ref", "bound_bytes", "bound_s", "frac_of_bound"):
            assert _positive(rec[key]), (key, rec)
        assert 0 < rec["touched_lines"] <= rec["total_lines"]
    assert all(r["impl"] == sparse.REFERENCE for r in records if r["density"] == 1.0)


@needs_ext
def test_crossover_fused_script_runs_both_ways():
    """bench/crossover_fused.py over a list of tensors, with the threshold stream as
    the kernel chooses and turned off: a row per density, every variant timed."""
    script = Path(__file__).resolve().parents[1] / "bench" / "crossover_fused.py"
    for extra in ([], ["--stream-density", "2"]):
        out = subprocess.run(
            [sys.executable, str(script), "--numel", "30000", "--tensors", "3", "--repeats",
             "1", "--densities", "0.01,0.1", *extra],
            check=True, capture_output=True, text=True, timeout=120).stdout
        lines = out.strip().splitlines()
        assert "in 3 tensors" in lines[0]
        assert ("stream density 2" in lines[0]) == bool(extra)
        rows = [line.split() for line in lines[2:]]
        assert [row[0] for row in rows] == ["0.010", "0.100"]
        assert all(float(x) > 0 for row in rows for x in row[1:])


@needs_ext
def test_density_sweep_script_runs():
    """bench/density_sweep.py: a line per case and density with both steps timed."""
    script = Path(__file__).resolve().parents[1] / "bench" / "density_sweep.py"
    out = subprocess.run(
        [sys.executable, str(script), "--numel", "40000", "--cases", "one,many",
         "--densities", "0.5,0.99", "--select", "accumulated", "--topk", "approx"],
        check=True, capture_output=True, text=True, timeout=120).stdout
    lines = out.strip().splitlines()
    assert "select=accumulated, topk=approx" in lines[0]
    rows = [line for line in lines[1:] if ", density " in line]
    assert [row.split(":")[0] for row in rows] == [
        "random one tensor, density 0.5", "random one tensor, density 0.99",
        "random many tensors, density 0.5", "random many tensors, density 0.99"]
    for row in rows:
        ours, _, torchs, ratio = row.split(": ")[1].replace(",", "").split()
        assert float(ours) > 0 and float(torchs) > 0 and float(ratio.rstrip("x")) > 0
