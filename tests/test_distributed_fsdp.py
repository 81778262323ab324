"""incrkern.distributed.ShardedOptimizer on FSDP2 and HSDP (scope="global",
torch.amp.GradScaler) and select="layer" under DDP, on the CPU with gloo over
loopback (checkpoints: test_distributed_fsdp_checkpoint.py).

Each world size runs once (one spawn, every scenario in turn, each rank writing what
it saw to a file); the tests then check those records against one-process runs.
"""
import copy
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import incrkern
from incrkern.distributed import ShardedOptimizer, check_same_layers
from incrkern.distributed.fsdp import agreed_topk
from helpers import assert_param_close
from test_distributed import _spawn

DENSITY = 0.1
STEPS = 4
SAVE_AT = 2
LR = 1e-2
GLOBAL = dict(density=DENSITY, scope="global")
# FSDP2 runs compared with one process on the full tensors: name, optimizer options.
FSDP_RUNS = [("grad", GLOBAL), ("weight", dict(GLOBAL, select="weight")),
             ("grad_sq", dict(GLOBAL, select="grad_sq")),
             ("accumulated", dict(GLOBAL, select="accumulated")),
             ("mask_every_2", dict(GLOBAL, mask=2)),
             ("layer", dict(density=0.3, select="layer"))]


def _model():
    torch.manual_seed(0)
    # 3 output rows: on 4 ranks the last weight and bias leave rank 3 an empty shard.
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 3))


def _data(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 12, generator=g), torch.randn(6, 3, generator=g)


# ------------------------------------------------------------------------------------
# the ranks


def _block(shape, dim, rank, world):
    """The block of a tensor of `shape` that rank `rank` holds when it is cut along
    `dim` into `world` chunks as torch.chunk (and FSDP2) cuts: (slices, offset)."""
    size = shape[dim]
    chunk = -(-size // world)
    start, stop = min(size, rank * chunk), min(size, (rank + 1) * chunk)
    slices = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(shape)))
    offset = tuple(start if d == dim else 0 for d in range(len(shape)))
    return slices, offset


def selection_cases():
    """(name, full score tensors, the dim each is cut along, ks): ties, -0, NaN, inf,
    every float dtype."""
    g = torch.Generator().manual_seed(3)
    shapes, dims = [(7, 3), (5,), (4, 2, 3)], [0, 0, 1]
    tied = [torch.randint(0, 3, s, generator=g).float() for s in shapes]
    tied[0][1, 2] = -0.0
    tied[1][3] = -2.0
    special = [t.clone() for t in tied]
    special[0][4, 0] = float("nan")
    special[2][1, 1, 1] = float("-inf")
    heavy = [torch.randn(s, generator=g, dtype=torch.float64) ** 5 for s in shapes]
    ks = [1, 5, 17, 30, 49, 50]
    return [("tied", tied, dims, ks), ("special", special, dims, ks),
            ("bf16", [t.to(torch.bfloat16) for t in tied], dims, ks),
            ("fp16", [t.to(torch.float16) for t in special], dims, ks),
            ("fp64", heavy, dims, ks),
            ("zeros", [torch.zeros(s) for s in shapes], dims, [13])]


def _selections(rank, world):
    out = {}
    for name, full, dims, ks in selection_cases():
        blocks = [_block(t.shape, d, rank, world) for t, d in zip(full, dims)]
        scores = [t[slices] for t, (slices, _) in zip(full, blocks)]
        layouts = [(tuple(t.shape), offset) for t, (_, offset) in zip(full, blocks)]
        out[name] = {}
        for k in ks:
            calls = []
            all_reduce = dist.all_reduce
            dist.all_reduce = lambda t, *a, **kw: (calls.append(t.numel()),
                                                   all_reduce(t, *a, **kw))[1]
            try:
                out[name][k] = agreed_topk(scores, k, layouts, None)
            finally:
                dist.all_reduce = all_reduce
            out[name][("all_reduces", k)] = calls
        out[name]["offsets"] = [offset for _, offset in blocks]
        out[name]["shapes"] = [tuple(s.shape) for s in scores]
    return out


