"""Tables (stdout and markdown), the JSON file and the plots of a benchmark run."""
import json
import math
import os

from .shapes import SELECT_BYTES, STEP_BYTES
from .sparse import sizes_line

NA = "n/a"
NOISY = 3.0  # a row whose slowest sample took this many times its fastest is flagged


def _ms(x):
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return NA
    ms = x * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _x(x):
    return NA if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _num(x, fmt="{:.3g}"):
    return NA if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _pct(x):
    return NA if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def _size(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _note(rec):
    if not rec.get("available", False):
        return rec.get("reason", "")
    parts = []
    lo, hi = rec.get("min_s"), rec.get("max_s")
    if lo and hi and hi > NOISY * lo:
        parts.append(f"noisy (max {hi / lo:.0f}x min)")
    if rec.get("speedup_vs"):
        parts.append(" ".join(f"{_x(v)} vs {k.replace('torch ', '')}"
                              for k, v in rec["speedup_vs"].items()))
    if "recall" in rec:
        parts.append(f"recall {rec['recall']:.3f}, returned {rec['returned_k']}")
    return "; ".join(parts)


# Columns that several tables share.
REASON_COLUMN = ("note", lambda r: "" if r["available"] else r["reason"])
STEP_TIME_VS_DENSE_COLUMN = ("step time vs dense", lambda r: _x(r.get("step_time_vs_dense")))
STATE_PER_PARAM_COLUMN = ("state B/param",
                          lambda r: _num(r.get("state_bytes_per_param"), "{:.2f}"))

TIMING_COLUMNS = [
    ("impl", lambda r: r["impl"]),
    ("median ms", lambda r: _ms(r.get("median_s"))),
    ("min ms", lambda r: _ms(r.get("min_s"))),
    ("max ms", lambda r: _ms(r.get("max_s"))),
    ("speedup vs ref", lambda r: _x(r.get("speedup_vs_ref"))),
    ("GB/s", lambda r: _num(r.get("gb_per_s"))),
    ("of copy BW", lambda r: _pct(r.get("frac_copy_bw"))),
    ("note", _note),
]

KERNEL_TABLES = [
    ("dense_step", "Dense optimizer step (reference: torch fused; incrkern optim = "
     "optimizer.step(), incrkern ops = the update op alone)",
     [("optimizer", lambda r: r["optimizer"]),
      ("shapes", lambda r: f"{r['shapes']} ({_size(r['numel'])}, {r['n_tensors']} tensors)"
       + ("" if r.get("dtype", "float32") == "float32" else f", {r['dtype']}"))]),
    ("topk", "Top-k of one fp32 score tensor, scores = |x| computed beforehand for every "
     "implementation (reference: torch.topk(scores, k, sorted=False))",
     [("n", lambda r: _size(r["n"])), ("k", lambda r: f"{r['density']:g}")]),
    ("select", "Selection by |grad| over the transformer parameter list",
     [("scope", lambda r: r["scope"]), ("k", lambda r: f"{r['density']:g} ({_size(r['k'])})")]),
    ("sparse_step", "AdamW step at a density, selection included (reference: dense torch "
     "AdamW fused)",
     [("shapes", lambda r: f"{r['shapes']} ({_size(r['numel'])}, {r['n_tensors']} tensors)"),
      ("density", lambda r: "dense" if r["density"] is None else f"{r['density']:g}")]),
    ("accumulate", "Gradient accumulation, acc += a*g (and sq += a*g*g)",
     [("shapes", lambda r: f"{r['shapes']} ({_size(r['numel'])}, {r['n_tensors']} tensors)"),
      ("sq", lambda r: "yes" if r["sq"] else "no")]),
]

STATE_COLUMNS = [
    ("mode", lambda r: r["mode"]),
    ("state bytes", lambda r: _num(r.get("state_bytes"), "{:,}")),
    ("bytes / param", lambda r: _num(r.get("bytes_per_param"), "{:.2f}")),
    REASON_COLUMN,
]

def _sparse_row(r):
    if r["select"] is None:
        return "dense"
    return f"{r['select']} {r['density']:g}" + (" global" if r.get("scope") == "global" else "")


SPARSE_COLUMNS = [
    ("case", lambda r: r["case"]),
    ("step", _sparse_row),
    ("topk", lambda r: r.get("topk") or ""),
    ("median ms", lambda r: _ms(r.get("median_s"))),
    ("min ms", lambda r: _ms(r.get("min_s"))),
    ("speedup vs torch fused", lambda r: _x(r.get("speedup_vs_ref"))),
    ("min vs min", lambda r: _x(r.get("speedup_of_min"))),
    ("lines touched", lambda r: _pct(r.get("lines_fraction"))),
    ("bound MB", lambda r: _num(r["bound_bytes"] / 1e6 if "bound_bytes" in r else None)),
    ("bound ms", lambda r: _ms(r.get("bound_s"))),
    ("of bound", lambda r: _pct(r.get("frac_of_bound"))),
    ("note", lambda r: _note(r) if not r.get("available") else "; ".join(
        [f"noisy (max {r['max_s'] / r['min_s']:.0f}x min)"] if r["max_s"] > NOISY * r["min_s"]
        else [])),
]

SPARSE_CASE_COLUMNS = [
    ("case", lambda r: r["name"]),
    ("gradients", lambda r: r.get("model") or r["source"]),
    ("tensors", lambda r: _num(r.get("n_tensors"), "{}")),
    ("copies", lambda r: _num(r.get("copies"), "{}")),
    ("elements", lambda r: _size(r["numel"]) if "numel" in r else NA),
    ("dtype", lambda r: r.get("dtype", "float32")),
    ("working set MB", lambda r: _num(r["working_set_bytes"] / 1e6
                                      if "working_set_bytes" in r else None, "{:.0f}")),
    ("exact zeros in g", lambda r: _pct(r.get("zero_fraction"))),
    REASON_COLUMN,
]

CONVERGENCE_COLUMNS = [
    ("model", lambda r: r["model"]),
    ("row", lambda r: r["row"]),
    ("final test acc", lambda r: _num(r.get("final_test_acc"), "{:.3f}")),
    ("vs dense", lambda r: _num(r.get("final_acc_minus_dense"), "{:+.3f}")),
    ("acc at equal updates", lambda r: _num(r.get("acc_at_equal_updates"), "{:.3f}")),
    ("wall s", lambda r: _num(r.get("wall_s"), "{:.2f}")),
    ("median step ms", lambda r: _num(r.get("step_ms_median"), "{:.2f}")),
    STEP_TIME_VS_DENSE_COLUMN,
    STATE_PER_PARAM_COLUMN,
    REASON_COLUMN,
]


FINETUNE_COLUMNS = [
    ("row", lambda r: r["row"]),
    ("top-1", lambda r: _num(r.get("top1"), "{:.3f}")),
    ("MRR", lambda r: _num(r.get("mrr"), "{:.3f}")),
    ("trained params", lambda r: _size(r["trainable"]) if r.get("trainable") else ""),
    ("optimizer state", lambda r: _num(r.get("state_bytes"), "{:,}")),
    ("state vs dense", lambda r: _num(r.get("state_vs_dense"), "{:.4f}")),
    ("peak memory MB", lambda r: _num(None if r.get("peak_bytes") is None
                                      else r["peak_bytes"] / 2 ** 20, "{:.1f}")),
    ("median step ms", lambda r: _num(r.get("step_ms_median"), "{:.1f}")),
    ("stored MB", lambda r: _num(None if r.get("stored_bytes") is None
                                 else r["stored_bytes"] / 2 ** 20, "{:.3f}")),
    REASON_COLUMN,
]

CORPUS_COLUMNS = [
    ("row", lambda r: r["row"]),
    ("lr", lambda r: _num(r.get("lr"), "{:.3g}")),
    ("held-out bits/byte at equal steps", lambda r: _num(r.get("heldout_bpb"), "{:.3f}")),
    ("vs dense (steps)", lambda r: _num(r.get("vs_dense"), "{:+.3f}")),
    ("at dense's time", lambda r: _num(r.get("heldout_bpb_at_budget"), "{:.3f}")
     + ("" if r.get("reached_budget", True) else " (ran out of steps)")),
    ("vs dense (time)", lambda r: _num(r.get("vs_dense_at_budget"), "{:+.3f}")),
    ("steps run", lambda r: _num(r.get("steps_run"), "{}")),
    ("train s", lambda r: _num(r.get("wall_s"), "{:.1f}")),
    ("median step ms", lambda r: _num(r.get("step_ms_median"), "{:.1f}")),
    STEP_TIME_VS_DENSE_COLUMN,
    ("median opt.step ms", lambda r: _num(r.get("opt_step_ms_median"), "{:.2f}")),
    STATE_PER_PARAM_COLUMN,
    REASON_COLUMN,
]


def _cells(records, columns):
    return [h for h, _ in columns], [[str(fn(r)) for _, fn in columns] for r in records]


def text_table(records, columns):
    header, rows = _cells(records, columns)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(records, columns):
    header, rows = _cells(records, columns)
    esc = lambda c: c.replace("|", "\\|")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _case(r):
    bench = r["bench"]
    if bench == "dense_step":
        dtype = r.get("dtype", "float32")
        return (f"dense {r['optimizer']} step, {r['shapes']} ({_size(r['numel'])})"
                + ("" if dtype == "float32" else f", {dtype}"))
    if bench == "topk":
        return f"top-k of {_size(r['n'])}, k = {r['density']:g}"
    if bench == "select":
        return f"select |grad|, {r['scope']} scope, k = {r['density']:g}"
    if bench == "sparse_step":
        return f"AdamW step at density {r['density']:g}, {r['shapes']} ({_size(r['numel'])})"
    if bench == "accumulate":
        return f"accumulate{' + square' if r['sq'] else ''}, {r['shapes']} ({_size(r['numel'])})"
    return bench


SUMMARY_COLUMNS = [
    ("case", _case),
    ("incrkern", lambda r: r["impl"]),
    ("against", lambda r: r["reference"]),
    ("speedup", lambda r: _x(r.get("speedup_vs_ref"))),
    ("of copy BW", lambda r: _pct(r.get("frac_copy_bw"))),
    ("note", lambda r: "; ".join(
        ([f"noisy (max {r['max_s'] / r['min_s']:.0f}x min)"]
         if r["max_s"] > NOISY * r["min_s"] else []) +
        ([f"noisy reference (max {r['reference_spread']:.0f}x min)"]
         if r.get("reference_spread", 0) > NOISY else []))),
]


def summary_records(records):
    """The incrkern rows of every timed case (the optimizer where there is one, else
    the op), for a short table: each against its case's torch reference."""
    out = []
    for r in records:
        if r["bench"] == "state_bytes" or not r.get("available"):
            continue
        if not r["impl"].startswith("incrkern") or r["impl"] == "incrkern ops" and any(
                o.get("available") and o["impl"] == "incrkern optim" and o["bench"] == r["bench"]
                and o["optimizer"] == r["optimizer"] and o["shapes"] == r["shapes"]
                and o.get("dtype") == r.get("dtype")
                for o in records if o["bench"] == "dense_step"):
            continue
        out.append(r)
    return out


def sections(results):
    """(title, records, columns) of every table of a run, in order."""
    out = []
    kernels = results.get("kernels")
    if kernels:
        recs = kernels["records"]
        rows = summary_records(recs)
        if rows:
            out.append(("Summary: incrkern against torch, measured in the same run "
                        "(speedup above 1: incrkern is faster)", rows, SUMMARY_COLUMNS))
        for bench, title, lead in KERNEL_TABLES:
            rows = [r for r in recs if r["bench"] == bench]
            if rows:
                out.append((title, rows, lead + TIMING_COLUMNS))
        rows = [r for r in recs if r["bench"] == "state_bytes"]
        if rows:
            n = rows[0]["numel"]
            out.append((f"Optimizer state bytes per parameter (AdamW, transformer of "
                        f"{_size(n)} params, after two updates)", rows, STATE_COLUMNS))
    sp = results.get("sparse")
    if sp:
        out.append((f"Sparse-step cases: {sizes_line(sp)}", sp["cases"], SPARSE_CASE_COLUMNS))
        bw = sp["copy_bandwidth"]["roofline_bytes_per_s"]
        out.append((f"incrkern.optim.AdamW(density, select, topk).step() against "
                    f"torch.optim.AdamW(fused=True).step(), same params and grads (speedup "
                    f"above 1: incrkern is faster); bound = score read + "
                    f"{sp['lines_per_touched_line']} transfers per touched "
                    f"{sp['line_bytes']}-byte line, at the copy bandwidth {bw / 1e9:.1f} GB/s",
                    sp["records"], SPARSE_COLUMNS))
    conv = results.get("convergence")
    if conv:
        out.append((f"Convergence on digits ({conv['train_size']} train / {conv['test_size']} "
                    f"test, batch {conv['batch']}, {conv['steps']} steps, AdamW lr {conv['lr']}, "
                    f"{conv['threads']} torch thread(s); equal updates = "
                    f"{conv['equal_updates']})", conv["records"],
                    CONVERGENCE_COLUMNS))
    tune = results.get("finetune")
    if tune:
        out.append((f"Sparse fine-tuning: {tune['records'][0].get('model', 'encoder')}, "
                    f"docstring line -> function retrieval ({tune['train_size']} train pairs "
                    f"from {', '.join(tune['train_packages'])}; {tune['test_size']} test from "
                    f"{', '.join(tune['test_packages'])}), batch {tune['batch']}, "
                    f"{tune['steps']} steps, {tune['threads']} torch thread(s), "
                    f"{'each row in its own process' if tune['isolated'] else 'one process'}",
                    tune["records"], FINETUNE_COLUMNS))
    corpus = results.get("corpus")
    if corpus:
        out.append((f"Byte-level LM from scratch on Python sources ({corpus['train_bytes']:,} "
                    f"training bytes; held out: the packages "
                    f"{', '.join(corpus['held_out_packages'])}, "
                    f"{corpus['eval_windows']} windows): width {corpus['width']}, "
                    f"{corpus['layers']} layers, context {corpus['context']}, batch "
                    f"{corpus['batch']}, {corpus['steps']} steps, {corpus['lr_rule']} "
                    f"(lr {corpus['lr']}), {corpus['threads']} torch thread(s); held-out "
                    f"loss after {corpus['steps']} steps and at dense's training time",
                    corpus["records"], CORPUS_COLUMNS))
    return out


def verdict_lines(results):
    """Plain sentences a benchmark states about its own tables."""
    return results.get("corpus", {}).get("summary", [])


def machine_lines(results):
    m = results["machine"]
    caches = ", ".join(f"{k} {v}" for k, v in m.get("cpu_caches", {}).items())
    lines = [f"device: {m['device']} ({m['device_name']})", f"CPU: {m['cpu']}, "
             f"{m['cpu_count']} logical CPUs{' (' + caches + ')' if caches else ''}, "
             f"torch threads: {m['torch_threads']}",
             f"torch {m['torch']}, Python {m['python']}, incrkern {m['incrkern']} "
             f"(extension loaded: {m['build'].get('extension_loaded')}, CUDA kernels: "
             f"{m['build'].get('cuda_kernels_loaded')})"]
    load = [m.get("load_average"), m.get("load_average_end")]
    if all(load):
        busy = load[0][0] > 0.5 * m["cpu_count"]  # before this run's own work
        lines.append(f"1-minute load average {load[0][0]:.2f} at the start, {load[1][0]:.2f} at "
                     f"the end, on {m['cpu_count']} CPUs"
                     + (": the machine was busy before this run began; with more than one torch "
                        "thread a descheduled thread stalls whole parallel loops, so figures "
                        "taken with --threads 1 are the steadier ones" if busy and
                        m["device"] == "cpu" and m["torch_threads"] > 1 else ""))
    if "gpu_memory_gib" in m:
        lines.append(f"GPU memory: {m['gpu_memory_gib']} GiB, torch CUDA {m['torch_cuda']}")
    kernels = results.get("kernels")
    if kernels:
        bw = kernels["copy_bandwidth"]
        lines.append(f"copy bandwidth (dst.copy_(src), {_size(bw['numel'])} fp32, bytes read + "
                     f"written), measured {bw['measurements']} times in this run: best "
                     f"{bw['roofline_bytes_per_s'] / 1e9:.2f} GB/s (the roofline below), median "
                     f"{bw['median_bytes_per_s'] / 1e9:.2f}, lowest "
                     f"{bw['min_bytes_per_s'] / 1e9:.2f}")
        if bw.get("add_bytes_per_s"):
            lines.append(f"for comparison, dst.add_(src) (12 B per element) reached "
                         f"{bw['add_bytes_per_s'] / 1e9:.2f} GB/s at best")
        if kernels.get("sizes"):
            lines.append(kernel_sizes_line(kernels["sizes"]))
    lines.append(f"run: {results['command']} at {m['date_utc']} UTC")
    return lines


def kernel_sizes_line(sizes):
    """One line naming the kernel cases' sizes and the cache they were chosen from."""
    many_count, many_numel = sizes["many"]
    text = (f"kernel sizes: one tensor {_size(sizes['one_tensor'])}, {many_count} x "
            f"{_size(many_numel)}, transformer list {_size(sizes['transformer'])}; "
            f"selections {' and '.join(_size(n) for n in sizes['select'])}, their "
            f"transformer list {_size(sizes['select_transformer'])}")
    if "llc_bytes" in sizes:
        text += (f"; from the last-level cache, {sizes['llc_bytes'] / 2 ** 20:.3g} MiB "
                 f"({sizes['llc_source']}): every working set at least "
                 f"{sizes['cache_factor']}x it (steps and accumulate {STEP_BYTES}+ B an "
                 f"element, selections {SELECT_BYTES} B)")
        if sizes.get("memory_capped"):
            text += ", except where the machine's memory holds less: those cases are smaller"
    return text


def print_tables(results, file=None):
    print("\n".join(machine_lines(results)), file=file)
    for title, rows, columns in sections(results):
        print(f"\n== {title}", file=file)
        print(text_table(rows, columns), file=file)
    for line in verdict_lines(results):
        print(f"\n{line}", file=file)


HOW_TO_READ = """\
Times are the median of the repeats after a warm-up, with the min and max beside it.
"speedup vs ref" is the reference's median time divided by the row's, both measured in
this run (above 1: faster than the reference). GB/s counts the least bytes the step must
move (AdamW 28 per updated element, SGD with momentum 20, with bf16 or fp16 params 22
and 14 as incrkern keeps fp32 state, where torch's fused optimizers keep the param's
dtype; accumulate 12 and 20 with the square, selection 4 per scanned element for one
pass; a sparse step, 4 per element for its selection plus the memory lines its chosen
elements fall in, 64 B on a CPU and
32 B on a GPU, seven line transfers each: at density 0.01 in fp32 that is 15% of a
CPU's lines, so a 1% step with one selection read moves at least 29% of a dense step's
bytes, at most 3.4x faster at equal bandwidth); "of copy BW" divides it by the best
copy bandwidth measured in the same run (the copy is timed before every case).
On a CPU, `copy_` also pays a read for ownership of every destination line it writes
(no streaming stores), which a kernel that writes only what it has read does not: such a
kernel can show more than 100% of the copy bandwidth, and a working set that fits in the
last-level cache can too. "noisy" flags a row whose slowest sample took more than three
times its fastest (the machine was busy with other work during it). "n/a" with a
"failed: ..." note marks an implementation that raised in this run."""


def markdown(results, plots):
    lines = [f"# incrkern benchmarks: {results['machine']['device_name']}", ""]
    lines += [f"- {line}" for line in machine_lines(results)]
    if "kernels" in results or "sparse" in results:  # the timing tables it explains
        lines += ["", HOW_TO_READ]
    for title, rows, columns in sections(results):
        lines += ["", f"## {title}", "", markdown_table(rows, columns)]
    verdict = verdict_lines(results)
    if verdict:
        lines += ["", "## Where sparse updates help or hurt", ""]
        lines += [f"- {line}" for line in verdict]
    for caption, path in plots:
        lines += ["", f"![{caption}]({os.path.basename(path)})"]
    return "\n".join(lines) + "\n"


def _clean(obj):
    """JSON without NaN/inf (they become null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(_clean(results), f, indent=1, allow_nan=False)


# ----------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_density(results, path):
    """Time per AdamW step against density, one line per implementation, per shape set."""
    recs = [r for r in results["kernels"]["records"]
            if r["bench"] == "sparse_step" and r["available"]]
    if not recs:
        return None
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shapes"] for r in recs))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in recs if r["shapes"] == shape]
        densities = sorted({r["density"] for r in rows if r["density"] is not None})
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["impl"] == impl]
            if mine[0]["density"] is None:  # a dense reference: one time for every density
                if not densities:
                    continue
                ax.plot([densities[0], densities[-1]], [mine[0]["median_s"] * 1e3] * 2, "--k",
                        label=impl)
                continue
            pts = sorted((r["density"], r["median_s"] * 1e3) for r in mine)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=impl, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density")
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"{shape} ({_size(rows[0]['numel'])} params)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"AdamW step time vs density, {results['machine']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_convergence(results, path):
    recs = [r for r in results["convergence"]["records"] if r["available"] and r["main"]]
    if not recs:
        return None
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in recs))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in recs if r["model"] == model):
            ax.plot([c["calls"] for c in r["curve"]], [c["test_acc"] for c in r["curve"]],
                    "--" if r["torch_dense"] else "-", label=r["row"])
        ax.set_xlabel("optimizer.step() calls")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"digits, {model}")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_corpus(results, path):
    """Held-out loss against steps and against training time: colour by density,
    line style by selection, dense in black."""
    recs = [r for r in results["corpus"]["records"] if r["available"]]
    if not recs:
        return None
    plt = _pyplot()
    densities = sorted({r["density"] for r in recs if r["density"] is not None}, reverse=True)
    colours = dict(zip(densities, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = {"accumulated": "-", "grad": "--", "random": ":"}
    # The first steps fall from 8 bits per byte; the plot shows where the rows part.
    start = recs[0]["curve"][0]["heldout_bpb"]
    top = min(start, 1.5 * min(r["heldout_bpb"] for r in recs)) + 0.05
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, x_key, x_label in ((axes[0], "step", "optimizer steps"),
                               (axes[1], "train_s", "training time (s)")):
        for r in recs:
            xs = [c[x_key] for c in r["curve"]]
            ys = [c["heldout_bpb"] for c in r["curve"]]
            if r["torch_dense"]:
                ax.plot(xs, ys, "-k", linewidth=2, label=r["row"])
            else:
                ax.plot(xs, ys, styles.get(r["select"], "-."), color=colours[r["density"]],
                        label=r["row"])
        if x_key == "train_s" and results["corpus"].get("budget_s"):
            ax.axvline(results["corpus"]["budget_s"], color="grey", linewidth=0.8)
        ax.set_ylim(top=top)
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out loss (bits per byte)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"byte-level LM on Python sources, {results['machine']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
