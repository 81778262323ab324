"""ShardedOptimizer checkpoints through torch.distributed.checkpoint, resumed on
another world size or mesh, on the CPU with gloo over loopback.

Four spawns, in turn: 2 ranks (FSDP2) train and save; 4 ranks, as FSDP2 and as a
2x2 HSDP mesh, resume from those checkpoints and also train and save their own; 2
ranks resume from the 2-rank, 4-rank and HSDP checkpoints; 1 process resumes from
the 2-rank and HSDP ones. Every step's gradient is given, the same full tensor
whatever the world size (a backward's would depend on how the batch is split
across the ranks), so a resumed run and the uninterrupted run that saved differ
only in where the state lives: they must agree bit for bit. Each saving run goes on
uninterrupted after saving and is the reference of the runs resuming from it.

DENSITY is incrkern.optim.base.MASK_DENSITY: a CPU step with param-sized moments
then updates through a dense mask, whose vector body and scalar peel fall on other
elements when a shard is cut at another offset; every path rounds alike
(tests/test_one_rounding.py), so the resumed run still agrees bit for bit.
"""
import copy
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import incrkern
from incrkern.distributed import ShardedOptimizer
from test_distributed import _spawn

DENSITY = 0.1
LR = 1e-2
STEPS = 5
SAVE_AT = 3   # odd: mask=2 resumes on a step that keeps the saved mask
CONFIGS = {
    "global": dict(density=DENSITY, scope="global"),                      # param-sized state
    "global_fixed": dict(density=DENSITY, scope="global", mask="fixed"),  # k-long state
    "tensor_fixed": dict(density=DENSITY, mask="fixed"),   # masks made per 2- or 4-rank shard
    "mask2": dict(density=DENSITY, scope="global", select="grad_sq", mask=2),
    # saved after an odd number of micro-steps: the accumulated gradient is mid-sum
    "accumulate": dict(density=DENSITY, scope="global", accumulate_steps=2),
    # bf16 params: the fp32 master weights are param-sized state too
    "master": dict(density=DENSITY, scope="global", master_weights=True),
}
# (checkpoint, the run resuming from it): a mesh kind and its world size each.
RESUMES = [("fsdp2", "fsdp4"), ("fsdp2", "hsdp4"), ("fsdp2", "fsdp2"), ("fsdp4", "fsdp2"),
           ("hsdp4", "fsdp2"), ("fsdp2", "fsdp1"), ("hsdp4", "fsdp1")]
COMPACT_KEYS = ("exp_avg", "exp_avg_sq")


def _model():
    torch.manual_seed(0)
    # 3 output rows: on 4 ranks the last weight and bias leave rank 3 an empty shard.
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3))


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in _model().parameters()]


def _shard_of(mesh, rank):
    """(index of this rank's block, number of blocks) along the sharded dimension."""
    world = int(mesh[4:])
    return (rank % 2, 2) if mesh.startswith("hsdp") else (rank, world)


def _block(shape, index, count):
    """Rows of the block `index` of `count`, cut as torch.chunk (and FSDP2) cuts."""
    chunk = -(-shape[0] // count)
    return slice(min(shape[0], index * chunk), min(shape[0], (index + 1) * chunk))


# ------------------------------------------------------------------------------------
# the ranks


def _fsdp_model(mesh, config):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    world = int(mesh[4:])
    device_mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
                   if mesh.startswith("hsdp") else init_device_mesh("cpu", (world,)))
    model = _model()
    if CONFIGS[config].get("master_weights"):
        model.to(torch.bfloat16)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=device_mesh)
    return fully_shard(model, mesh=device_mesh)


def _set_grads(model, step, mesh, rank):
    from torch.distributed.tensor import DTensor
    index, count = _shard_of(mesh, rank)
    for p, full in zip(model.parameters(), _grads(step)):
        local = full[_block(full.shape, index, count)].to(p.dtype).contiguous()
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                    stride=p.stride(), run_check=False)


def _full_params(model):
    # clone: on a 1-rank mesh full_tensor() is the param's own storage
    return [p.detach().full_tensor().clone() for p in model.parameters()]


def _steps(model, opt, mesh, rank, first, last, params):
    for step in range(first, last):
        _set_grads(model, step, mesh, rank)
        opt.step()
        opt.zero_grad()
        params.append(_full_params(model))


def _save_run(rank, mesh, config, out):
    """Trains STEPS steps, saving after SAVE_AT: the params after each step and the
    state it saved."""
    import torch.distributed.checkpoint as dcp
    model = _fsdp_model(mesh, config)
    opt = ShardedOptimizer(model.parameters(), incrkern.optim.AdamW, lr=LR, **CONFIGS[config])
    params = [_full_params(model)]
    _steps(model, opt, mesh, rank, 0, SAVE_AT, params)
    dcp.save({"model": model.state_dict(), "optim": opt.distributed_state_dict()},
             checkpoint_id=os.path.join(out, f"{mesh}_{config}"))
    state = copy.deepcopy(opt.state_dict())
    _steps(model, opt, mesh, rank, SAVE_AT, STEPS, params)
    return {"params": params, "state": state}


