"""Smoke test of `python -m incrkern.bench finetune --tiny`: every row trains a tiny
random BERT end to end and the records, tables and files come out. No timing or
quality is asserted (two steps of a random model)."""
import json

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("safetensors", reason="safetensors is not installed")

from incrkern.bench import cli, finetune, report  # noqa: E402
from incrkern.bench.finetune_data import function_pairs  # noqa: E402


def test_function_pairs_are_offline_text_from_packages():
    pairs = function_pairs(("json",), 20)
    assert 5 <= len(pairs) <= 20
    for doc, code in pairs:
        assert len(doc) >= 20 and code.startswith("json.") and "(" in code
    assert pairs == function_pairs(("json",), 20)  # deterministic
    with pytest.raises(RuntimeError, match="none of the packages"):
        function_pairs(("no_such_package_here",), 5)


def test_tiny_run(tmp_path):
    results, paths = cli.run_bench("finetune", "tiny", "cpu", str(tmp_path), progress=False,
                                   quiet=True)
    records = results["finetune"]["records"]
    assert [r["row"] for r in records] == [r.name for r in finetune.rows("tiny")]
    failed = [(r["row"], r["reason"]) for r in records if not r["available"]
              and not (r["kind"] == "lora" and "peft" in r["reason"])]
    assert not failed
    by_row = {r["row"]: r for r in records}
    dense = by_row["dense AdamW (torch)"]
    for r in records:
        if not r["available"]:
            continue
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 < r["mrr"] <= 1.0
        if r["kind"] == "pretrained":
            continue
        assert r["steps"] == finetune.SIZES["tiny"]["steps"] and r["step_ms_median"] > 0
        assert r["peak_bytes"] >= 0 and r["stored_bytes"] > 0
        if r["kind"] == "mask":
            n = r["trainable"]
            assert n == pytest.approx(0.05 * r["params"], rel=0.1)
            # indices + exp_avg + exp_avg_sq per chosen element, and the step counts
            assert 12 * n <= r["state_bytes"] <= 12 * n + 8 * 64
            assert r["stored_bytes"] < dense["stored_bytes"]
            assert r["state_vs_dense"] < 0.1
    assert by_row["FISH mask, density 0.05, step in backward"]["state_bytes"] == \
        by_row["FISH mask, density 0.05"]["state_bytes"]
    with open(paths["json"]) as f:
        assert json.load(f)["finetune"]["steps"] == finetune.SIZES["tiny"]["steps"]
    with open(paths["markdown"]) as f:
        assert "Sparse fine-tuning" in f.read()
    for _, rows, columns in report.sections(results):
        assert len(report.text_table(rows, columns).splitlines()) == len(rows) + 2


def test_only_runs_the_named_rows(tmp_path):
    results, _ = cli.run_bench("finetune", "tiny", "cpu", str(tmp_path), progress=False,
                               quiet=True, only=["dense", "lora"])
    names = [r["row"] for r in results["finetune"]["records"]]
    assert names == ["dense AdamW (torch)", "LoRA (peft), about density 0.005"]
    assert "--only 'dense' --only 'lora'" in results["command"]
    with pytest.raises(SystemExit, match="no row matches"):
        cli.run_bench("finetune", "tiny", "cpu", str(tmp_path), progress=False, quiet=True,
                      only=["no such row"])
    with pytest.raises(SystemExit):
        cli.main(["corpus", "--only", "dense"])
