"""The command line and the run that writes the result files."""
import argparse
import datetime
import os
import sys
import time

import torch

from . import common, convergence, corpus, distributed, finetune, kernels, report, sparse
from .shapes import sizes_for


def _progress(enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda **kw: tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_out(package_file=__file__):
    """bench/results of the checkout this package runs from (a bench/results folder and
    setup.py beside the package's folder), else the current folder: an installed
    package writes where it is run."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(package_file))))
    results = os.path.join(root, "bench", "results")
    if os.path.isdir(results) and os.path.isfile(os.path.join(root, "setup.py")):
        return results
    return os.getcwd()


def file_stem(device, what, mode, date=None, threads=None):
    """<date>-<device>, with -full / -kernels / -convergence / -t<threads> when not the
    default run."""
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{date}-{common.device_slug(device)}"
    if mode not in ("quick",):
        stem += f"-{mode}"
    if what != "all":
        stem += f"-{what}"
    if threads is not None:
        stem += f"-t{threads}"
    return stem


def run_bench(what="all", mode="quick", device=None, out=None, progress=True, quiet=False,
              threads=None, isolate=None, only=None):
    """Runs the benchmarks, prints the tables, writes JSON, markdown and plots to `out`
    (None: default_out()).
    `threads`: torch's intra-op thread count for the run (None: torch's default).
    "distributed", "finetune" and "corpus" run only when asked for by name ("all" is
    kernels, sparse and convergence);
    `isolate`: each of its rows in its own process (None: with --full); `only`: the
    finetune rows whose names hold one of these texts (None: every row).
    Returns (results, {kind: path})."""
    if mode == "medium" and what not in ("finetune", "corpus"):
        raise SystemExit("incrkern.bench: --medium is a size of the finetune and corpus "
                         "benchmarks only")
    if what == "distributed":
        device = distributed_device(device)
    device = torch.device(device or default_device())
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("incrkern.bench: --device cuda asked for, but no CUDA device")
    out = os.path.abspath(out or default_out())
    os.makedirs(out, exist_ok=True)
    bar = _progress(progress)
    t0 = time.perf_counter()
    command = f"python -m incrkern.bench {what} --{mode} --device {device.type}"
    if threads is not None:
        command += f" --threads {threads}"
    for text in only or ():
        command += f" --only {text!r}"
    results = {"command": command,
               "machine": common.machine_info(device), "mode": mode}
    if what == "distributed":
        return _run_distributed(results, mode, out, bar, quiet, t0, threads, device)
    if what in ("kernels", "all"):
        sizes = sizes_for(mode, device, sparse.llc_bytes(device), common.memory_bytes(device))
        results["kernels"] = kernels.run(sizes, device, progress=bar)
    if what in ("sparse", "all"):
        results["sparse"] = sparse.run(mode, device, progress=bar)
    if what in ("convergence", "all"):
        results["convergence"] = convergence.run(mode, device, progress=bar)
    if what == "finetune":
        results["finetune"] = finetune.run(mode, device, progress=bar, isolate=isolate,
                                           only=only)
    if what == "corpus":
        results["corpus"] = corpus.run(mode, device, progress=bar)
    results["total_s"] = time.perf_counter() - t0
    results["machine"]["load_average_end"] = common._load_average()

    stem = os.path.join(out, file_stem(device, what, mode, threads=threads))
    paths = {"json": stem + ".json", "markdown": stem + ".md"}
    plots = []
    if "kernels" in results:
        p = report.plot_density(results, stem + "-density.png")
        if p:
            plots.append(("AdamW step time vs density", p))
    if "convergence" in results:
        p = report.plot_convergence(results, stem + "-accuracy.png")
        if p:
            plots.append(("test accuracy vs step", p))
    if "corpus" in results:
        p = report.plot_corpus(results, stem + "-heldout.png")
        if p:
            plots.append(("held-out loss vs step and vs training time", p))
    paths.update({f"plot{i}": p for i, (_, p) in enumerate(plots)})
    report.write_json(results, paths["json"])
    with open(paths["markdown"], "w") as f:
        f.write(report.markdown(results, plots))
    if not quiet:
        report.print_tables(results)
        print(f"\n{results['total_s']:.0f} s in all; results written to {out}: "
              + ", ".join(os.path.basename(p) for p in paths.values()))
    return results, paths


def distributed_device(requested):
    """The device of `distributed` when none is asked for: NCCL needs a GPU per rank, so
    "cuda" only with GPUs enough for the smallest world size, else the CPU's gloo ranks."""
    if requested is not None:
        return requested
    enough = torch.cuda.is_available() and torch.cuda.device_count() >= min(
        distributed.WORLD_SIZES)
    return "cuda" if enough else "cpu"


