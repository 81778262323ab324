"""Accumulate on the CPU: incrkern.ops.accumulate_ against torch._foreach_add_ and the
machine's copy bandwidth, ratios taken in one run (the minimum of repeats).

    python bench/accumulate_cpu.py [--numel 1e8] [--repeats 7]
"""
import argparse
import time

import torch

from incrkern import ops


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # The minimum: on a shared machine the other processes only ever add time.
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=float, default=1e8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tensors", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="grad dtype")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = int(args.numel) // args.tensors
    gdtype = getattr(torch, args.dtype)
    grads = [torch.randn(n).to(gdtype) for _ in range(args.tensors)]
    gsize = grads[0].element_size()
    accs = [torch.zeros(n) for _ in range(args.tensors)]
    sq = [torch.zeros(n) for _ in range(args.tensors)]
    dst = [torch.empty(n) for _ in range(args.tensors)]
    total = n * args.tensors
    r = args.repeats
    src = [torch.randn(n) for _ in range(args.tensors)]
    t_copy = timed(lambda: [d.copy_(g) for d, g in zip(dst, src)], r)
    if gdtype == torch.float32:
        t_foreach = timed(lambda: torch._foreach_add_(accs, grads, alpha=0.5), r)
    else:  # torch needs the grads in fp32 first
        t_foreach = timed(lambda: torch._foreach_add_(accs, [g.float() for g in grads],
                                                      alpha=0.5), r)
    t_acc = timed(lambda: ops.accumulate_(accs, grads, 0.5), r)
    t_both = timed(lambda: ops.accumulate_(accs, grads, 0.5, sq), r)
    t_sq = timed(lambda: ops.accumulate_(None, grads, 1.0, sq, sq_alpha=0.1, sq_decay=0.9), r)
    copy_bw = 8 * total / t_copy
    print(f"{total:.3g} {args.dtype} grads in {args.tensors} tensors, "
          f"{torch.get_num_threads()} threads")
    print(f"copy fp32       {t_copy * 1e3:8.2f} ms  {copy_bw / 1e9:6.2f} GB/s (8 B/elem; "
          f"{1.5 * copy_bw / 1e9:.2f} GB/s counting the write-allocate read)")
    b1, b2 = gsize + 8, gsize + 16
    for name, t, nbytes in (("foreach_add_", t_foreach, b1), ("accumulate_", t_acc, b1),
                            ("accumulate+sq", t_both, b2), ("sq only (EMA)", t_sq, b1)):
        bw = nbytes * total / t
        print(f"{name:15s} {t * 1e3:8.2f} ms  {bw / 1e9:6.2f} GB/s ({nbytes} B/elem) "
              f"= {bw / copy_bw:5.1%} of copy")
    print(f"accumulate_ / foreach_add_ time ratio: {t_acc / t_foreach:.3f}")


if __name__ == "__main__":
    main()
