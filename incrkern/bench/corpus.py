"""Training from scratch on a real corpus: a byte-level transformer language model
(gradients.CharTransformer) on the Python sources of the installed standard library
(and, in the medium and full modes, of the installed site-packages too), dense torch AdamW
against incrkern AdamW at densities 0.1, 0.01 and 0.001, selecting by the
accumulated gradient (error feedback), by |grad| and at random.

Split by package, no overlap: the held-out text is the whole of a few standard-library
packages (HELD_OUT_PACKAGES), and the training text skips every folder of those names
anywhere below its roots; it also skips `encodings` and `pydoc_data`, which are
generated tables and documentation strings rather than code.

Every row starts from the same initial weights (seeded) and sees the same batches in
the same order. Loss: the mean cross-entropy of the next byte in bits per byte, on
fixed held-out windows (the same for every row), evaluated every `eval_every` steps.
Wall time is the row's training time (forward, backward and optimizer step; batches
and evaluations excluded). The rows take turns, each training up to the next
evaluation point before the next row does, so that a change in the load of a shared
machine during the run slows every row alike.

Equal steps: the held-out loss after `steps` steps. Equal wall time: the dense row's
training time over `steps` steps is the budget; every row runs `steps` steps, and a
row that has used less time by then keeps training, up to EXTRA_STEPS_FACTOR * steps,
until it reaches the budget; each curve is interpolated linearly at the budget
(a row that ran out of steps first is reported at its last point, and marked).

Learning rate: dense AdamW takes LR; a sparse row takes LR * density ** -0.5
(lr_scale): an element is updated in only some of the steps, so each of its updates
must move it further. The rule was chosen by a sweep of the quick model over 300
steps (multipliers 10 ** (k/2) around it, |grad| and the accumulated gradient at
every density); dense AdamW keeps the usual LR.
"""
import math
import statistics
import sysconfig
import time
from dataclasses import dataclass

import torch

import incrkern
from . import common
from .gradients import CharTransformer, _batch, python_source_bytes

LR = 3e-3
WEIGHT_DECAY = 0.01
DENSITIES = (0.1, 0.01, 0.001)
SELECTS = ("accumulated", "grad", "random")
HELD_OUT_PACKAGES = ("email", "json", "logging", "http", "urllib")
GENERATED_PACKAGES = ("encodings", "pydoc_data")
EXTRA_STEPS_FACTOR = 2
PAR_BITS = 0.02  # held-out losses this close to dense's are called on par

SIZES = {
    "tiny": dict(text_bytes=300_000, held_out=("json",), held_out_bytes=40_000,
                 site_packages=False, width=32, layers=1, heads=2, context=32, batch=8,
                 steps=8, eval_every=2, eval_windows=16),
    "quick": dict(text_bytes=3_000_000, held_out=HELD_OUT_PACKAGES,
                  held_out_bytes=1_000_000, site_packages=False, width=96, layers=2,
                  heads=4, context=64, batch=16, steps=300, eval_every=20,
                  eval_windows=96),
    # tens of MB of text and the full run's steps, with the quick run's small model
    "medium": dict(text_bytes=20_000_000, held_out=HELD_OUT_PACKAGES,
                   held_out_bytes=1_000_000, site_packages=True, width=128, layers=2,
                   heads=4, context=64, batch=16, steps=3000, eval_every=100,
                   eval_windows=256),
    "full": dict(text_bytes=40_000_000, held_out=HELD_OUT_PACKAGES,
                 held_out_bytes=1_000_000, site_packages=True, width=256, layers=4,
                 heads=8, context=128, batch=32, steps=3000, eval_every=100,
                 eval_windows=512),
}


def lr_scale(density):
    return 1.0 if density is None else density ** -0.5


@dataclass
class Row:
    name: str
    density: float = None  # None: dense torch AdamW
    select: str = ""

    @property
    def dense(self):
        return self.density is None

    @property
    def lr(self):
        return LR * lr_scale(self.density)


def rows():
    return [Row("torch AdamW (dense)")] + [
        Row(f"d={d:g} {s}", d, s) for d in DENSITIES for s in SELECTS]


# ----------------------------------------------------------------------------------
# the text


def corpus(size):
    """(train, held_out) uint8 tensors, split by package (see the module's doc)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    roots = [stdlib] + ([sysconfig.get_paths()["purelib"]] if size["site_packages"] else [])
    train = python_source_bytes(size["text_bytes"], roots,
                                skip=tuple(size["held_out"]) + GENERATED_PACKAGES)
    held_out = python_source_bytes(size["held_out_bytes"],
                                   [f"{stdlib}/{package}" for package in size["held_out"]])
    for name, text in (("training", train), ("held-out", held_out)):
        if len(text) < 4 * (size["context"] + 1):
            raise RuntimeError(f"only {len(text)} bytes of {name} Python sources found")
    return train, held_out


def heldout_windows(text, context, count):
    """`count` windows of context + 1 bytes, evenly spaced over the held-out text."""
    starts = torch.linspace(0, len(text) - context - 1, count).long().tolist()
    return torch.stack([text[s:s + context + 1] for s in starts]).long()


def batches(text, batch, context, seed):
    """The training batches: random windows, the same stream for every row."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield _batch(text, batch, context, gen)