def _load(mesh, config, out, saved):
    import torch.distributed.checkpoint as dcp
    model = _fsdp_model(mesh, config)
    opt = ShardedOptimizer(model.parameters(), incrkern.optim.AdamW, lr=LR, **CONFIGS[config])
    path = os.path.join(out, f"{saved}_{config}")
    metadata = dcp.FileSystemReader(path).read_metadata()
    loaded = {"model": model.state_dict(), "optim": opt.distributed_state_dict(metadata, "optim")}
    dcp.load(loaded, checkpoint_id=path)
    model.load_state_dict(loaded["model"])
    opt.load_distributed_state_dict(loaded["optim"])
    return model, opt, metadata, loaded


def _resume_run(rank, mesh, config, out, saved):
    """Loads checkpoint `saved` and trains its remaining steps: the params after the
    load and after each step, and the state loaded."""
    model, opt, _, _ = _load(mesh, config, out, saved)
    params = [_full_params(model)]
    state = copy.deepcopy(opt.state_dict())
    _steps(model, opt, mesh, rank, SAVE_AT, STEPS, params)
    return {"params": params, "state": state}


def _refusals(out):
    """Bad input to the load: the error each raises, and the state before and after."""
    import torch.distributed.checkpoint as dcp
    errors = {}
    model, opt, metadata, loaded = _load("fsdp1", "global_fixed", out, "fsdp2")
    for name, call in [("wrong key", lambda: opt.distributed_state_dict(metadata, "optimizer")),
                       ("no key", lambda: opt.distributed_state_dict(metadata)),
                       ("not filled", lambda: opt.load_distributed_state_dict({"state": {}}))]:
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    before = copy.deepcopy(opt.state_dict())
    params = _full_params(model)
    # One position moved past the end, then one taken twice: the load raises whole.
    bad = copy.deepcopy(loaded["optim"])
    entry = bad["positions"]["0"]["rank0"]["positions"]
    entry[0] = 20 * 12
    try:
        opt.load_distributed_state_dict(bad)
    except ValueError as e:
        errors["outside"] = str(e)
    bad = copy.deepcopy(loaded["optim"])
    ranks = bad["positions"]["0"]
    ranks["rank1"]["positions"][0] = ranks["rank0"]["positions"][0]
    try:
        opt.load_distributed_state_dict(bad)
    except ValueError as e:
        errors["twice"] = str(e)
    # A model of another shape: the checkpoint's moments do not fit it.
    other = nn.Sequential(nn.Linear(12, 21), nn.ReLU(), nn.Linear(21, 3))
    from torch.distributed.fsdp import fully_shard
    fully_shard(other)
    other_opt = ShardedOptimizer(other.parameters(), incrkern.optim.AdamW, lr=LR,
                                 **CONFIGS["global"])
    path = os.path.join(out, "fsdp2_global")
    try:
        other_opt.distributed_state_dict(dcp.FileSystemReader(path).read_metadata(), "optim")
    except ValueError as e:
        errors["other model"] = str(e)
    return {"errors": errors, "before": before, "after": copy.deepcopy(opt.state_dict()),
            "params_before": params, "params_after": _full_params(model)}


# What each spawn does: meshes that save, and (mesh, checkpoint) pairs that resume.
PHASES = {
    "first": (2, ["fsdp2"], []),
    "world4": (4, ["fsdp4", "hsdp4"], [("fsdp4", "fsdp2"), ("hsdp4", "fsdp2")]),
    "world2": (2, [], [("fsdp2", "fsdp4"), ("fsdp2", "hsdp4"), ("fsdp2", "fsdp2")]),
    "world1": (1, [], [("fsdp1", "fsdp2"), ("fsdp1", "hsdp4")]),
}


