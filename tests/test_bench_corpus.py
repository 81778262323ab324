"""End-to-end test of `python -m incrkern.bench corpus --tiny`: a tiny byte-level
language model trains on real Python sources, dense and sparse, and the records,
tables, verdict and files come out. Quality is asserted only for dense AdamW (its
held-out loss falls); timing not at all."""
import json
import math
import os
import sysconfig

import pytest
import torch

from incrkern.bench import cli, corpus, report


def test_split_by_package_has_no_overlap():
    size = corpus.SIZES["tiny"]
    train, held_out = corpus.corpus(size)
    assert len(train) >= 0.9 * size["text_bytes"] and len(held_out) > 0
    # the held-out package's own source is in the held-out text and not in training
    path = os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")
    with open(path, "rb") as f:
        marker = f.read()[:400]
    assert marker in bytes(held_out.tolist())
    assert marker not in bytes(train.tolist())
    windows = corpus.heldout_windows(held_out, size["context"], size["eval_windows"])
    assert windows.shape == (size["eval_windows"], size["context"] + 1)


def test_interpolate_at_a_time():
    curve = [dict(train_s=0.0, heldout_bpb=8.0), dict(train_s=1.0, heldout_bpb=6.0),
             dict(train_s=3.0, heldout_bpb=5.0)]
    assert corpus._interpolate(curve, 0.5) == (7.0, True)
    assert corpus._interpolate(curve, 2.0) == (5.5, True)
    assert corpus._interpolate(curve, 4.0) == (5.0, False)


def test_tiny_run(tmp_path):
    saved_threads = torch.get_num_threads()
    try:
        results, paths = cli.run_bench("corpus", "tiny", "cpu", str(tmp_path), progress=False,
                                       quiet=True, threads=1)
    finally:
        torch.set_num_threads(saved_threads)
    run = results["corpus"]
    size = corpus.SIZES["tiny"]
    records = run["records"]
    assert [r["row"] for r in records] == [r.name for r in corpus.rows()]
    assert len(records) == 1 + len(corpus.DENSITIES) * len(corpus.SELECTS)
    assert all(r["available"] for r in records), [r.get("reason") for r in records]
    dense = records[0]
    assert dense["torch_dense"] and dense["steps_run"] == size["steps"]
    assert run["budget_s"] == dense["wall_s"] > 0
    expected_points = size["steps"] // size["eval_every"] + 1
    for r in records:
        assert math.isfinite(r["heldout_bpb"]) and math.isfinite(r["heldout_bpb_at_budget"])
        assert size["steps"] <= r["steps_run"] <= corpus.EXTRA_STEPS_FACTOR * size["steps"]
        curve = r["curve"]
        assert curve[0]["step"] == 0 and curve[0]["train_s"] == 0
        assert [c["step"] for c in curve[:expected_points]] == \
            list(range(0, size["steps"] + 1, size["eval_every"]))
        assert all(math.isfinite(c["heldout_bpb"]) for c in curve)
        assert all(a["train_s"] < b["train_s"] for a, b in zip(curve, curve[1:]))
        assert r["step_ms_median"] > r["opt_step_ms_median"] > 0 and r["state_bytes"] > 0
        if not r["torch_dense"]:
            assert r["lr"] == pytest.approx(corpus.LR * corpus.lr_scale(r["density"]))
            assert r["vs_dense"] == pytest.approx(r["heldout_bpb"] - dense["heldout_bpb"])
    # the same initial weights and held-out windows for every row
    assert len({r["curve"][0]["heldout_bpb"] for r in records}) == 1
    assert dense["heldout_bpb"] < dense["curve"][0]["heldout_bpb"] - 0.5
    assert len(run["summary"]) >= 2 and "equal steps" in run["summary"][0]

    for kind in ("json", "markdown", "plot0"):
        assert os.path.getsize(paths[kind]) > 0
    assert paths["plot0"].endswith("-tiny-corpus-t1-heldout.png")
    with open(paths["json"]) as f:
        assert len(json.load(f)["corpus"]["records"]) == len(records)
    with open(paths["markdown"]) as f:
        text = f.read()
    assert "Byte-level LM from scratch" in text and "help or hurt" in text
    assert os.path.basename(paths["plot0"]) in text
    for _, rows, columns in report.sections(results):
        assert len(report.text_table(rows, columns).splitlines()) == len(rows) + 2


def test_medium_size_is_tens_of_mb_and_only_for_corpus_and_finetune(tmp_path):
    medium, quick = corpus.SIZES["medium"], corpus.SIZES["quick"]
    assert medium["text_bytes"] >= 10_000_000 and medium["site_packages"]
    assert medium["steps"] > quick["steps"]
    with pytest.raises(SystemExit, match="finetune and corpus"):
        cli.run_bench("sparse", "medium", out=str(tmp_path))
