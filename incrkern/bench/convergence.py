"""Convergence benchmark: scikit-learn's digits (1797 8x8 images, shipped with the
package, no download), a small MLP and a small CNN, dense torch AdamW against incrkern
AdamW at several densities, selection criteria and scopes.

Wall time is the training time of the row (forward, backward and step; evaluations
excluded); the time per step relative to dense torch is taken from the medians, which a
busy machine moves less than the sums.

Every row starts from the same initial weights and sees the same minibatches in the
same order (fixed seeds). A row runs `steps` calls of optimizer.step(), one per
minibatch. Two accuracies are reported on the held-out test split:
  final: after all `steps` minibatches (equal data);
  at equal updates: after steps/4 parameter updates, which is the end of the run for
    accumulate_steps=4 rows and a quarter of it for the others.
"""
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import incrkern
from . import common

LR = 3e-3
WEIGHT_DECAY = 0.01
BATCH = 64
SELECTS = ("grad", "grad_sq", "weight", "accumulated", "random")
EQUAL_UPDATES_DIVISOR = 4  # the largest accumulate_steps of any row


@dataclass
class Row:
    name: str
    kwargs: dict = field(default_factory=dict)
    torch_dense: bool = False
    main: bool = False  # drawn in the plot

    @property
    def accumulate_steps(self):
        return int(self.kwargs.get("accumulate_steps", 1))


@dataclass
class Plan:
    name: str
    models: tuple
    steps: int
    eval_every: int
    rows: list
    main_rows_only_after_first_model: bool = False

    def jobs(self):
        """(model, row) pairs: every row on the first model; on the others, every row,
        or only the main (plotted) rows when main_rows_only_after_first_model."""
        return [(m, r) for i, m in enumerate(self.models) for r in self.rows
                if i == 0 or r.main or not self.main_rows_only_after_first_model]


def _row(density, select, scope="tensor", main=False, **extra):
    kwargs = dict(density=density, select=select, scope=scope, **extra)
    label = f"d={density:g} {select} {scope}"
    for key, value in extra.items():
        label += f" {key}={value}"
    return Row(label, kwargs, main=main)


def _main_row(density, select, scope="tensor"):
    return (select == "grad" and scope == "tensor") or (density == 0.01 and scope == "tensor"
                                                        and select in ("random", "accumulated"))


def plan(mode):
    base = [Row("torch AdamW (dense)", torch_dense=True, main=True),
            Row("incrkern AdamW d=1", dict(), main=False)]
    if mode == "tiny":
        rows = base + [_row(0.1, "grad"), _row(0.1, "random", "global"),
                       _row(0.1, "grad", accumulate_steps=4)]
        return Plan("tiny", ("mlp",), steps=8, eval_every=2, rows=rows)
    if mode == "quick":
        densities = (0.1, 0.01, 0.001)
        rows = list(base)
        rows += [_row(d, s, main=_main_row(d, s)) for d in densities for s in SELECTS]
        rows += [_row(0.01, s, "global") for s in ("grad", "random")]
        rows += [_row(d, "grad", accumulate_steps=4) for d in (0.1, 0.01)]
        rows += [_row(0.01, "grad", bias_correction=b) for b in ("tensor", "element")]
        return Plan("quick", ("mlp", "cnn"), steps=300, eval_every=25, rows=rows,
                    main_rows_only_after_first_model=True)
    densities = (0.1, 0.01, 0.001)  # full: every row on both models
    rows = list(base)
    rows += [_row(d, s, sc, main=_main_row(d, s, sc))
             for d in densities for s in SELECTS for sc in ("tensor", "global")]
    rows += [_row(d, s, sc, accumulate_steps=4)
             for d in densities for s in SELECTS for sc in ("tensor", "global")]
    rows += [_row(d, "grad", bias_correction=b) for d in densities for b in ("tensor", "element")]
    return Plan("full", ("mlp", "cnn"), steps=1600, eval_every=50, rows=rows)


# ----------------------------------------------------------------------------------


