"""DDP with the top-k hook against plain DDP all-reduce: CPU ranks with gloo over
loopback, or one rank per GPU with NCCL (device "cuda", a machine with 2 GPUs or more).

For each world size one group of processes trains the same MLP on the same
synthetic task (labels from a fixed random teacher) with plain DDP and with the
hook at each density, in turn. Per configuration: the bytes each rank sends per
step as the hook counts them (the ring model), the loopback interface's transmitted
bytes over the same steps divided by the ranks (what gloo really moved, its headers
included; other loopback traffic on the machine adds to it; not measured with
NCCL, whose traffic goes over NVLink, PCIe or shared memory), the median step time
(the configurations taking turns), and the loss on a held-out set after the last
step.
"""
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD_SIZES = (2, 4)
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
DENSITIES = (0.1, 0.01, 0.001)
STEPS = {"quick": 40, "full": 200, "tiny": 6}
START_ITER = 2
WIDTH = {"quick": 512, "full": 1024, "tiny": 32}
BATCH = 32
HELD_OUT = 1024
LR = 0.5
INPUTS, CLASSES = 256, 10


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_tx_bytes():
    """Bytes transmitted on the loopback interface so far, or None where unknown."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, fields = line.partition(":")
                if name.strip() == "lo":
                    return int(fields.split()[8])
    except OSError:
        pass
    return None


def _model(width):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(INPUTS, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, CLASSES))


def _batch(rank, step, size=BATCH):
    """A batch of the synthetic task: Gaussian inputs, labels from a fixed random
    linear teacher; rank -1 is the held-out set."""
    teacher = torch.randn(INPUTS, CLASSES, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1000 * step + rank + 1)
    x = torch.randn(size, INPUTS, generator=g)
    return x, (x @ teacher).argmax(1)


def _setup(density, width, device):
    from incrkern.distributed import TopKState, topk_hook
    model = _model(width).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    state = None
    if density is not None:
        state = TopKState(density=density, start_iter=START_ITER)
        ddp.register_comm_hook(state, topk_hook)
    return ddp, state, torch.optim.SGD(model.parameters(), lr=LR)


def _step(ddp, opt, rank, step, device):
    x, y = (t.to(device) for t in _batch(rank, step))
    loss = F.cross_entropy(ddp(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def _traffic_and_loss(rank, world, density, steps, width, device):
    """One configuration alone: the bytes it sends (counted, and on the loopback
    interface with gloo) over the compressed steps, and the held-out loss after the
    last step."""
    from incrkern.distributed import allreduce_bytes
    ddp, state, opt = _setup(density, width, device)
    loopback = _loopback_tx_bytes if device.type == "cpu" else lambda: None
    counted, tx_start = 0, None
    for step in range(steps):
        if step == START_ITER:   # the compressed steps only
            dist.barrier()
            tx_start = loopback()
        _step(ddp, opt, rank, step, device)
        if step >= START_ITER and state is not None:
            counted += state.bytes_sent
    dist.barrier()
    tx_end = loopback()
    measured = steps - START_ITER
    numel = sum(p.numel() for p in ddp.module.parameters())
    if state is None:   # torch's own all-reduce, by the ring model the hook counts with
        counted = allreduce_bytes(numel, 4, world) * measured
    x, y = (t.to(device) for t in _batch(-1, 0, HELD_OUT))
    with torch.no_grad():
        loss = F.cross_entropy(ddp.module(x), y)
    return {"world": world, "density": density, "numel": numel, "steps": steps,
            "bytes_per_step": counted / measured,
            "loopback_bytes_per_step": None if tx_start is None or tx_end is None
            else (tx_end - tx_start) / world / measured,
            "loss": float(loss)}


def _step_times(rank, world, densities, steps, width, device):
    """Median step time of each configuration, the configurations taking turns step by
    step, so that the machine's other work weighs on all alike."""
    runs = [_setup(density, width, device) for density in densities]
    times = [[] for _ in runs]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for step in range(steps):
        for (ddp, _, opt), samples in zip(runs, times):
            sync()
            t0 = time.perf_counter()
            _step(ddp, opt, rank, step, device)
            sync()
            if step >= START_ITER:
                samples.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(samples) for samples in times]


def _worker(rank, world, port, out, mode, device_type):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank if device_type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type], rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    warnings.simplefilter("ignore", FutureWarning)
    configs = (None,) + DENSITIES
    rows = [_traffic_and_loss(rank, world, density, STEPS[mode], WIDTH[mode], device)
            for density in configs]
    for row, ms in zip(rows, _step_times(rank, world, configs, STEPS[mode], WIDTH[mode],
                                         device)):
        row["step_ms"] = ms   # rank 0's
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()   # no rank leaves while a peer still talks to it
    dist.destroy_process_group()
    # The rank's work is done and saved. A gloo rank's interpreter teardown aborts now
    # and then ("terminate called without an active exception", on the main thread
    # with no Python frame left: a thread of torch's still joinable at exit), which
    # failed the whole run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def world_sizes(device_type):
    """The world sizes run on this machine: WORLD_SIZES on the CPU; on CUDA those with
    a GPU for every rank."""
    if device_type == "cpu":
        return WORLD_SIZES
    count = torch.cuda.device_count()
    worlds = tuple(w for w in WORLD_SIZES if w <= count)
    if not worlds:
        raise SystemExit(f"incrkern.bench distributed: --device cuda runs a rank per GPU "
                         f"over NCCL and needs {min(WORLD_SIZES)} GPUs or more; this "
                         f"machine has {count} (--device cpu runs gloo ranks)")
    return worlds


def run(mode="quick", progress=None, device_type="cpu"):
    """Rows of the table, one per (world size, density or None for plain DDP)."""
    rows = []
    worlds = world_sizes(device_type)
    bar = progress(total=len(worlds), desc="distributed") if progress else None
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = os.path.join(tmp, f"world{world}.pt")
            mp.start_processes(_worker, args=(world, _free_port(), out, mode, device_type),
                               nprocs=world, start_method="spawn")
            rows += torch.load(out)
            if bar:
                bar.update()
    if bar:
        bar.close()
    for row in rows:
        world = row["world"]
        plain = next(r for r in rows if r["world"] == world and r["density"] is None)
        row["bytes_vs_allreduce"] = row["bytes_per_step"] / plain["bytes_per_step"]
        row["step_vs_allreduce"] = row["step_ms"] / plain["step_ms"]
        if row["loopback_bytes_per_step"] is not None:
            row["loopback_vs_counted"] = row["loopback_bytes_per_step"] / row["bytes_per_step"]
    return rows


def markdown(rows):
    lines = ["| ranks | gradient exchange | bytes sent per rank per step (counted) | "
             "vs all-reduce | loopback bytes / counted | step (ms) | vs all-reduce | "
             "held-out loss after the last step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        what = "plain DDP all-reduce" if r["density"] is None else \
            f"top-k, density {r['density']:g}"
        lo = r.get("loopback_vs_counted")
        lines.append(f"| {r['world']} | {what} | {r['bytes_per_step'] / 1e3:,.1f} KB | "
                     f"{r['bytes_vs_allreduce']:.3f} | "
                     f"{'n/a' if lo is None else f'{lo:.2f}'} | {r['step_ms']:.2f} | "
                     f"{r['step_vs_allreduce']:.2f}x | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"
