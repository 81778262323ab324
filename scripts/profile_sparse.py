"""Profiles incrkern's sparse AdamW step, case by case, as `make gpu-check` reports it:
launches (CUDA kernels, or incrkern ops on a CPU) per step, the step's time against
torch's fused dense AdamW on the same tensors in the same run, and, read from Nsight
Compute's CSV when gpu_check.sh ran the case under `ncu`, the DRAM bytes read and
written per step against the bytes of the score source (one read of the gradient).

    python scripts/profile_sparse.py [--device cuda] [--numel 1e7] [--case NAME] [--fused]
    python scripts/profile_sparse.py --ncu-csv FILE   # DRAM bytes of one ncu run
    python scripts/profile_sparse.py --list           # the case names
    python scripts/profile_sparse.py --breakdown      # where each step's time goes

--breakdown times each case's step on the host (the calls queued, the device not
waited for) and on the device, and lists its kernels (CUDA) or incrkern ops (CPU)
with their time per step: whether a step is bound by the host or by the device,
and by which kernel.

--case runs one case once (for ncu); without it every case is timed and printed as
a markdown table. On CUDA the table has each case twice: select then update, and the
fused select-and-update kernel (incrkern.ops.FUSED_CUDA); --fused runs --case with it.
"""
import argparse
import csv
import io
import time

import torch

import incrkern

CASES = {  # name: (density, topk, select)
    "d0.1-exact": (0.1, "exact", "grad"),
    "d0.1-approx": (0.1, "approx", "grad"),
    "d0.01-exact": (0.01, "exact", "grad"),
    "d0.01-approx": (0.01, "approx", "grad"),
    "d0.001-exact": (0.001, "exact", "grad"),
    "d0.001-approx": (0.001, "approx", "grad"),
    "accumulated-d0.01-exact": (0.01, "exact", "accumulated"),
    "accumulated-d0.01-approx": (0.01, "approx", "accumulated"),
}


def make_step(case, numel, device):
    """The case's optimizer step, on one tensor with a heavy-tailed gradient."""
    density, topk, select = CASES[case]
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(numel, generator=gen).to(device).requires_grad_()
    z = torch.randn(numel, generator=gen)
    p.grad = (z / torch.rand(numel, generator=gen).add(0.05)).to(device)
    opt = incrkern.optim.AdamW([p], lr=1e-3, density=density, topk=topk, select=select)
    return opt.step


def dense_step(numel, device):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(numel, generator=gen).to(device).requires_grad_()
    p.grad = torch.randn(numel, generator=gen).to(device)
    return torch.optim.AdamW([p], lr=1e-3, fused=True).step


def best_ms(fn, device, repeats=7):
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def profiled(fn, device, steps=1):
    """The profiler over `steps` calls of fn, after one call unprofiled, the device
    synchronised around them."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof


def launches(fn, device):
    """Kernels launched by one call (CUDA), or incrkern ops called (CPU)."""
    events = profiled(fn, device).events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("incrkern::"))


def host_and_device_ms(fn, device, steps=20):
    """(host ms, device ms) per step over `steps` calls in a row: the host's time to
    make the calls without waiting for the device, and the time until the device
    has run them all, both divided by `steps`."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / steps
    if device != "cuda":
        return host, host
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end) / steps


def breakdown(fn, device, steps=10):
    """[(name, calls per step, ms per step)] of the kernels (CUDA) or incrkern ops
    (CPU) that `steps` calls of fn run, longest first."""
    prof = profiled(fn, device, steps)
    rows = []
    for e in prof.key_averages():
        if device == "cuda":
            if (e.device_type != torch.autograd.DeviceType.CUDA
                    or getattr(e, "is_user_annotation", False) or "#" in e.key):
                continue  # Optimizer.step#AdamW.step spans the step, not a kernel
            us = getattr(e, "device_time_total", None)
            if us is None:
                us = e.cuda_time_total
        else:
            if not e.key.startswith("incrkern::"):
                continue
            us = e.cpu_time_total
        rows.append((e.key, e.count / steps, us / 1e3 / steps))
    return sorted(rows, key=lambda r: -r[2])


def short_name(kernel):
    """A kernel's name without its namespaces, template arguments and parameters."""
    if "::" not in kernel:  # Memset (Device), Memcpy HtoD (Pinned -> Device)
        return kernel.split("(")[0].strip()[:60]
    name = kernel.replace("(anonymous namespace)", "").replace("<unnamed>", "")
    name = name.split("(")[0].split("<")[0]
    return name.split()[-1].rsplit("::", 1)[-1][:60] if name.strip() else kernel[:60]


