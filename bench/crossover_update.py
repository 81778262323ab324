"""AdamW on the CPU at a given density: the indexed form (indices) against the dense
mask form (masks), and the dense step for scale; ratios taken in one run.

    python bench/crossover_update.py [--numel 1e7] [--repeats 5]
"""
import argparse

import torch

from crossover_fused import best_interleaved, cache_evictor  # bench/ is the script's own directory
from incrkern import ops

DENSITIES = [0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=float, default=1e7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.numel)
    p, g = torch.randn(n), torch.randn(n)
    m, v = torch.zeros(n), torch.zeros(n)
    steps = [torch.tensor(1.0)]
    kw = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)

    def adam(**extra):
        return lambda: ops.adam_update_([p], [g], [m], [v], steps, **kw, **extra)

    evict = cache_evictor()
    dense_ms = best_interleaved(dict(dense=adam()), args.repeats, evict)["dense"]
    print(f"AdamW, {n:.3g} fp32 elements, {torch.get_num_threads()} threads; "
          f"dense step {dense_ms:.2f} ms ({28 * n / dense_ms / 1e6:.1f} GB/s at 28 B/elem)")
    print(f"{'density':>8} {'indices ms':>11} {'masks ms':>9} {'masks/indices':>14}")
    for d in DENSITIES:
        k = max(1, round(d * n))
        idx = torch.randperm(n)[:k].sort().values  # ascending, as the selection returns
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        ms = best_interleaved(dict(indices=adam(indices=[idx]), masks=adam(masks=[mask])),
                              args.repeats, evict)
        print(f"{d:8.3f} {ms['indices']:11.2f} {ms['masks']:9.2f} "
              f"{ms['masks'] / ms['indices']:14.2f}")


if __name__ == "__main__":
    main()
