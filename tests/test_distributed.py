"""incrkern.distributed: the top-k DDP hook, on the CPU with gloo over loopback.

Each world size runs once (one spawn, several DDP models in turn, each rank writing
what it saw to a file); the tests then check those records against a single-process
simulation of the ranks and against plain DDP.
"""
import faulthandler
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers import DEVICES
from incrkern.distributed import TopKState, allgather_bytes, allreduce_bytes, topk_hook

LR = 0.1
STEPS = 6
START = 2           # start_iter of the compressed runs
SAVE_AT = 3         # the resumed runs restart from here
BUCKET_MB = 0.001   # three buckets for this model
DENSITY = 0.01
SPAWN_TIMEOUT = 240  # seconds, per spawn (a loaded 2-core machine takes 60)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 8))


def _data(rank, step, micro=0):
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    return torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)


def _backward(model, rank, step, micro, scaler=None):
    x, y = _data(rank, step, micro)
    loss = F.mse_loss(model(x), y)
    (scaler.scale(loss) if scaler else loss).backward()


# ------------------------------------------------------------------------------------
# the ranks


class _Recorder:
    """Wraps topk_hook: per call, the bucket's local gradient, the packet this rank
    sent (from the collective's input), and the residual after the call."""

    def __init__(self):
        self.calls, self.entries = [], []
        self._all_gather = getattr(dist, "all_gather_single", None) or \
            dist.all_gather_into_tensor
        self._all_reduce = dist.all_reduce

    def install(self):
        def all_gather(out, packet, *args, **kwargs):
            self.calls.append(("all_gather", packet.clone()))
            return self._all_gather(out, packet, *args, **kwargs)

        def all_reduce(tensor, *args, **kwargs):
            self.calls.append(("all_reduce", None))
            return self._all_reduce(tensor, *args, **kwargs)
        dist.all_gather_single = dist.all_gather_into_tensor = all_gather
        dist.all_reduce = all_reduce

    def hook(self, state, bucket):
        entry = {"iter": state.iter, "index": bucket.index(), "raw": bucket.buffer().clone(),
                 "shapes": [tuple(g.shape) for g in bucket.gradients()],
                 "residual_before": _residual(state, bucket.index())}
        fut = topk_hook(state, bucket)
        entry["collective"], packet = self.calls[-1]
        entry["sent"] = None if packet is None else _unpack(packet, entry["raw"].numel())
        entry["residual"] = _residual(state, bucket.index())
        self.entries.append(entry)
        return fut


def _residual(state, index):
    r = state.residuals.get(index)
    return None if r is None else r.clone()


def _unpack(packet, numel):
    k = packet.numel() // 2
    return torch.zeros(numel).index_add_(0, packet[k:].long(),
                                         packet[:k].clone().view(torch.float32))


def _train(rank, ddp, steps=STEPS, first=0, micro=1, scaler=None, inject=None):
    """Trains `ddp` (its hook already registered, or plain DDP) with SGD; returns the
    reduced gradients of each step."""
    model = ddp.module
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for step in range(first, first + steps):
        handle = inject(step) if inject else None
        for m in range(micro - 1):
            with ddp.no_sync():
                _backward(ddp, rank, step, m, scaler)
        _backward(ddp, rank, step, micro - 1, scaler)
        if handle is not None:
            handle.remove()
        grads.append([p.grad.clone() for p in model.parameters()])
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return grads


def _ddp(model, state=None, hook=None, bucket_mb=BUCKET_MB, **ddp_options):
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb, **ddp_options)
    if state is not None:
        ddp.register_comm_hook(state, hook)
    return ddp


