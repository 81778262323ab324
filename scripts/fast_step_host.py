"""Times incrkern's AdamW step with and without the one-call C++ step
(incrkern/optim/fast_step.py), against torch's fused dense AdamW on the same params, in
the same run, taking turns: one tensor of 1e7 elements, and 1000 tensors of 10K, where
the Python around the kernels weighs most. On a GPU the one-call step is the
CUDA_ENABLED route (`make gpu-check` runs this); on the CPU, the direct route and the
op-kernel route (THROUGH_OP) that a GPU's groups take. Wall time of a step, the device
synchronised after it; a markdown table.

    python scripts/fast_step_host.py [--device cuda] [--rounds 30]
"""
import argparse
import statistics
import time

import torch

import incrkern
from incrkern.optim import fast_step

CASES = {"one tensor of 1e7": (1, 10_000_000), "1000 tensors of 10K": (1000, 10_000)}


def params_with_grads(count, numel, device):
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(numel, generator=gen).to(device))
        z = torch.randn(numel, generator=gen)
        p.grad = (z / torch.rand(numel, generator=gen).add(0.05)).to(device)
        params.append(p)
    return params


def routes(device):
    """(name, settings of fast_step) of the routes compared on this device."""
    if device == "cuda":
        return [("Python step", dict(ENABLED=False)),
                ("one call", dict(ENABLED=True, CUDA_ENABLED=True))]
    return [("Python step", dict(ENABLED=False)),
            ("one call, direct", dict(ENABLED=True, THROUGH_OP=False)),
            ("one call, op kernel", dict(ENABLED=True, THROUGH_OP=True))]


def timed(step, device):
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def run_case(count, numel, device, rounds, density):
    params = params_with_grads(count, numel, device)
    dense = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt = incrkern.optim.AdamW(params, lr=1e-3, density=density)
    saved = {name: getattr(fast_step, name) for name in ("ENABLED", "CUDA_ENABLED", "THROUGH_OP")}
    times = {name: [] for name, _ in routes(device)}
    torch_times = []
    try:
        with torch.no_grad():
            for r in range(rounds + 2):
                torch_ms = timed(dense.step, device)
                for name, settings in routes(device)[:: 1 if r % 2 else -1]:
                    for key, value in settings.items():
                        setattr(fast_step, key, value)
                    ms = timed(opt.step, device)
                    if r >= 2:  # the first steps make the state
                        times[name].append(ms)
                if r >= 2:
                    torch_times.append(torch_ms)
    finally:
        for name, value in saved.items():
            setattr(fast_step, name, value)
    return statistics.median(torch_times), {n: statistics.median(t) for n, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args()
    names = [name for name, _ in routes(args.device)]
    print(f"incrkern AdamW(density={args.density}) step, {args.device}, wall ms (median of "
          f"{args.rounds}, the device synchronised after each step), against torch's fused "
          "AdamW taking turns\n")
    print("| case | torch fused ms | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for case, (count, numel) in CASES.items():
        torch_ms, ms = run_case(count, numel, args.device, args.rounds, args.density)
        cells = " | ".join(f"{ms[n]:.3f} ({torch_ms / ms[n]:.2f}x)" for n in names)
        print(f"| {case} | {torch_ms:.3f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