def bits_per_byte(model, tokens, targets):
    return float(torch.nn.functional.cross_entropy(
        model(tokens).reshape(-1, 256), targets.reshape(-1))) / math.log(2)


def evaluate(model, windows, chunk):
    """Mean held-out cross-entropy in bits per byte over every window and position."""
    with torch.no_grad():
        total = 0.0
        for i in range(0, windows.shape[0], chunk):
            part = windows[i:i + chunk]
            total += bits_per_byte(model, part[:, :-1], part[:, 1:]) * part.shape[0]
    return total / windows.shape[0]


# ----------------------------------------------------------------------------------
# training


def _interpolate(curve, at_s):
    """The held-out loss of `curve` at training time `at_s` (linear between its
    points), and whether the curve reached that time."""
    for before, after in zip(curve, curve[1:]):
        if after["train_s"] >= at_s:
            span = after["train_s"] - before["train_s"]
            t = (at_s - before["train_s"]) / span if span > 0 else 1.0
            return before["heldout_bpb"] + t * (after["heldout_bpb"] - before["heldout_bpb"]), True
    return curve[-1]["heldout_bpb"], False


class RowRun:
    """One row's model, optimizer, batch stream and held-out curve, trained a few
    steps at a time (run() takes turns between the rows)."""

    def __init__(self, row, size, train, windows, device, seed=0):
        self.row, self.size, self.windows, self.device = row, size, windows, device
        self.fields = dict(row=row.name, density=row.density, select=row.select, lr=row.lr,
                           torch_dense=row.dense)
        self.failure, self.step, self.step_times, self.opt_times = None, 0, [], []
        torch.manual_seed(seed)
        self.model = CharTransformer(width=size["width"], layers=size["layers"],
                                     heads=size["heads"], context=size["context"]).to(device)
        try:
            if row.dense:
                self.opt = torch.optim.AdamW(self.model.parameters(), lr=row.lr,
                                             weight_decay=WEIGHT_DECAY)
            else:
                self.opt = incrkern.optim.AdamW(self.model.parameters(), lr=row.lr,
                                                weight_decay=WEIGHT_DECAY,
                                                density=row.density, select=row.select)
        except Exception as exc:  # noqa: BLE001 - an unsupported combination is reported
            self.failure = common.failure(exc)
        self.stream = batches(train, size["batch"], size["context"], seed)
        self.curve = [dict(step=0, train_s=0.0, heldout_bpb=self._evaluate())]

    @property
    def live(self):
        return self.failure is None

    @property
    def train_s(self):
        return sum(self.step_times)

    def _evaluate(self):
        return evaluate(self.model, self.windows, self.size["batch"])

    def advance(self, to_step, budget_s=None):
        """Trains up to step `to_step` (and, given `budget_s`, no further once the
        training time has reached it), then evaluates on the held-out windows."""
        loss = None
        try:
            while self.step < to_step and (budget_s is None or self.train_s < budget_s):
                x, y = (t.to(self.device) for t in next(self.stream))
                common.synchronize(self.device)
                t0 = time.perf_counter()
                self.opt.zero_grad(set_to_none=False)
                loss = torch.nn.functional.cross_entropy(self.model(x).reshape(-1, 256),
                                                         y.reshape(-1))
                loss.backward()
                common.synchronize(self.device)
                t1 = time.perf_counter()
                self.opt.step()
                common.synchronize(self.device)
                t2 = time.perf_counter()
                self.step_times.append(t2 - t0)
                self.opt_times.append(t2 - t1)
                self.step += 1
            if loss is None:
                return
            self.curve.append(dict(step=self.step, train_s=self.train_s,
                                   train_bpb=float(loss.detach()) / math.log(2),
                                   heldout_bpb=self._evaluate()))
        except Exception as exc:  # noqa: BLE001
            self.failure = common.failure(exc, " during training")

    def record(self, budget_s):
        if self.live and not all(math.isfinite(p.detach().sum().item())
                                 for p in self.model.parameters()):
            self.failure = "failed during training: parameters are no longer finite"
        if not self.live:
            return common.unavailable(self.failure, **self.fields)
        steps = self.size["steps"]
        at_steps = next(c for c in self.curve if c["step"] == steps)
        n_params = sum(p.numel() for p in self.model.parameters())
        record = dict(self.fields, available=True, n_params=n_params, steps=steps,
                      steps_run=self.step, heldout_bpb=at_steps["heldout_bpb"],
                      wall_s=at_steps["train_s"], total_wall_s=self.train_s,
                      step_ms_median=1e3 * statistics.median(self.step_times),
                      opt_step_ms_median=1e3 * statistics.median(self.opt_times),
                      state_bytes=common.state_bytes(self.opt),
                      state_bytes_per_param=common.state_bytes(self.opt) / n_params,
                      curve=self.curve)
        if budget_s is not None:
            record["heldout_bpb_at_budget"], record["reached_budget"] = \
                _interpolate(self.curve, budget_s)
        return record