def _run_compressed(rank, rec, steps=STEPS, first=0, model=None, bucket_mb=BUCKET_MB,
                    state_dict=None, ddp_options=None, **options):
    options.setdefault("density", DENSITY)
    options.setdefault("start_iter", START)
    state = TopKState(**options)
    if state_dict is not None:
        state.load_state_dict(state_dict)
    rec.entries = []
    model = model or _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp = _ddp(model, state, rec.hook, bucket_mb, **(ddp_options or {}))
        grads = _train(rank, ddp, steps, first)
    return {"grads": grads, "log": rec.entries, "state": state.state_dict(),
            "params": [p.detach().clone() for p in model.parameters()],
            "bytes": state.bytes_sent, "warnings": [str(w.message) for w in caught
                                                    if "topk_hook" in str(w.message)]}


def _worker(rank, world, port, out, scenarios):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    rec = _Recorder()
    rec.install()
    result = {}
    result["plain"] = {"grads": _train(rank, _ddp(_model()))}
    result["density1"] = _run_compressed(rank, rec, density=1.0)
    result["topk"] = _run_compressed(rank, rec)
    if "resume" in scenarios:
        # Continue the topk run from SAVE_AT: its params and hook state at that point.
        saved = _run_compressed(rank, rec, steps=SAVE_AT)
        for name, bucket_mb in (("resume", BUCKET_MB), ("resume_relayout", 1.0)):
            model = _model()
            with torch.no_grad():
                for p, q in zip(model.parameters(), saved["params"]):
                    p.copy_(q)
            result[name] = _run_compressed(rank, rec, steps=STEPS - SAVE_AT, first=SAVE_AT,
                                           model=model, state_dict=saved["state"],
                                           bucket_mb=bucket_mb)
    if "bucket_view" in scenarios:
        result["bucket_view"] = _run_compressed(
            rank, rec, ddp_options={"gradient_as_bucket_view": True})
    if "no_sync" in scenarios:
        state = TopKState(density=DENSITY, start_iter=START)
        result["no_sync"] = {"grads": _train(rank, _ddp(_model(), state, topk_hook), steps=4,
                                             micro=2)}
    if "momentum" in scenarios:
        result["momentum"] = _run_compressed(rank, rec, steps=5, momentum_correction=True,
                                             momentum=0.9)
    if "approx" in scenarios:
        result["approx"] = _run_compressed(rank, rec, steps=4, topk="approx")
    if "inf" in scenarios:
        result["inf"] = _inf_run(rank, rec)
    if "fsdp" in scenarios:
        result["fsdp"] = {name: _fsdp_run(rank, density)
                          for name, density in (("torch", None), ("dense", 1.0),
                                                ("sparse", 0.1))}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


INF_STEP = 3
INF_POSITION = 5    # in the first layer's weight, on rank 1


def _inf_run(rank, rec):
    state = TopKState(density=DENSITY, start_iter=START)
    model = _model()
    ddp = _ddp(model, state, rec.hook)
    weight = model[0].weight
    rec.entries = []

    def inject(step):
        if rank != 1 or step != INF_STEP:
            return None

        def put_inf(g):
            g = g.clone()
            g.view(-1)[INF_POSITION] = float("inf")
            return g
        return weight.register_hook(put_inf)

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    params = []
    grads = []
    for step in range(5):
        params.append([p.detach().clone() for p in model.parameters()])
        grads += _train(rank, ddp, steps=1, first=step, scaler=scaler, inject=inject)
    params.append([p.detach().clone() for p in model.parameters()])
    key = state._param_keys[weight]
    return {"grads": grads, "params": params, "log": rec.entries, "where": state._where[key],
            "scale": scaler.get_scale()}


def _fsdp_run(rank, density, steps=3):
    """FSDP2 (fully_shard per layer and on the whole) with torch's AdamW (density None)
    or incrkern's on the local shards: each rank's shards and local gradients."""
    import incrkern
    from incrkern.distributed import ShardedOptimizer
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    params = list(model.parameters())
    if density is None:
        opt = torch.optim.AdamW(params, lr=1e-2)
    else:
        opt = ShardedOptimizer(params, incrkern.optim.AdamW, lr=1e-2, density=density)
    shards = [[p.to_local().detach().clone() for p in params]]
    grads = []
    for step in range(steps):
        _backward(model, rank, step, 0)
        grads.append([p.grad.to_local().clone() for p in params])
        opt.step()
        opt.zero_grad()
        shards.append([p.to_local().detach().clone() for p in params])
    return {"shards": shards, "grads": grads}