def _fsdp_model(rank, mesh=None):
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _hsdp_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def _fsdp_steps(model, opt, rank, first, steps, record=None):
    for step in range(first, first + steps):
        x, y = _data(rank, step)
        F.mse_loss(model(x), y).backward()
        if record is not None:
            record["grads"].append([p.grad.full_tensor() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        if record is not None:
            record["params"].append([p.detach().full_tensor() for p in model.parameters()])


def _fsdp_run(rank, mesh=None, **options):
    """FSDP2 training (HSDP on a 2-D `mesh`): the full grads and params of each step."""
    model = _fsdp_model(rank, mesh)
    opt = ShardedOptimizer(model.parameters(), incrkern.optim.AdamW, lr=LR, **options)
    record = {"params": [[p.detach().full_tensor() for p in model.parameters()]], "grads": []}
    _fsdp_steps(model, opt, rank, 0, STEPS, record)
    return record


def _ddp_layers(rank, seed=None):
    """DDP (default flags) with incrkern's AdamW choosing whole layers: the params
    after each step, and what check_same_layers said. `seed`: reseed the global
    generator, per rank, before training."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = incrkern.optim.AdamW(model.parameters(), lr=LR, density=0.3, select="layer")
    if seed is not None:
        torch.manual_seed(seed)
    params, errors = [], []
    for step in range(STEPS):
        x, y = _data(rank, step)
        F.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
        try:
            check_same_layers(opt)
            errors.append(None)
        except RuntimeError as e:
            errors.append(str(e))
    return {"params": params, "errors": errors}


def _layouts(world):
    """chunk_layout, the library's own rule, beside torch's own function: on a 1-D
    mesh, and on 4 ranks on a 2x2 mesh as well (HSDP's placements and others)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from incrkern.distributed import fsdp
    flat = init_device_mesh("cpu", (world,))
    cases = [(flat, shape, (placement,))
             for shape in [(7, 3), (3,), (1, 5), (0, 4), (4, 2, 3), (9, 10)]
             for placement in (Shard(0), Shard(len(shape) - 1), Shard(-1), Replicate())]
    if world == 4:
        square = _hsdp_mesh()
        cases += [(square, shape, placements)
                  for shape in [(7, 3), (1, 5), (0, 4), (4, 2, 3), (9, 10)]
                  for placements in [(Replicate(), Shard(0)), (Shard(0), Shard(1)),
                                     (Shard(1), Shard(0)), (Shard(0), Shard(0)),
                                     (Replicate(), Replicate())]]
    return [(shape, placements, fsdp.chunk_layout(shape, mesh, placements),
             fsdp.shard_layout(shape, mesh, placements)) for mesh, shape, placements in cases]


def _refused_meshes():
    """What ShardedOptimizer(scope='global') says of params laid out so that no one
    group of ranks holds each tensor once (4 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    flat, square = init_device_mesh("cpu", (4,)), _hsdp_mesh()

    def param(mesh, placements):
        return nn.Parameter(DTensor.from_local(torch.zeros(2, 3), mesh, placements,
                                               run_check=False))
    cases = {"two dims": [param(square, (Shard(0), Shard(1)))],
             "replicated": [param(flat, (Shard(0),)), param(flat, (Replicate(),))],
             "two meshes": [param(flat, (Shard(0),)), param(square, (Replicate(), Shard(0)))],
             "other dims": [param(square, (Replicate(), Shard(0))),
                            param(square, (Shard(0), Replicate()))]}
    out = {}
    for name, params in cases.items():
        try:
            ShardedOptimizer(params, incrkern.optim.AdamW, **GLOBAL)
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
        # scope="tensor" selects per shard: any layout will do.
        ShardedOptimizer(params, incrkern.optim.AdamW, density=DENSITY)
    return out


SCALE = 2.0 ** 10   # a power of two: scaling and unscaling are exact
INF_AT = 1
SCALER_RUNS = ("plain", "scaler", "unscaled_first")


def _scaled_run(rank, name, mesh=None):
    """FSDP2 with scope='global': "plain" without a scaler, leaving out step INF_AT's
    batch; "scaler" with torch.amp.GradScaler, an inf put in rank 1's gradient at
    INF_AT; "unscaled_first" the same with scaler.unscale_ before the step (as for
    clipping). With `mesh` (HSDP) the inf goes into rank 1's batch instead: FSDP's
    reductions then carry it to every replica's gradients, as a real overflow's. The
    full params, this rank's state and the scale after each step."""
    model = _fsdp_model(rank, mesh)
    opt = ShardedOptimizer(model.parameters(), incrkern.optim.AdamW, lr=LR, **GLOBAL)
    scaler = None if name == "plain" else torch.amp.GradScaler("cpu", init_scale=SCALE)
    record = {"params": [], "state": [], "scale": []}
    for step in range(STEPS):
        if scaler is None and step == INF_AT:
            continue
        x, y = _data(rank, step)
        if scaler is not None and mesh is not None and step == INF_AT and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        loss = F.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if mesh is None and step == INF_AT and rank == 1:
                with torch.no_grad():
                    next(model.parameters()).grad.to_local()[0, 0] = float("inf")
            if name == "unscaled_first":
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            record["scale"].append(scaler.get_scale())
        opt.zero_grad()
        record["params"].append([p.detach().full_tensor() for p in model.parameters()])
        record["state"].append(copy.deepcopy(opt.state_dict()))
    return record


def _worker(rank, world, port, out, scenarios):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    result = {"selections": _selections(rank, world), "layouts": _layouts(world)}
    for name, options in FSDP_RUNS:
        if name in scenarios:
            result[name] = _fsdp_run(rank, **options)
    try:
        ShardedOptimizer(_fsdp_model(rank).parameters(), incrkern.optim.AdamW,
                         density=DENSITY, scope="global", select="random")
        result["random_refused"] = ""
    except ValueError as e:
        result["random_refused"] = str(e)
    if "hsdp" in scenarios:
        result["hsdp"] = _fsdp_run(rank, mesh=_hsdp_mesh(), **GLOBAL)
        result["refused_meshes"] = _refused_meshes()
    if "scaler" in scenarios:
        result["scaler"] = {name: _scaled_run(rank, name) for name in SCALER_RUNS}
    if "scaler_hsdp" in scenarios:
        result["scaler"] = {name: _scaled_run(rank, name, _hsdp_mesh())
                            for name in ("plain", "scaler")}
    if "ddp_layers" in scenarios:
        result["ddp_layers"] = _ddp_layers(rank)
        result["ddp_layers_apart"] = _ddp_layers(rank, seed=rank)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def _records(tmp_path_factory, world, scenarios):
    out = tmp_path_factory.mktemp(f"fsdp_world{world}")
    _spawn(_worker, world, (str(out), scenarios))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# What each world size runs beyond the selections. On 4 ranks the last layer's
# shards are 1, 1, 1 and 0 rows.
WORLD4_RUNS = ("grad", "layer")
SCENARIOS = {2: ("scaler", "ddp_layers") + tuple(name for name, _ in FSDP_RUNS),
             4: WORLD4_RUNS + ("hsdp", "scaler_hsdp")}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """world size -> the ranks' records, each world spawned once, when first asked."""
    runs = {}

    def get(world):
        if world not in runs:
            runs[world] = _records(tmp_path_factory, world, SCENARIOS[world])
        return runs[world]
    return get


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def records(spawned, request):
    return spawned(request.param)


@pytest.fixture
def world2(spawned):
    return spawned(2)


# ------------------------------------------------------------------------------------
# the tests


def _concatenation_positions(local, shape, offset, local_shape, base):
    """Positions in the concatenation of the full tensors of a shard's flat indices,
    computed apart from the library's own (torch.unravel_index, then strides)."""
    if local.numel() == 0:
        return []
    coords = torch.stack(torch.unravel_index(local, local_shape), dim=1) + torch.tensor(offset)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    return (base + coords @ torch.tensor(strides)).tolist()


def test_chunk_layout_is_torchs(records):
    """The library's own shard layout rule, used where torch lacks its private helper,
    gives that helper's answer (and torch.chunk's block) on every rank."""
    world = len(records)
    for rank, record in enumerate(records):
        for shape, placements, ours, torchs in record["layouts"]:
            assert ours == torchs, (rank, shape, placements)
            (placement, *more) = placements
            if hasattr(placement, "dim") and not more:
                slices, offset = _block(shape, placement.dim % len(shape), rank, world)
                assert ours[1] == offset, (rank, shape, placement)
                assert ours[0] == tuple(torch.empty(shape)[slices].shape)


def test_agreed_topk_is_the_one_process_global_selection(records):
    """Every rank's chosen local elements, placed in the full tensors, are what
    ops.select with scope='global' chooses on the full tensors (ties to the lowest
    position in the concatenation), for every k; the ranks choose k in all."""
    split = 0
    for name, full, dims, ks in selection_cases():
        bases = [0]
        for t in full[:-1]:
            bases.append(bases[-1] + t.numel())
        for k in ks:
            expected = incrkern.ops.select(full, k, scope="global")
            expected = sorted(b + i for b, idx in zip(bases, expected) for i in idx.tolist())
            chosen = []
            for rank_record in records:
                case = rank_record["selections"][name]
                for t, idx, offset, local_shape, base in zip(
                        full, case[k], case["offsets"], case["shapes"], bases):
                    assert idx.dtype == torch.int64
                    assert idx.tolist() == sorted(set(idx.tolist()))
                    chosen += _concatenation_positions(idx, tuple(t.shape), offset,
                                                       local_shape, base)
            assert len(chosen) == k, (name, k)
            assert sorted(chosen) == expected, (name, k)
            # 256 counts per 8 bits of the key (4 rounds, 8 for fp64), and one round
            # for the positions of 50 elements when the ties do not all fit.
            calls = records[0]["selections"][name][("all_reduces", k)]
            rounds = 8 if full[0].dtype == torch.float64 else 4
            assert calls in ([], [256] * rounds, [256] * (rounds + 1)), (name, k, calls)
            assert (calls == []) == (k == 50)
            split += len(calls) == rounds + 1
    assert split   # the ties were cut by position somewhere


def _one_process(record, **options):
    """One process, the full tensors, the FSDP run's full gradients; the global
    generator where the FSDP run had it (select='layer' draws from it)."""
    _model()
    params = [p.clone() for p in record["params"][0]]
    opt = incrkern.optim.AdamW(params, lr=LR, **options)
    out = [[p.clone() for p in params]]
    for grads in record["grads"]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        out.append([p.clone() for p in params])
    return out


@pytest.mark.parametrize("run, options", FSDP_RUNS, ids=[name for name, _ in FSDP_RUNS])
def test_fsdp2_matches_one_process(world2, run, options):
    """FSDP2 + ShardedOptimizer with scope='global' (or select='layer') updates the
    elements a one-process optimizer updates on the full tensors (k in all), to the
    same values (to fp32 rounding)."""
    _check_matches_one_process(world2, run, options)


def test_fsdp2_matches_one_process_on_4_ranks_with_an_empty_shard(spawned):
    for run, options in FSDP_RUNS:
        if run in WORLD4_RUNS:
            _check_matches_one_process(spawned(4), run, options)


def _check_matches_one_process(records, run, options):
    record = records[0][run]
    expected = _one_process(record, **options)
    total = sum(p.numel() for p in record["params"][0])
    frozen = 0
    for step in range(1, STEPS + 1):
        before, after = record["params"][step - 1], record["params"][step]
        ref_before, ref_after = expected[step - 1], expected[step]
        changed = [(a != b).reshape(-1) for a, b in zip(after, before)]
        ref_changed = [(a != b).reshape(-1) for a, b in zip(ref_after, ref_before)]
        if options.get("scope") == "global":
            assert sum(int(c.sum()) for c in changed) == math.ceil(DENSITY * total), step
        else:   # whole tensors
            trained = [bool(c.any()) for c in changed]
            assert any(trained), step
            frozen += trained.count(False)
        for i, (c, r) in enumerate(zip(changed, ref_changed)):
            assert torch.equal(c, r), (step, i)
        # The same values, to the fp32 rounding of kernels run on other lengths.
        for a, r in zip(after, ref_after):
            assert_param_close(a, r)
    for rank_record in records[1:]:
        for a_step, b_step in zip(rank_record[run]["params"], record["params"]):
            assert all(torch.equal(a, b) for a, b in zip(a_step, b_step))
    assert frozen or options.get("select") != "layer"


def test_ddp_select_layer_matches_one_process(world2):
    """select='layer' under DDP (default flags): every layer gets a gradient, the
    ranks draw the same layers from the same seed (their params stay equal), and
    a one-process run on the mean gradient trains the same layers to the same
    values (to the fp32 rounding of the ranks' single-threaded matmuls)."""
    model = _model()
    params = list(model.parameters())
    opt = incrkern.optim.AdamW(params, lr=LR, density=0.3, select="layer")
    before = [p.detach().clone() for p in params]
    frozen = 0
    for step in range(STEPS):
        grads = []
        for rank in range(len(world2)):
            model.zero_grad()
            x, y = _data(rank, step)
            F.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in params])
        for p, *gs in zip(params, *grads):
            p.grad = sum(g / len(world2) for g in gs)
        opt.step()
        trained = [not torch.equal(p, b) for p, b in zip(params, before)]
        assert any(trained), step
        frozen += len(params) - sum(trained)
        for rank_record in world2:
            ranks_params = rank_record["ddp_layers"]["params"]
            ranks_before = ranks_params[step - 1] if step else before
            assert [not torch.equal(a, b) for a, b in
                    zip(ranks_params[step], ranks_before)] == trained, step
            for a, b, p in zip(ranks_params[step], world2[0]["ddp_layers"]["params"][step], params):
                assert torch.equal(a, b)
                assert_param_close(a, p.detach())
        before = [p.detach().clone() for p in params]
    assert frozen
    for rank_record in world2:
        assert rank_record["ddp_layers"]["errors"] == [None] * STEPS


def test_ranks_drawing_other_layers_are_found(world2):
    """Ranks whose global generators differ draw other layers: check_same_layers
    raises on every rank, naming the cause, from the first step they differ."""
    for rank_record in world2:
        run = rank_record["ddp_layers_apart"]
        errors = run["errors"]
        assert any(errors)
        first = next(i for i, e in enumerate(errors) if e)
        assert "drew other layers" in errors[first] and "manual_seed" in errors[first]
        assert all(e is None for e in errors[:first])
    # It raises exactly where the ranks' params part.
    a, b = (rank_record["ddp_layers_apart"]["params"] for rank_record in world2)
    same = [all(torch.equal(x, y) for x, y in zip(sa, sb)) for sa, sb in zip(a, b)]
    assert same.index(False) == first


def test_global_scope_refuses_random_keys(world2):
    for rank_record in world2:
        assert "select='random'" in rank_record["random_refused"]


def test_hsdp_global_scope_matches_one_process(spawned):
    """HSDP (a 2x2 replicate x shard mesh, 4 ranks): the shard groups agree on the
    one-process global selection, and both replicas make it (their params stay
    equal)."""
    _check_matches_one_process(spawned(4), "hsdp", GLOBAL)


def test_global_scope_refuses_layouts_it_cannot_select_over(spawned):
    refused = spawned(4)[0]["refused_meshes"]
    assert refused["two dims"].startswith("params[0]: scope='global' needs each param "
                                          "sharded (Shard) along one mesh dimension")
    assert "(Shard(dim=0), Shard(dim=1))" in refused["two dims"]
    assert refused["replicated"].startswith("params[1]:") and "(Replicate(),)" in \
        refused["replicated"]
    assert refused["two meshes"].startswith("params: scope='global' needs every param on "
                                            "one device mesh")
    assert refused["other dims"] == ("params: scope='global' needs every param sharded "
                                     "along the same mesh dimension, they are along "
                                     "dimensions [0, 1]")


def _assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for pid, state in a["state"].items():
        assert state.keys() == b["state"][pid].keys()
        for key, value in state.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)