def run(mode, device, progress=None):
    """Trains every row, taking turns: each row trains up to the next evaluation
    point, then the next row, so that a machine whose load changes during the run
    slows every row alike. Then the rows faster than dense train on to its time."""
    device = torch.device(device)
    size = SIZES[mode]
    train, held_out = corpus(size)
    windows = heldout_windows(held_out, size["context"], size["eval_windows"]).to(device)
    steps, every = size["steps"], size["eval_every"]
    runs = [RowRun(row, size, train, windows, device) for row in rows()]
    targets = list(range(every, steps, every)) + [steps]
    bar = progress(total=len(targets), desc="corpus") if progress else None
    for target in targets:
        for r in runs:
            if r.live:
                r.advance(target)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    budget_s = runs[0].train_s if runs[0].live else None
    target = steps
    while budget_s is not None:
        target = min(target + every, EXTRA_STEPS_FACTOR * steps)
        behind = [r for r in runs[1:] if r.live and r.train_s < budget_s and r.step < target]
        if not behind:
            break
        for r in behind:
            r.advance(target, budget_s)
    records = [r.record(budget_s) for r in runs]
    dense = records[0] if records[0]["available"] else None
    for r in records:
        if r["available"] and dense:
            r["vs_dense"] = r["heldout_bpb"] - dense["heldout_bpb"]
            r["vs_dense_at_budget"] = r["heldout_bpb_at_budget"] - dense["heldout_bpb"]
            r["step_time_vs_dense"] = r["step_ms_median"] / dense["step_ms_median"]
    results = dict(mode=mode, **{k: v for k, v in size.items() if k != "held_out"},
                   held_out_packages=list(size["held_out"]), train_bytes=len(train),
                   held_out_text_bytes=len(held_out), lr=LR, weight_decay=WEIGHT_DECAY,
                   lr_rule="dense: lr; sparse: lr * density ** -0.5",
                   budget_s=budget_s, threads=torch.get_num_threads(), records=records)
    results["summary"] = summary(results)
    return results


# ----------------------------------------------------------------------------------
# the verdict


def _verdict(records, key, what):
    rows = [r for r in records if r["available"] and not r["torch_dense"] and key in r]
    if not rows:
        return f"{what}: no sparse row finished."
    better = [r["row"] for r in rows if r[key] < -PAR_BITS]
    par = [r["row"] for r in rows if abs(r[key]) <= PAR_BITS]
    best = min(rows, key=lambda r: r[key])
    parts = [f"{what}: sparse updates help in {len(better)} of {len(rows)} rows"
             + (f" ({', '.join(better)})" if better else ""),
             f"are on par (within {PAR_BITS} bits/byte) in {len(par)}"
             + (f" ({', '.join(par)})" if par else ""),
             f"hurt in {len(rows) - len(better) - len(par)}; the best sparse row is "
             f"{best['row']} at {best[key]:+.3f} bits/byte against dense"]
    return "; ".join(parts) + "."


def summary(results):
    """Plain sentences: where sparse updates help or hurt against dense AdamW."""
    records = results["records"]
    dense = records[0]
    if not dense["available"]:
        return [f"dense AdamW failed ({dense['reason']}): nothing to compare against."]
    lines = [_verdict(records, "vs_dense", f"At equal steps ({results['steps']})"),
             _verdict(records, "vs_dense_at_budget",
                      f"At equal wall time (dense's {results['budget_s']:.3g} s of training)")]
    for density in DENSITIES:
        mine = [r for r in records if r["available"] and r["density"] == density]
        if mine:
            best = min(mine, key=lambda r: r["heldout_bpb"])
            lines.append(f"At density {density:g} the best selection is {best['select']} "
                         f"({best['heldout_bpb']:.3f} bits/byte after {results['steps']} "
                         f"steps, dense {dense['heldout_bpb']:.3f}); its median step takes "
                         f"{best['step_time_vs_dense']:.2f}x dense's.")
    sparse = [r for r in records if r["available"] and not r["torch_dense"]]
    if sparse:
        ratios = [r["step_time_vs_dense"] for r in sparse]
        lines.append(f"A sparse row's median step takes {min(ratios):.2f}x to {max(ratios):.2f}x "
                     f"dense's; opt.step() is {dense['opt_step_ms_median']:.1f} ms of dense's "
                     f"{dense['step_ms_median']:.1f} ms (the rest: forward and backward), and "
                     f"{min(r['opt_step_ms_median'] for r in sparse):.1f} to "
                     f"{max(r['opt_step_ms_median'] for r in sparse):.1f} ms in the sparse rows.")
    short = [r["row"] for r in records if r["available"] and not r.get("reached_budget", True)]
    if short:
        lines.append(f"Ran out of steps ({EXTRA_STEPS_FACTOR}x) before dense's training time, "
                     f"reported at their last point: {', '.join(short)}.")
    return lines
