"""Calls every CUDA kernel once on small, awkward inputs (odd sizes, several chunks,
unaligned views), for compute-sanitizer's memcheck. Run by scripts/gpu_check.sh."""
import sys

import torch

import incrkern
from incrkern import ops

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu": checks the script itself
assert dev == "cpu" or incrkern.build_info()["cuda_kernels_loaded"], "CUDA kernels not built"
torch.manual_seed(0)
SIZES = [0, 1, 5, 4099, 200003]


def update_args(dtype, grad_dtype=None, offset=0):
    ps = [torch.randn(n + offset, device=dev, dtype=dtype)[offset:] for n in SIZES]
    gs = [torch.randn(p.numel(), device=dev, dtype=grad_dtype or dtype) for p in ps]
    return ps, gs


for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for offset in (0, 1):  # offset 1: a view off the 16-byte alignment
        for grad_dtype in (None, torch.float32):
            ps, gs = update_args(dtype, grad_dtype, offset)
            ms = [torch.zeros(p.numel(), device=dev) for p in ps]
            vs = [torch.zeros(p.numel(), device=dev) for p in ps]
            steps = [torch.ones((), device=dev) for _ in ps]
            ops.adam_update_(ps, gs, ms, vs, steps, lr=1e-3, weight_decay=0.1,
                             decoupled_weight_decay=True)
            idx = [torch.randperm(p.numel(), device=dev)[: (p.numel() + 2) // 3].sort().values
                   for p in ps]
            ages = [torch.zeros(i.numel(), device=dev, dtype=torch.int32) for i in idx]
            cm = [torch.zeros(i.numel(), device=dev) for i in idx]
            cv = [torch.zeros(i.numel(), device=dev) for i in idx]
            ops.adam_update_(ps, gs, cm, cv, steps, lr=1e-3, indices=idx, ages=ages,
                             compact_state=True, consume_grad=True)
            if grad_dtype is None:  # the fused select-and-update (grads in the param dtype)
                ops.FUSED_CUDA = True
                for approx in (False, True):
                    for res in (None, [torch.randn(p.numel(), device=dev) for p in ps]):
                        ks = [(p.numel() + 9) // 10 for p in ps]
                        ops.adam_select_update_(ps, gs, ms, vs, steps, ks, res, approx=approx,
                                                lr=1e-3, increment_steps=True)
            # mixed precision: the scale read by every kernel, and a skipped call
            for inf in (0.0, 1.0):
                amp = dict(amp_scale=torch.tensor(1024.0, device=dev),
                           found_inf=torch.tensor(inf, device=dev))
                ops.adam_update_(ps, gs, ms, vs, steps, lr=1e-3, increment_steps=True, **amp)
                ops.accumulate_([torch.zeros(p.numel(), device=dev) for p in ps], gs, 1.0,
                                **amp)
                if grad_dtype is None:
                    ops.adam_select_update_(ps, gs, ms, vs, steps,
                                            [(p.numel() + 9) // 10 for p in ps],
                                            [torch.randn(p.numel(), device=dev) for p in ps],
                                            lr=1e-3, increment_steps=True, **amp)
            masks = [torch.rand(p.numel(), device=dev) < 0.5 for p in ps]
            ops.sgd_update_(ps, gs, ms, lr=0.1, momentum=0.9, masks=masks,
                            first_step=[True] * len(ps))
            ops.sgd_update_(ps, gs, [], lr=0.1, indices=idx, consume_grad=True,
                            lr_tensor=torch.tensor(0.1, device=dev))
            if hasattr(ops, "accumulate_"):
                accs = [torch.zeros(p.numel(), device=dev) for p in ps]
                sq = [torch.zeros(p.numel(), device=dev) for p in ps]
                ops.accumulate_(accs, gs, 0.5, sq)
            if hasattr(ops, "select"):
                for score in ("grad", "weight", "accumulated", "random", "grad_sq"):
                    for scope in ("tensor", "global"):
                        for approx in (False, True):
                            ops.select([g.abs() for g in gs], 0.01, score=score, scope=scope,
                                       approx=approx,
                                       residual=[torch.randn(p.numel(), device=dev)
                                                 for p in ps]
                                       if score == "accumulated" else None,
                                       weights=ps if score == "weight" else None)
                # ties: few distinct values (all-zero rows among them), the k-th key
                # shared far beyond k, in tensor and global scope over the 5 tensors
                tied = [torch.randint(-2, 3, (p.numel(),), device=dev).to(dtype) for p in ps]
                for scope in ("tensor", "global"):
                    for approx in (False, True):
                        ops.select(tied, 0.3, scope=scope, approx=approx)
                        ops.select([torch.zeros_like(t) for t in tied], 0.01, scope=scope,
                                   approx=approx)
            if hasattr(ops, "topk"):
                for p in ps:
                    for k in sorted({0, min(1, p.numel()), p.numel() // 10, p.numel()}):
                        ops.topk(p, k)
                        ops.topk(p, k, approx=True)

for opt_cls in (incrkern.optim.SGD, incrkern.optim.Adam, incrkern.optim.AdamW):
    params = [torch.randn(n, device=dev, requires_grad=True) for n in SIZES]
    kwargs = dict(lr=1e-3, momentum=0.9) if opt_cls is incrkern.optim.SGD else dict(lr=1e-3)
    for extra in (dict(), dict(density=0.1), dict(density=0.1, scope="global"),
                  dict(density=0.1, select="accumulated"), dict(density=0.1, mask="fixed"),
                  dict(density=0.1, accumulate_steps=2)):
        try:
            opt = opt_cls(params, **kwargs, **extra)
        except (TypeError, ValueError):
            continue
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
if dev == "cuda":
    torch.cuda.synchronize()
print(f"every kernel ran on {dev}")