def _dying_worker(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    state = TopKState(density=DENSITY, start_iter=START)
    ddp = _ddp(_model(), state, topk_hook)
    _train(rank, ddp, steps=START + 1)
    if rank == 1:
        os._exit(1)   # dies before the next step's collectives
    start = time.monotonic()
    try:
        _train(rank, ddp, steps=1, first=START + 1)
        message = None
    except Exception as e:  # the error DDP raises from the hook's future
        message = f"{type(e).__name__}: {e}"
    torch.save({"error": message, "seconds": time.monotonic() - start},
               os.path.join(out, "rank0.pt"))
    os._exit(0)   # the group's peer is gone: skip the collective teardown


def _logged(rank, fn, logs, world, port, *args):
    """fn(rank, world, port, *args) with this rank's stderr in a file of its own, into
    which faulthandler writes every thread's Python stack should a signal kill it; then
    the group's teardown, after a last barrier that every rank marks having passed.

    The rank then leaves without the interpreter's teardown, as incrkern.bench's
    distributed ranks do: after gloo, that aborts now and then ("terminate called
    without an active exception", a thread of torch's still joinable at exit)."""
    log = open(os.path.join(logs, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    fn(rank, world, port, *args)
    if dist.is_initialized():
        dist.barrier()   # no rank leaves while a peer still talks to it
        open(os.path.join(logs, f"rank{rank}.done"), "w").close()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _log_tails(logs, world, chars=4000):
    tails = []
    for rank in range(world):
        path = os.path.join(logs, f"rank{rank}.log")
        text = open(path, errors="replace").read() if os.path.exists(path) else ""
        tails.append(f"--- rank {rank}'s stderr, last {chars} characters ---\n{text[-chars:]}")
    return "\n".join(tails)


def _spawn(fn, world, args, timeout=SPAWN_TIMEOUT):
    """Runs fn(rank, world, port, *args) in `world` processes; a worker's exception is
    raised here with its traceback and every rank's stderr (a rank killed by a signal
    leaves only that); all are killed after `timeout` seconds.

    A rank that dies without a Python exception once every rank has passed the last
    barrier (its work, and its peers', written and done) died in destroy_process_group:
    that is warned of, with the ranks' stderr, and the work stands."""
    logs = tempfile.mkdtemp(prefix="ranks-")
    context = mp.start_processes(_logged, args=(fn, logs, world, _free_port()) + args,
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    failure = None
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"distributed workers still running after {timeout} s")
    except Exception as e:
        failure = e
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    if failure is not None:
        message = f"{failure}\n{_log_tails(logs, world)}"
        torn_down = all(os.path.exists(os.path.join(logs, f"rank{r}.done"))
                        for r in range(world))
        if not (torn_down and isinstance(failure, mp.ProcessExitedException)):
            raise AssertionError(message) from failure
        warnings.warn(f"a rank died in the process group's teardown: {message}")
    shutil.rmtree(logs)


def _records(tmp_path_factory, world, scenarios):
    out = tmp_path_factory.mktemp(f"world{world}")
    _spawn(_worker, world, (str(out), scenarios))
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _records(tmp_path_factory, 2,
                    ("resume", "bucket_view", "no_sync", "momentum", "approx", "inf", "fsdp"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _records(tmp_path_factory, 4, ())


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def records(request):
    return request.getfixturevalue(f"world{request.param}")


# ------------------------------------------------------------------------------------
# the single-process simulation


def simulate(world, steps, warm_grads, density=DENSITY, start_iter=START, micro=1,
             momentum=None):
    """Reduced gradients of each step, computed without torch.distributed: per-rank
    gradients, residuals (and velocities), torch.topk per tensor, the sum of the
    ranks' sparse contributions over world size. Warm-up steps take `warm_grads`."""
    torch.set_num_threads(1)
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    residual = [[torch.zeros(p.numel()) for p in params] for _ in range(world)]
    velocity = [[torch.zeros(p.numel()) for p in params] for _ in range(world)]
    reduced_steps = []
    for step in range(steps):
        local = []
        for r in range(world):
            opt.zero_grad()
            for m in range(micro):
                _backward(model, r, step, m)
            local.append([p.grad.reshape(-1).clone() for p in params])
        if step < start_iter:
            reduced = [g.clone() for g in warm_grads[step]]
        else:
            reduced = []
            for i, p in enumerate(params):
                total = torch.zeros(p.numel())
                for r in range(world):
                    g = local[r][i]
                    if momentum is not None:
                        velocity[r][i] = torch.add(g, velocity[r][i], alpha=momentum)
                        u = residual[r][i] + velocity[r][i]
                    else:
                        u = residual[r][i] + g
                    chosen = torch.topk(u.abs(), math.ceil(density * p.numel())).indices
                    sent = torch.zeros_like(u)
                    sent[chosen] = u[chosen]
                    residual[r][i] = u.index_fill(0, chosen, 0.0)
                    velocity[r][i] = velocity[r][i].index_fill(0, chosen, 0.0)
                    total += sent
                reduced.append((total / world).view_as(p))
        reduced_steps.append(reduced)
        for p, g in zip(params, reduced):
            p.grad = g.clone()
        opt.step()
    return reduced_steps


def _assert_grads_equal(actual, expected, what):
    assert len(actual) == len(expected)
    for step, (a_step, e_step) in enumerate(zip(actual, expected)):
        for i, (a, e) in enumerate(zip(a_step, e_step)):
            assert torch.equal(a, e), f"{what}: step {step}, param {i} differs " \
                f"(max |diff| {(a - e).abs().max().item()})"


# ------------------------------------------------------------------------------------
# the tests


def test_density_one_is_plain_ddp(records):
    for rank_record in records:
        _assert_grads_equal(rank_record["density1"]["grads"], rank_record["plain"]["grads"],
                            "density 1 vs plain DDP")
        # A density of 1 sends more by all-gather than by all-reduce: it warns, all-reduces.
        assert any("all-reduced" in w for w in rank_record["density1"]["warnings"])
        assert {e["collective"] for e in rank_record["density1"]["log"]} == {"all_reduce"}


def test_topk_matches_simulation(records):
    world = len(records)
    run = records[0]["topk"]
    expected = simulate(world, STEPS, run["grads"][:START])
    for rank_record in records:
        _assert_grads_equal(rank_record["topk"]["grads"], expected, "DDP top-k vs simulation")
        assert not rank_record["topk"]["warnings"]
    # Sparse indeed: each reduced tensor has at most world * k nonzeros.
    for g in run["grads"][-1]:
        assert 0 < int((g != 0).sum()) <= world * math.ceil(DENSITY * g.numel())


def _compressed_entries(log):
    return [e for e in log if e["collective"] == "all_gather"]


def _check_conservation(log):
    """Per bucket: each step, sent + new residual == raw + old residual, bit for bit;
    over the steps, the sum of what was sent plus the residual is the sum of the raw
    gradients (to float32 rounding of the running sums)."""
    sums = {}
    for e in _compressed_entries(log):
        before = e["residual_before"] if e["residual_before"] is not None and \
            e["residual_before"].numel() == e["raw"].numel() else torch.zeros_like(e["raw"])
        u = before + e["raw"]
        assert torch.equal(e["sent"] + e["residual"], u)
        assert torch.equal(e["residual"][e["sent"] != 0], torch.zeros(int((e["sent"] != 0).sum())))
        raw, sent, _ = sums.get(e["index"], (0, 0, None))
        sums[e["index"]] = (raw + e["raw"].double(), sent + e["sent"].double(), e["residual"])
    assert sums
    for index, (raw, sent, residual) in sums.items():
        torch.testing.assert_close(sent + residual.double(), raw, rtol=0, atol=1e-6)


def test_error_feedback_conserves_mass(records):
    for rank_record in records:
        _check_conservation(rank_record["topk"]["log"])


def test_approx_selection_conserves_mass_and_sends_k(world2):
    for rank_record in world2:
        entries = _compressed_entries(rank_record["approx"]["log"])
        assert entries
        _check_conservation(rank_record["approx"]["log"])
        for e in entries:
            k = sum(math.ceil(DENSITY * math.prod(s)) for s in e["shapes"])
            assert 0 < int((e["sent"] != 0).sum()) <= k


def test_warmup_all_reduces_then_compresses(records):
    world = len(records)
    for rank_record in records:
        log = rank_record["topk"]["log"]
        for e in log:
            assert e["collective"] == ("all_reduce" if e["iter"] < START else "all_gather"), \
                (e["iter"], e["collective"])
        assert max(e["iter"] for e in log) == STEPS - 1
        _assert_grads_equal(rank_record["topk"]["grads"][:START],
                            rank_record["plain"]["grads"][:START], "warm-up vs plain DDP")
        # Bytes sent in the last iteration, by the ring model: (W - 1) * 8k per bucket.
        last = [e for e in log if e["iter"] == STEPS - 1]
        ks = [sum(math.ceil(DENSITY * math.prod(s)) for s in e["shapes"]) for e in last]
        assert rank_record["topk"]["bytes"] == sum(allgather_bytes(k, world) for k in ks) \
            == (world - 1) * 8 * sum(ks)
        dense = sum(allreduce_bytes(e["raw"].numel(), 4, world) for e in last)
        assert dense == sum(round(2 * (world - 1) * 4 * e["raw"].numel() / world) for e in last)
        assert rank_record["topk"]["bytes"] < dense / 10


def test_resume_continues_bit_identically(world2):
    for rank_record in world2:
        _assert_grads_equal(rank_record["resume"]["grads"],
                            rank_record["topk"]["grads"][SAVE_AT:], "resumed vs uninterrupted")
        resumed_log = rank_record["resume"]["log"]
        assert resumed_log[0]["iter"] == SAVE_AT
        # The resumed model's first iteration has DDP's initial buckets, then it rebuilds.
        assert len({tuple(map(tuple, e["shapes"])) for e in resumed_log}) > \
            len({e["index"] for e in resumed_log if e["iter"] == STEPS - 1})
        final = rank_record["resume"]["state"]
        expected = rank_record["topk"]["state"]
        assert final["iter"] == expected["iter"] == STEPS
        assert set(final["residuals"]) == set(expected["residuals"])
        for key in expected["residuals"]:
            assert torch.equal(final["residuals"][key], expected["residuals"][key])


def test_bucket_rebuild_moves_each_residual(world2):
    """Other bucket sizes (a different bucket_cap_mb): the buckets change size, every
    parameter's residual moves to its new place, and the run continues unchanged."""
    for rank_record in world2:
        sizes = {e["raw"].numel() for e in rank_record["resume_relayout"]["log"]
                 if e["iter"] == STEPS - 1}
        original = {e["raw"].numel() for e in rank_record["topk"]["log"]
                    if e["iter"] == STEPS - 1}
        assert sizes != original
        _assert_grads_equal(rank_record["resume_relayout"]["grads"],
                            rank_record["topk"]["grads"][SAVE_AT:], "re-bucketed vs original")


def test_new_parameters_start_with_zero_residual():
    state = TopKState(density=0.5, start_iter=2)
    layout = ((0, 0, 3), (1, 3, 2))
    residual, _ = state._memory(0, layout, 5, torch.device("cpu"))
    residual.copy_(torch.arange(1.0, 6.0))
    # Bucket 0 now holds parameter 1 and a parameter never seen (key 2).
    residual, _ = state._memory(0, ((1, 0, 2), (2, 2, 4)), 6, torch.device("cpu"))
    assert torch.equal(residual, torch.tensor([4.0, 5.0, 0, 0, 0, 0]))
    # Parameter 0 left every bucket: its residual is kept for when it comes back.
    residual, _ = state._memory(1, ((0, 0, 3),), 3, torch.device("cpu"))
    assert torch.equal(residual, torch.tensor([1.0, 2.0, 3.0]))
    assert set(state.state_dict()["residuals"]) == {0, 1, 2}


def test_gradient_as_bucket_view(world2):
    for rank_record in world2:
        _assert_grads_equal(rank_record["bucket_view"]["grads"], rank_record["topk"]["grads"],
                            "gradient_as_bucket_view vs copied gradients")


def test_no_sync_accumulation(world2):
    world = len(world2)
    run = world2[0]["no_sync"]
    expected = simulate(world, 4, run["grads"][:START], micro=2)
    for rank_record in world2:
        _assert_grads_equal(rank_record["no_sync"]["grads"], expected, "no_sync vs simulation")


def test_momentum_correction_matches_simulation(world2):
    run = world2[0]["momentum"]
    expected = simulate(len(world2), 5, run["grads"][:START], momentum=0.9)
    for rank_record in world2:
        _assert_grads_equal(rank_record["momentum"]["grads"], expected,
                            "momentum correction vs simulation")


def test_inf_reaches_the_reduced_gradient_and_spares_the_residual(world2):
    for rank, rank_record in enumerate(world2):
        run = rank_record["inf"]
        weight_grad = run["grads"][INF_STEP][0].reshape(-1)
        assert weight_grad[INF_POSITION] == float("inf")   # GradScaler's found_inf fires
        # The scaler skipped that step on every rank, and only that one.
        for step in range(5):
            same = all(torch.equal(a, b) for a, b in zip(run["params"][step],
                                                         run["params"][step + 1]))
            assert same == (step == INF_STEP), step
        assert run["scale"] < 4.0
        index, offset, _ = run["where"]
        entry = next(e for e in run["log"] if e["iter"] == INF_STEP and e["index"] == index)
        position = offset + INF_POSITION
        assert torch.isfinite(entry["residual"]).all()
        if rank == 1:
            assert entry["sent"][position] == float("inf")
            assert torch.equal(entry["residual"][position], entry["residual_before"][position])
            assert not torch.equal(entry["residual"], entry["residual_before"])
        later = [e for e in run["log"] if e["iter"] > INF_STEP]
        assert later and all(torch.isfinite(e["residual"]).all() for e in later)


def test_fsdp2_local_shards_dense_is_torch_adamw(world2):
    for rank_record in world2:
        runs = rank_record["fsdp"]
        for step, (ours, torchs) in enumerate(zip(runs["dense"]["shards"],
                                                  runs["torch"]["shards"])):
            for a, b in zip(ours, torchs):
                torch.testing.assert_close(a, b, msg=f"step {step}")


def test_fsdp2_selects_within_each_shard(world2):
    """AdamW at density 0.1 on FSDP2 shards: the first step changes exactly the
    ceil(0.1 * shard numel) elements of largest |local gradient| of each shard."""
    for rank_record in world2:
        run = rank_record["fsdp"]["sparse"]
        before, after = run["shards"][0], run["shards"][1]
        for i, (b, a, g) in enumerate(zip(before, after, run["grads"][0])):
            assert b.numel() < math.prod(_model_shapes()[i])   # a shard, not the tensor
            k = math.ceil(0.1 * g.numel())
            chosen = set(torch.topk(g.reshape(-1).abs(), k).indices.tolist())
            changed = set((a != b).reshape(-1).nonzero().reshape(-1).tolist())
            assert changed == chosen, i
        assert any(not torch.equal(x, y) for x, y in zip(run["shards"][1], run["shards"][3]))


def _model_shapes():
    return [tuple(p.shape) for p in _model().parameters()]


def test_sharded_optimizer_needs_dtensors():
    import incrkern
    from incrkern.distributed import ShardedOptimizer
    with pytest.raises(TypeError, match="params\\[0\\].*DTensor"):
        ShardedOptimizer(_model().parameters(), incrkern.optim.AdamW)


def test_a_dead_rank_fails_the_others(tmp_path):
    # Plain processes: torch's spawn would kill rank 0 as soon as rank 1 exits.
    context = mp.get_context("spawn")
    port = _free_port()
    ranks = [context.Process(target=_dying_worker, args=(rank, 2, port, str(tmp_path)))
             for rank in range(2)]
    start = time.monotonic()
    for p in ranks:
        p.start()
    try:
        for p in ranks:
            p.join(timeout=max(0.1, SPAWN_TIMEOUT - (time.monotonic() - start)))
        assert not any(p.is_alive() for p in ranks), \
            f"a rank still runs after {SPAWN_TIMEOUT} s"
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in ranks] == [0, 1]
    result = torch.load(tmp_path / "rank0.pt")
    assert result["error"] is not None, "rank 0 finished a step without its peer"
    assert "topk_hook: the all-gather of bucket" in result["error"], result["error"]
    # From the step's start to the error: within the group's 30 s timeout (gloo sees
    # the closed connection at once; a hang would end only at the timeout).
    assert result["seconds"] < 30


def _aborting_worker(rank, world, port, when):
    """Rank 1 aborts before its last barrier, or after it (in the group's teardown)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    print(f"rank {rank} of {world} starts", file=sys.stderr, flush=True)
    if rank == 1 and when == "before":
        os.abort()
    if rank == 1:
        dist.destroy_process_group = lambda: os.abort()


def test_a_rank_killed_before_the_last_barrier_fails_with_its_stderr():
    with pytest.raises(AssertionError) as error:
        _spawn(_aborting_worker, 2, ("before",))
    message = str(error.value)
    assert "process 1 terminated with signal SIGABRT" in message
    assert "rank 1 of 2 starts" in message
    assert "rank 0's stderr" in message   # rank 0 may be killed before it prints
    # faulthandler's stack of the dying rank
    assert "Fatal Python error: Aborted" in message
    assert "in _aborting_worker" in message


def test_a_rank_killed_in_the_teardown_is_warned_of():
    with pytest.warns(UserWarning, match="(?s)died in the process group's teardown.*"
                                         "process 1 terminated with signal SIGABRT"):
        _spawn(_aborting_worker, 2, ("after",))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="start_iter"):
        TopKState(start_iter=1)
    TopKState(start_iter=0, error_feedback=False)
    with pytest.raises(ValueError, match="density"):
        TopKState(density=0.0)
    with pytest.raises(ValueError, match="topk"):
        TopKState(topk="fast")
    with pytest.raises(ValueError, match="momentum"):
        TopKState(momentum=1.0)
    with pytest.raises(ValueError, match="error_feedback"):
        TopKState(momentum_correction=True, error_feedback=False)
    with pytest.raises(ValueError, match="lacks"):
        TopKState().load_state_dict({"iter": 3})


# ------------------------------------------------------------------------------------
# the hook on hand-made buckets, in a one-rank group of this process


class _Bucket:
    """What topk_hook reads of a DDP GradBucket: a flat buffer and views into it."""

    def __init__(self, grads, index=0):
        self._buffer = torch.cat([g.reshape(-1) for g in grads])
        self._params = [nn.Parameter(torch.empty_like(g)) for g in grads]
        self._index = index

    def buffer(self):
        return self._buffer

    def gradients(self):
        views, offset = [], 0
        for p in self._params:
            views.append(self._buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def parameters(self):
        return self._params

    def index(self):
        return self._index

    def is_last(self):
        return True


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_low_precision_bucket_sends_fp32_values(one_rank_group):
    grads = [torch.randn(300, dtype=torch.bfloat16), torch.randn(7, 5, dtype=torch.bfloat16)]
    bucket = _Bucket(grads)
    raw = bucket.buffer().float()
    state = TopKState(density=0.1, start_iter=2)
    state.iter = 2
    out = topk_hook(state, bucket).wait()
    assert out is bucket.buffer() and out.dtype == torch.bfloat16
    sent = out != 0
    assert int(sent.sum()) == 30 + 4
    # What went out, rounded to bf16 only in the bucket; the fp32 residual is the rest.
    assert torch.equal(out[sent], raw[sent].to(torch.bfloat16))
    residual = state.residuals[0]
    assert residual.dtype == torch.float32
    assert torch.equal(residual[~sent], raw[~sent]) and not residual[sent].any()


def _packed(values, positions):
    """The all-gather's buffer: per rank, k values as int32 bits, then k positions."""
    return torch.stack([torch.stack([v.view(torch.int32), q.to(torch.int32)])
                        for v, q in zip(values, positions)]).reshape(-1)


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_pairs_add_in_rank_order(device):
    """Every rank adds the gathered pairs to the same bits: rank by rank, in rank order.
    At position 5 the ranks send 1e8, -1e8 and 1: in that order the sum is 1, while
    one that adds the 1 before either large value loses it (1 - 1e8 rounds to -1e8 in
    fp32) and gives 0. Zeros at position 0 are padding."""
    from incrkern.distributed.topk import _sum_gathered
    values = torch.tensor([[1e8, 2.0, 0.0, 0.0], [-1e8, 3.0, 4.0, 0.0], [1.0, 5.0, 0.0, 0.0]])
    positions = torch.tensor([[5, 1, 0, 0], [5, 1, 7, 0], [5, 9, 0, 0]])
    total = _sum_gathered(_packed(values, positions).to(device), 3, 4, 10).cpu()
    expected = torch.zeros(10)
    for v, q in zip(values, positions):
        for value, position in zip(v, q):
            expected[position] += value
    assert torch.equal(total, expected)
    assert total.tolist() == [0.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0, 4.0, 0.0, 5.0]

    # Eight ranks whose positions overlap, values over a wide range: the same bits as
    # the CPU's serial sum, call after call.
    gen = torch.Generator().manual_seed(0)
    world, k, numel = 8, 2000, 3000
    values = torch.randn(world, k, generator=gen) * torch.exp(8 * torch.rand(world, k,
                                                                              generator=gen))
    positions = torch.stack([torch.randperm(numel, generator=gen)[:k] for _ in range(world)])
    packed = _packed(values, positions)
    reference = _sum_gathered(packed, world, k, numel)
    for _ in range(5):
        assert torch.equal(_sum_gathered(packed.to(device), world, k, numel).cpu(), reference)


def test_short_approx_selection_is_padded(one_rank_group, monkeypatch):
    """An approximate selection that found fewer than k sends zeros at position 0 for
    the rest and clears the residual only where it really sent."""
    from incrkern.distributed import topk as module
    grads = [torch.arange(1.0, 101.0)]
    bucket = _Bucket(grads)
    monkeypatch.setattr(module.ops, "select",
                        lambda parts, ks, **kw: [torch.tensor([99, 98, 97])])
    state = TopKState(density=0.05, start_iter=2, topk="approx")
    state.iter = 2
    out = topk_hook(state, bucket).wait()
    assert out.nonzero().reshape(-1).tolist() == [97, 98, 99]
    assert out[97:].tolist() == [98.0, 99.0, 100.0]
    residual = state.residuals[0]
    assert residual[0] == 1.0 and residual[96] == 97.0 and not residual[97:].any()
    assert state.bytes_sent == 0   # one rank sends nothing
