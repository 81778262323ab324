"""One sparse AdamW step on the CPU by density: the fused select-and-update
(ops.adam_select_update_, exact and approx) against select then update by
positions and select then update by a bool mask, with torch's fused dense AdamW
for scale. The variants run interleaved, each timed best of --repeats.

    python bench/crossover_fused.py [--numel 1e7] [--tensors 1] [--repeats 5]
        [--threads N] [--grads normal|student_t] [--error-feedback]
        [--stream-density D]

--tensors splits the elements over that many equal tensors (a model's list).
--stream-density sets the density from which the fused call streams over every
element (INCRKERN_STREAM_DENSITY; 2 keeps the tile lists at every density): two runs,
one with 2, give the crossover behind the kernel's own choice.
"""
import argparse
import os
import time

import torch

from incrkern import ops
from incrkern.bench.sparse import llc_bytes

DENSITIES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5]


def make_grad(kind, n, gen):
    if kind == "student_t":  # heavy tails (df = 2), as real gradients have
        z = torch.randn(n, generator=gen)
        chi = torch.randn(n, 2, generator=gen).pow(2).sum(1) / 2
        return z / chi.sqrt()
    return torch.randn(n, generator=gen)


def cache_evictor():
    """A callable that writes twice the last-level cache's bytes: run before each
    timed call, it leaves none of the previous variant's lines in cache. Variants that
    choose the same elements would otherwise find the chosen lines (at density 0.004,
    6% of a 10M tensor's p, m and v: 10 MB) where the one before left them."""
    scratch = torch.zeros(2 * llc_bytes()[0] // 4)
    return lambda: scratch.add_(1.0)


def best_interleaved(variants, repeats, evict=lambda: None):
    """{name: best time in ms} of the callables in `variants`, run in turn `repeats`
    times after one warm-up each: on a shared machine others only ever add time.
    evict() runs before each timed call, and each round starts one variant later, so
    that no variant always follows the same one."""
    best = {name: float("inf") for name in variants}
    for fn in variants.values():
        fn()
    names = list(variants)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            evict()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t * 1e3 for name, t in best.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--grads", default="normal", choices=["normal", "student_t"])
    parser.add_argument("--densities", type=str, default=None)
    parser.add_argument("--error-feedback", action="store_true")
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--stream-density", type=float, default=None)
    args = parser.parse_args()
    if args.stream_density is not None:  # read by the kernel at its first call
        os.environ["INCRKERN_STREAM_DENSITY"] = str(args.stream_density)
    if args.threads:
        torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")] if args.densities else DENSITIES
    size = int(args.numel) // args.tensors
    n = size * args.tensors
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(size, generator=gen) for _ in range(args.tensors)]
    g = [make_grad(args.grads, size, gen) for _ in range(args.tensors)]
    m = [torch.zeros(size) for _ in range(args.tensors)]
    v = [torch.zeros(size) for _ in range(args.tensors)]
    r = [torch.zeros(size) for _ in range(args.tensors)] if args.error_feedback else None
    steps = [torch.tensor(1.0) for _ in range(args.tensors)]
    hyper = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)

    def fused(k, approx):
        return lambda: ops.adam_select_update_(p, g, m, v, steps, [k] * args.tensors, r,
                                               approx=approx, validate=False, **hyper)

    def composed(k, by_mask):
        def run():
            src = g
            if r is not None:
                ops.accumulate_(r, g, 1.0)
                src = r
            idx = ops.select(src, [k] * args.tensors, score="grad", validate=False)
            if by_mask:
                masks = [torch.zeros(size, dtype=torch.bool).index_fill_(0, i, True)
                         for i in idx]
                ops.adam_update_(p, src, m, v, steps, masks=masks,
                                 consume_grad=r is not None, validate=False, **hyper)
            else:
                ops.adam_update_(p, src, m, v, steps, indices=idx,
                                 consume_grad=r is not None, validate=False, **hyper)
        return run

    tp = [t.clone().requires_grad_() for t in p]
    for t, grad in zip(tp, g):
        t.grad = grad.clone()
    dense = torch.optim.AdamW(tp, lr=1e-3, weight_decay=0.01, fused=True)
    dense.step()

    evict = cache_evictor()
    stream = os.environ.get("INCRKERN_STREAM_DENSITY", "the kernel's own")
    print(f"AdamW step, {n:.3g} fp32 elements in {args.tensors} tensors, "
          f"{torch.get_num_threads()} threads, {args.grads} grads"
          f"{', error feedback' if r is not None else ''}, stream density {stream}; ms, "
          f"best of {args.repeats}")
    print(f"{'density':>8} {'fused':>7} {'approx':>7} {'positions':>10} {'mask':>7} "
          f"{'torch':>7} {'torch/fused':>12}")
    for d in densities:
        k = ops.density_k(d, size)
        variants = dict(fused=fused(k, False), approx=fused(k, True),
                        positions=composed(k, False), mask=composed(k, True),
                        torch=dense.step)
        ms = best_interleaved(variants, args.repeats, evict)
        print(f"{d:8.3f} {ms['fused']:7.2f} {ms['approx']:7.2f} {ms['positions']:10.2f} "
              f"{ms['mask']:7.2f} {ms['torch']:7.2f} {ms['torch'] / ms['fused']:12.2f}",
              flush=True)


if __name__ == "__main__":
    main()