def _run_distributed(results, mode, out, bar, quiet, t0, threads, device):
    """`python -m incrkern.bench distributed`: DDP top-k against all-reduce (CPU ranks
    over gloo, or a rank per GPU over NCCL)."""
    results["command"] = f"python -m incrkern.bench distributed --{mode} --device {device.type}"
    results["distributed"] = distributed.run(mode, progress=bar, device_type=device.type)
    results["total_s"] = time.perf_counter() - t0
    results["machine"]["load_average_end"] = common._load_average()
    stem = os.path.join(out, file_stem(device, "distributed", mode,
                                       threads=threads))
    paths = {"json": stem + ".json", "markdown": stem + ".md"}
    table = distributed.markdown(results["distributed"])
    report.write_json(results, paths["json"])
    with open(paths["markdown"], "w") as f:
        f.write("# DDP top-k hook against all-reduce\n\n`" + results["command"] + "`\n\n"
                + "\n".join(report.machine_lines(results)) + "\n\n" + table)
    if not quiet:
        print(table)
        print(f"{results['total_s']:.0f} s in all; wrote " + ", ".join(paths.values()))
    return results, paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m incrkern.bench",
        description="incrkern kernel, sparse-step and convergence benchmarks (ratios to "
                    "torch measured in the same run; bandwidth against the measured copy "
                    "bandwidth)")
    parser.add_argument("what", nargs="?", default="all",
                        choices=("kernels", "sparse", "convergence", "all", "distributed",
                                 "finetune", "corpus"),
                        help="all: kernels, sparse and convergence; distributed: DDP "
                             "with the top-k hook against all-reduce, 2 and 4 CPU ranks "
                             "over gloo (with --device cuda, a rank per GPU over NCCL); "
                             "finetune: the sparse fine-tuning benchmark; "
                             "corpus: a byte-level language model trained from scratch "
                             "on Python sources, dense against sparse")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes, a few minutes on a CPU (the default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the real sizes (100M elements, BERT-base, 1e8/1e9 top-k)")
    size.add_argument("--medium", dest="mode", action="store_const", const="medium",
                      help="finetune: half the full run's steps and data; corpus: 20 MB "
                           "of text, 3000 steps of a small model (about 20 minutes on 2 "
                           "CPU cores)")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None,
                        help="output folder (default: bench/results when run from a "
                             "checkout of incrkern, else the current folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice); "
                             "on a CPU shared with other work, 1 gives steadier figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="finetune: each row in its own process, so that its peak "
                             "memory is its own (default: with --full)")
    parser.add_argument("--only", action="append", default=None, metavar="TEXT",
                        help="finetune: only the rows whose name holds TEXT (case "
                             "ignored; repeat for several), e.g. --only dense --only LoRA")
    args = parser.parse_args(argv)
    if args.only and args.what != "finetune":
        parser.error("--only selects rows of the finetune benchmark")
    run_bench(args.what, args.mode or "quick", args.device, args.out,
              progress=not args.no_progress, threads=args.threads, isolate=args.isolate,
              only=args.only)
    return 0
