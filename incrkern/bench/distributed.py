"""DDP with the top-k hook against plain DDP all-reduce: CPU, gloo over loopback.

For each world size one group of processes trains the same MLP on the same
synthetic task (labels from a fixed random teacher) with plain DDP and with the
hook at each density, in turn. Per configuration: the bytes each rank sends per
step as the hook counts them (the ring model), the loopback interface's transmitted
bytes over the same steps divided by the ranks (what gloo really moved, its headers
included; other loopback traffic on the machine adds to it), the median step time,
and the loss after the last step.
"""
import os
import socket
import statistics
import tempfile
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD_SIZES = (2, 4)
DENSITIES = (0.1, 0.01, 0.001)
STEPS = {"quick": 40, "full": 200, "tiny": 6}
START_ITER = 2
WIDTH = {"quick": 512, "full": 1024, "tiny": 32}
BATCH = 32
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


def _batch(rank, step):
    teacher = torch.randn(INPUTS, CLASSES, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, INPUTS, generator=g)
    return x, (x @ teacher).argmax(1)


def _train_one(rank, world, density, steps, width):
    from incrkern.distributed import TopKState, topk_hook
    model = _model(width)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = None
    if density is not None:
        state = TopKState(density=density, start_iter=START_ITER)
        ddp.register_comm_hook(state, topk_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    times, counted, loss = [], 0, None
    tx_start = None
    for step in range(steps):
        if step == START_ITER:   # measure the compressed steps only
            dist.barrier()
            tx_start = _loopback_tx_bytes()
        t0 = time.perf_counter()
        x, y = _batch(rank, step)
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= START_ITER:
            times.append(time.perf_counter() - t0)
            if state is not None:
                counted += state.bytes_sent
    dist.barrier()
    tx_end = _loopback_tx_bytes()
    measured_steps = steps - START_ITER
    numel = sum(p.numel() for p in model.parameters())
    if state is None:
        # torch's own all-reduce: the ring model of it, as the hook counts its warm-up.
        from incrkern.distributed import allreduce_bytes
        counted = allreduce_bytes(numel, 4, world) * measured_steps
    loss_total = loss.detach().clone()
    dist.all_reduce(loss_total)
    return {"world": world, "density": density, "numel": numel, "steps": steps,
            "bytes_per_step": counted / measured_steps,
            "loopback_bytes_per_step": None if tx_start is None or tx_end is None
            else (tx_end - tx_start) / world / measured_steps,
            "step_ms": 1e3 * statistics.median(times),
            "loss": float(loss_total) / world}


def _worker(rank, world, port, out, mode):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    warnings.simplefilter("ignore", FutureWarning)
    rows = [_train_one(rank, world, density, STEPS[mode], WIDTH[mode])
            for density in (None,) + DENSITIES]
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()   # no rank leaves while a peer still talks to it
    dist.destroy_process_group()


def run(mode="quick", progress=None):
    """Rows of the table, one per (world size, density or None for plain DDP)."""
    rows = []
    bar = progress(total=len(WORLD_SIZES), desc="distributed") if progress else None
    with tempfile.TemporaryDirectory() as tmp:
        for world in WORLD_SIZES:
            out = os.path.join(tmp, f"world{world}.pt")
            mp.start_processes(_worker, args=(world, _free_port(), out, mode), nprocs=world,
                               start_method="spawn")
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
             "loss after the last step |",
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