def load_digits(device, seed=0):
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y)

    def tensors(xs, ys):
        return (torch.tensor(xs, dtype=torch.float32, device=device) / 16.0,
                torch.tensor(ys, dtype=torch.int64, device=device))

    return tensors(x_train, y_train), tensors(x_test, y_test)


def make_model(kind):
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                         nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def _accuracy(model, data):
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _batches(n, seed, device):
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n - BATCH + 1, BATCH):
            yield perm[i:i + BATCH]


def train_row(row, model_kind, plan_, train, test, device, seed=0):
    """Trains one row; returns its record (or, where it raised, one with the failure)."""
    fields = dict(model=model_kind, row=row.name, options=dict(row.kwargs),
                  torch_dense=row.torch_dense, main=row.main)
    torch.manual_seed(seed)
    model = make_model(model_kind).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    try:
        if row.torch_dense:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        else:
            opt = incrkern.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                       **row.kwargs)
    except Exception as exc:  # noqa: BLE001 - an unsupported combination is reported
        return common.unavailable(common.failure(exc), **fields)

    loss_fn = nn.CrossEntropyLoss()
    x_train, y_train = train
    batches = _batches(x_train.shape[0], seed, device)
    equal_updates = plan_.steps // EQUAL_UPDATES_DIVISOR
    curve = [dict(calls=0, updates=0, test_acc=_accuracy(model, test))]
    acc_equal = None
    step_times = []
    try:
        for call in range(1, plan_.steps + 1):
            idx = next(batches)
            common.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            common.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            updates = call // row.accumulate_steps
            if call % plan_.eval_every == 0 or call == plan_.steps:
                acc = _accuracy(model, test)
                curve.append(dict(calls=call, updates=updates, test_acc=acc,
                                  train_loss=float(loss.detach())))
                if updates == equal_updates and acc_equal is None:
                    acc_equal = acc
        if not all(math.isfinite(p.detach().sum().item()) for p in model.parameters()):
            raise FloatingPointError("parameters are no longer finite")
    except Exception as exc:  # noqa: BLE001
        return common.unavailable(common.failure(exc, " during training"), **fields)
    return dict(fields, available=True, n_params=n_params, steps=plan_.steps,
                final_test_acc=curve[-1]["test_acc"], equal_updates=equal_updates,
                acc_at_equal_updates=acc_equal, wall_s=sum(step_times),
                step_ms_median=1e3 * statistics.median(step_times),
                state_bytes=common.state_bytes(opt),
                state_bytes_per_param=common.state_bytes(opt) / n_params, curve=curve)


def run(mode, device, progress=None, threads=1):
    """Trains every row of the plan. On the CPU the rows run with `threads` torch threads
    (1 by default: the models are tiny, and with more threads a machine shared with
    other work stalls whole steps on a descheduled thread)."""
    device = torch.device(device)
    plan_ = plan(mode)
    saved_threads = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        records, sizes = _run_rows(plan_, device, progress)
    finally:
        torch.set_num_threads(saved_threads)
    dense = {r["model"]: r for r in records if r.get("torch_dense") and r["available"]}
    for r in records:
        ref = dense.get(r["model"])
        if r["available"] and ref:
            r["final_acc_minus_dense"] = r["final_test_acc"] - ref["final_test_acc"]
            r["step_time_vs_dense"] = r["step_ms_median"] / ref["step_ms_median"]
    return {"mode": plan_.name, "steps": plan_.steps, "batch": BATCH, "lr": LR,
            "weight_decay": WEIGHT_DECAY, "eval_every": plan_.eval_every,
            "equal_updates": plan_.steps // EQUAL_UPDATES_DIVISOR,
            "threads": threads if device.type == "cpu" and threads else saved_threads,
            **sizes, "records": records}


def _run_rows(plan_, device, progress):
    train, test = load_digits(device)
    sizes = dict(train_size=int(train[0].shape[0]), test_size=int(test[0].shape[0]))
    jobs = plan_.jobs()
    bar = progress(total=len(jobs), desc="convergence") if progress else None
    records = []
    for model_kind, row in jobs:
        if bar:
            bar.set_postfix_str(f"{model_kind} {row.name}")
        records.append(train_row(row, model_kind, plan_, train, test, device))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return records, sizes
