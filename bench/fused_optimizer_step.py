"""incrkern.optim.AdamW's step on one large fp32 tensor, before and after the fused
select-and-update: the composed path (select, then update by positions or mask)
against the fused kernel, exact and approx, with torch.optim.AdamW(fused=True) for
scale. Interleaved in one process, each timed best of --repeats.

    python bench/fused_optimizer_step.py [--numel 1e7] [--repeats 5] [--threads N]
"""
import argparse

import torch

import incrkern
import incrkern.optim.base as base
from crossover_fused import best_interleaved, cache_evictor  # bench/ is the script's own directory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--densities", type=str, default="0.1,0.01,0.001")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.numel)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen)
    use_fused = base.use_fused

    def optimizer_step(density, topk, fused):
        p = torch.randn(n, generator=gen).requires_grad_()
        p.grad = grad
        opt = incrkern.optim.AdamW([p], lr=1e-3, density=density, topk=topk)

        def step():
            base.use_fused = (lambda d, k, select="grad": True) if fused else \
                (lambda d, k, select="grad": False)
            try:
                opt.step()
            finally:
                base.use_fused = use_fused
        return step

    tp = torch.randn(n, generator=gen).requires_grad_()
    tp.grad = grad
    dense = torch.optim.AdamW([tp], lr=1e-3, fused=True)

    evict = cache_evictor()
    print(f"AdamW step, one tensor of {n:.3g} fp32, {torch.get_num_threads()} threads; "
          f"ms, best of {args.repeats}")
    print(f"{'density':>8} {'topk':>7} {'before':>8} {'after':>8} {'speed-up':>9} "
          f"{'torch':>7} {'torch/after':>12}")
    for d in (float(x) for x in args.densities.split(",")):
        for topk in ("exact", "approx"):
            variants = dict(before=optimizer_step(d, topk, False),
                            after=optimizer_step(d, topk, True), torch=dense.step)
            ms = best_interleaved(variants, args.repeats, evict)
            print(f"{d:8.3f} {topk:>7} {ms['before']:8.2f} {ms['after']:8.2f} "
                  f"{ms['before'] / ms['after']:9.2f} {ms['torch']:7.2f} "
                  f"{ms['torch'] / ms['after']:12.2f}", flush=True)


if __name__ == "__main__":
    main()