def print_breakdown(n, device, repeats):
    dense_host, dense_dev = host_and_device_ms(dense_step(n, device), device)
    print(f"Where the step's time goes: one tensor of {n:.3g} fp32 elements, {device}. "
          f"torch fused dense AdamW: host {dense_host:.3f} ms, device {dense_dev:.3f} ms "
          "per step (20 steps in a row).\n")
    for fused in ((False, True) if device == "cuda" else (False,)):
        incrkern.ops.FUSED_CUDA = fused
        for case in CASES:
            step = make_step(case, n, device)
            host, dev = host_and_device_ms(step, device)
            name = case + (" (fused)" if fused else "")
            print(f"### {name}: host {host:.3f} ms, device {dev:.3f} ms per step "
                  f"({dense_dev / dev:.2f}x the dense step)\n")
            print("| kernel | calls per step | ms per step |\n|---|---|---|")
            for kernel, calls, ms in breakdown(step, device, max(repeats, 3)):
                print(f"| {short_name(kernel)} | {calls:g} | {ms:.4f} |")
            print(flush=True)


NCU_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6,
             "GB": 1e9, "B": 1, "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "ns": 1,
             "us": 1e3, "ms": 1e6}


def ncu_kernels(text):
    """[(kernel name, {metric: value in bytes or ns})], one per kernel launch, from an
    `ncu --csv --page raw --metrics ...` output."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows:
        raise ValueError("no CSV rows in the ncu output")
    header, units = rows[0], None
    data = rows[1:]
    if data and not any(c.strip().replace(".", "").isdigit() for c in data[0] if c):
        units, data = data[0], data[1:]  # --page raw prints a row of units first
    # Metrics are named unit__counter.rollup; --page raw also lists the device's
    # attributes (device__attribute_...), some of them words.
    metrics = [i for i, name in enumerate(header) if "__" in name and "." in name]
    kernels = []
    for r in data:
        values = {}
        for col in metrics:
            if r[col]:
                factor = NCU_UNITS.get(units[col], 1) if units else 1
                values[header[col]] = float(r[col].replace(",", "")) * factor
        kernels.append((r[header.index("Kernel Name")], values))
    return kernels


def ncu_dram_bytes(text):
    """(bytes read, bytes written) summed over every kernel of an `ncu --csv --page raw
    --metrics dram__bytes_read.sum,dram__bytes_write.sum` output."""
    kernels = ncu_kernels(text)
    return tuple(sum(v.get(metric, 0.0) for _, v in kernels)
                 for metric in ("dram__bytes_read.sum", "dram__bytes_write.sum"))


def print_ncu(text, n):
    """One line per kernel (DRAM bytes against one read of the fp32 gradient, and its
    time where ncu measured it), then the totals line."""
    for name, v in ncu_kernels(text):
        time = v.get("gpu__time_duration.sum")
        print(f"  - {short_name(name)}: read {v.get('dram__bytes_read.sum', 0) / (4 * n):.2f} "
              f"gradient reads, written {v.get('dram__bytes_write.sum', 0) / 1e6:.1f} MB"
              + (f", {time / 1e3:.1f} us" if time is not None else ""))
    read, written = ncu_dram_bytes(text)
    print(f"DRAM read {read / 1e6:.1f} MB ({read / (4 * n):.2f} reads of the fp32 "
          f"gradient), written {written / 1e6:.1f} MB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=float, default=1e7)
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ncu-csv")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="each case's host and device time and its kernels")
    parser.add_argument("--fused", action="store_true",
                        help="--case with the CUDA fused select-and-update kernel")
    args = parser.parse_args()
    n = int(args.numel)
    if args.list:
        print("\n".join(CASES))
        return
    if args.ncu_csv:
        print_ncu(open(args.ncu_csv).read(), n)
        return
    if args.breakdown:
        print_breakdown(n, args.device, args.repeats)
        return
    if args.case:
        incrkern.ops.FUSED_CUDA = args.fused
        step = make_step(args.case, n, args.device)
        step()  # the state made; ncu (--profile-from-start off) sees the second call only
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return
    dense_ms = best_ms(dense_step(n, args.device), args.device, args.repeats)
    print(f"incrkern AdamW step, one tensor of {n:.3g} fp32 elements, {args.device} "
          f"({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'}); torch "
          f"fused dense AdamW: {dense_ms:.3f} ms\n")
    print("| case | launches per step | ms | speedup vs torch fused dense |")
    print("|---|---|---|---|")
    for fused in ((False, True) if args.device == "cuda" else (False,)):
        incrkern.ops.FUSED_CUDA = fused
        for case in CASES:
            step = make_step(case, n, args.device)
            ms = best_ms(step, args.device, args.repeats)
            name = case + (" (fused)" if fused else "")
            print(f"| {name} | {launches(step, args.device)} | {ms:.3f} | {dense_ms / ms:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
