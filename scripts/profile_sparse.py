"""Profiles incrkern's sparse AdamW step, case by case, as `make gpu-check` reports it:
launches (CUDA kernels, or incrkern ops on a CPU) per step, the step's time against
torch's fused dense AdamW on the same tensors in the same run, and, read from Nsight
Compute's CSV when gpu_check.sh ran the case under `ncu`, the DRAM bytes read and
written per step against the bytes of the score source (one read of the gradient).

    python scripts/profile_sparse.py [--device cuda] [--numel 1e7] [--case NAME] [--fused]
    python scripts/profile_sparse.py --ncu-csv FILE   # DRAM bytes of one ncu run
    python scripts/profile_sparse.py --list           # the case names

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


def launches(fn, device):
    """Kernels launched by one call (CUDA), or incrkern ops called (CPU)."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("incrkern::"))


def ncu_dram_bytes(text):
    """(bytes read, bytes written) summed over every kernel of an `ncu --csv --page raw
    --metrics dram__bytes_read.sum,dram__bytes_write.sum` output."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows:
        raise ValueError("no CSV rows in the ncu output")
    header, units = rows[0], None
    data = rows[1:]
    if data and not any(c.strip().replace(".", "").isdigit() for c in data[0] if c):
        units, data = data[0], data[1:]  # --page raw prints a row of units first
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6,
             "GB": 1e9, "B": 1}
    totals = []
    for metric in ("dram__bytes_read.sum", "dram__bytes_write.sum"):
        col = header.index(metric)
        factor = scale.get(units[col], 1) if units else 1
        totals.append(sum(float(r[col].replace(",", "")) * factor for r in data if r[col]))
    return tuple(totals)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=float, default=1e7)
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ncu-csv")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--fused", action="store_true",
                        help="--case with the CUDA fused select-and-update kernel")
    args = parser.parse_args()
    n = int(args.numel)
    if args.list:
        print("\n".join(CASES))
        return
    if args.ncu_csv:
        read, written = ncu_dram_bytes(open(args.ncu_csv).read())
        print(f"DRAM read {read / 1e6:.1f} MB ({read / (4 * n):.2f} reads of the fp32 "
              f"gradient), written {written / 1e6:.1f} MB")
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
