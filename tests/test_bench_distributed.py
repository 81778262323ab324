"""`python -m incrkern.bench distributed`: the tiny run end to end on gloo ranks (in a
child process, so that a hung rank fails the test within its timeout), and the choice
of device and world sizes for NCCL."""
import json
import os
import subprocess
import sys

import pytest
import torch

from incrkern.bench import cli, distributed
from incrkern.distributed import allreduce_bytes


def test_tiny_run_on_gloo_ranks(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "incrkern.bench", "distributed", "--tiny", "--device", "cpu",
         "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = [f for f in os.listdir(tmp_path) if f.endswith("-tiny-distributed.json")]
    with open(tmp_path / path) as f:
        results = json.load(f)
    assert results["command"].endswith("distributed --tiny --device cpu")
    rows = results["distributed"]
    configs = [None, *distributed.DENSITIES]
    assert [(r["world"], r["density"]) for r in rows] == \
        [(w, d) for w in distributed.WORLD_SIZES for d in configs]
    for r in rows:
        plain = allreduce_bytes(r["numel"], 4, r["world"])
        if r["density"] is None:
            assert r["bytes_per_step"] == pytest.approx(plain)
        else:   # the top-k exchange sends less than the all-reduce it replaces
            assert 0 < r["bytes_per_step"] < plain
        assert r["step_ms"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        if r.get("loopback_vs_counted") is not None:   # gloo's own headers come on top
            assert r["loopback_vs_counted"] > 0.9
    assert os.path.exists(tmp_path / path.replace(".json", ".md"))


def test_nccl_needs_a_gpu_per_rank(monkeypatch):
    for count, worlds in ((3, (2,)), (4, (2, 4)), (8, (2, 4))):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert distributed.world_sizes("cuda") == worlds
    assert distributed.world_sizes("cpu") == distributed.WORLD_SIZES
    for count in (0, 1):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        with pytest.raises(SystemExit, match="needs 2 GPUs or more; this machine has"):
            distributed.world_sizes("cuda")


def test_default_device_is_cuda_only_with_two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for count, device in ((1, "cpu"), (2, "cuda"), (4, "cuda")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert cli.distributed_device(None) == device
        assert cli.distributed_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.distributed_device(None) == "cpu"