@pytest.mark.parametrize("run", ["scaler", "unscaled_first"])
def test_grad_scaler_skips_an_inf_step_on_every_rank(world2, run):
    """torch.amp.GradScaler with ShardedOptimizer: an inf in one rank's gradient
    skips the step on every rank (params and state as they were) and halves the
    scale; the finite steps are those of the run without a scaler on the same
    batches, bit for bit (a power-of-two scale unscales exactly), whether the
    kernels unscale or scaler.unscale_ did first."""
    _check_scaled_run(world2, run)


def test_grad_scaler_under_hsdp(spawned):
    """The same on a 2x2 HSDP mesh, the inf in one rank's batch: all four ranks, both
    replicas, skip together."""
    _check_scaled_run(spawned(4), "scaler")


def _check_scaled_run(records, run):
    finite = [step for step in range(STEPS) if step != INF_AT]
    for rank_record in records:
        scaled, plain = rank_record["scaler"][run], rank_record["scaler"]["plain"]
        assert scaled["scale"] == [SCALE] * INF_AT + [SCALE / 2] * (STEPS - INF_AT)
        before, after = scaled["params"][INF_AT - 1], scaled["params"][INF_AT]
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        _assert_same_state(scaled["state"][INF_AT], scaled["state"][INF_AT - 1])
        for j, step in enumerate(finite):
            assert all(torch.equal(a, b) for a, b in zip(scaled["params"][step],
                                                         plain["params"][j])), step
            _assert_same_state(scaled["state"][step], plain["state"][j])
        first, last = scaled["params"][0], scaled["params"][-1]
        assert any(not torch.equal(a, b) for a, b in zip(first, last))
    # Every rank holds the same full params: they skipped together.
    first = records[0]["scaler"][run]["params"]
    for other in records[1:]:
        assert all(torch.equal(x, y) for sa, sb in zip(first, other["scaler"][run]["params"])
                   for x, y in zip(sa, sb))