def _worker(rank, world, port, out, phase):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    _, saving, resuming = PHASES[phase]
    result = {}
    for config in CONFIGS:
        for mesh in saving:
            result[("save", mesh, config)] = _save_run(rank, mesh, config, out)
        for mesh, saved in resuming:
            result[("resume", saved, mesh, config)] = _resume_run(rank, mesh, config, out, saved)
    if phase == "world1":
        result["refusals"] = _refusals(out)
    torch.save(result, os.path.join(out, f"{phase}_rank{rank}.pt"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """{run key: [each rank's record]} of the four spawns, run in turn."""
    out = tmp_path_factory.mktemp("fsdp_checkpoint")
    runs = {}
    for phase, (world, _, _) in PHASES.items():
        _spawn(_worker, world, (str(out), phase))
        for rank in range(world):
            result = torch.load(out / f"{phase}_rank{rank}.pt", weights_only=False)
            for key, value in result.items():
                runs.setdefault(key, []).append(value)
    return runs


# ------------------------------------------------------------------------------------
# the tests


def _global_state(ranks, mesh, config):
    """The ranks' local states put together: {param index: {key: value}} with
    param-sized state as full tensors, kept positions as sorted positions in the
    full tensor, k-long state in the order of those positions, counters as they
    are (the same on every rank)."""
    shapes = [p.shape for p in _model().parameters()]
    fixed = CONFIGS[config].get("mask") == "fixed"
    out = {}
    for rank, record in enumerate(ranks):
        index, count = _shard_of(mesh, rank)
        for pid, state in record["state"]["state"].items():
            shape = shapes[pid]
            rows = _block(shape, index, count)
            row_size = math.prod(shape[1:])
            mine = out.setdefault(pid, {})
            kept = state.get("indices")
            if kept is not None:
                positions = kept.long() + rows.start * row_size
                chosen = mine.setdefault("chosen", {})
                for j, position in enumerate(positions.tolist()):
                    values = tuple(float(state[k][j]) for k in COMPACT_KEYS) if fixed else ()
                    assert chosen.setdefault(position, values) == values   # replicas agree
            for key, value in state.items():
                if key == "indices" or (fixed and key in COMPACT_KEYS):
                    if key != "indices":
                        assert value.numel() == kept.numel()   # k-long
                    continue
                if value.dim() == 0:
                    assert torch.equal(mine.setdefault(key, value), value), key
                    continue
                full = mine.setdefault(key, torch.full(shape, float("nan"), dtype=value.dtype))
                if not torch.isnan(full[rows]).all():   # a replica's block: the same
                    assert torch.equal(full[rows], value), key
                full[rows] = value
    for state in out.values():
        if "chosen" in state:
            state["chosen"] = sorted(state["chosen"].items())
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for pid in a:
        assert a[pid].keys() == b[pid].keys(), pid
        for key, value in a[pid].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[pid][key]), (pid, key)
            else:
                assert value == b[pid][key], (pid, key)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("saved, resumed", RESUMES, ids=[f"{a}-{b}" for a, b in RESUMES])
def test_resumes_on_another_world_size_bit_identically(records, config, saved, resumed):
    """Resumed on another world size or mesh, the optimizer holds the state that was
    saved (the same full moments, kept positions and their k-long moments, step
    counters) and the run goes on as the uninterrupted one, bit for bit."""
    saving = records[("save", saved, config)]
    resuming = records[("resume", saved, resumed, config)]
    assert len(resuming) == int(resumed[4:])
    expected = _global_state(saving, saved, config)
    assert expected and all("step" in s for s in expected.values())
    _assert_same_state(_global_state(resuming, resumed, config), expected)
    if "mask" in CONFIGS[config]:   # a mask it keeps: its positions were saved
        assert all("chosen" in s for s in expected.values())
    if "accumulate_steps" in CONFIGS[config]:   # saved mid-sum, the sum went along
        assert all("grad_acc" in s for s in expected.values())
    if CONFIGS[config].get("master_weights"):   # bf16 params: their fp32 masters went along
        assert all("master_weight" in s for s in expected.values())
    for rank_record in resuming:
        for step, (a, b) in enumerate(zip(rank_record["params"], saving[0]["params"][SAVE_AT:])):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), step
    # The remaining steps train: the comparison is not of untouched params.
    last, at_save = saving[0]["params"][-1], saving[0]["params"][SAVE_AT]
    assert any(not torch.equal(x, y) for x, y in zip(last, at_save))


def _one_process(config):
    params = [p.detach().clone() for p in _model().parameters()]
    opt = incrkern.optim.AdamW(params, lr=LR, **CONFIGS[config])
    out = [[p.clone() for p in params]]
    for step in range(STEPS):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
        out.append([p.clone() for p in params])
    return out


@pytest.mark.parametrize("config", ["global", "global_fixed", "mask2"])
def test_saving_runs_with_global_scope_equal_one_process(records, config):
    """The uninterrupted references themselves, FSDP2 on 2 and 4 ranks and HSDP on
    2x2: with scope='global' each is the one-process run on the full tensors, bit
    for bit, and k elements change at each step."""
    expected = _one_process(config)
    total = sum(p.numel() for p in expected[0])
    for mesh in ("fsdp2", "fsdp4", "hsdp4"):
        for rank_record in records[("save", mesh, config)]:
            for step, (a, b) in enumerate(zip(rank_record["params"], expected)):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), (mesh, step)
    for before, after in zip(expected, expected[1:]):
        changed = sum(int((a != b).sum()) for a, b in zip(after, before))
        assert changed == math.ceil(DENSITY * total)


def test_bad_checkpoint_input_raises_and_changes_nothing(records):
    (run,) = records["refusals"]
    errors = run["errors"]
    assert "key" in errors["wrong key"] and "optimizer.param_groups" in errors["wrong key"]
    assert errors["no key"].startswith("key must be")
    assert errors["not filled"].startswith("state_dict must be")
    assert "state_dict['positions']['0']" in errors["outside"] and "outside" in errors["outside"]
    assert "more than once" in errors["twice"]
    assert errors["other model"].startswith("metadata: optim.state.0.") \
        and "params[0] (21, 12)" in errors["other model"]
    assert run["before"]["state"]   # a loaded state, left as it was
    _assert_same_state(run["after"]["state"], run["before"]["state"])
    assert run["after"]["param_groups"] == run["before"]["param_groups"]
    assert all(torch.equal(a, b) for a, b in zip(run["params_after"], run["params_before"]))
