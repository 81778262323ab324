"""Regression timings of the main kernels on small sizes (pytest-benchmark).

Each group holds an incrkern kernel and its torch counterpart on the same tensors, so
`--benchmark-group-by=group` puts them side by side."""
import math

import pytest
import torch

import incrkern
from incrkern.bench import kernels
from incrkern.bench.shapes import transformer_shapes

SHAPES = {
    "1x1M": [(1_000_000,)],
    "100x10k": [(10_000,)] * 100,
    "transformer-small": transformer_shapes(layers=2, hidden=128, vocab=2000, positions=128),
}


def _params(shape_name, device):
    return kernels.make_tensors(SHAPES[shape_name], device)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["incrkern ops", "incrkern optim", "torch fused",
                                  "torch foreach"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_dense_step(bench_sync, benchmark, device, kind, impl, shape):
    benchmark.group = f"dense {kind} {shape} {device.type}"
    params = _params(shape, device)
    if impl == "incrkern ops":
        step = kernels._incrkern_ops_step(kind, params)
    elif impl == "incrkern optim":
        cls = incrkern.optim.AdamW if kind == "adamw" else incrkern.optim.SGD
        args = kernels.ADAMW_ARGS if kind == "adamw" else kernels.SGD_ARGS
        step = cls(params, **args).step
    else:
        step = kernels._torch_optimizer(kind, params, **kernels.TORCH_IMPLS[impl]).step
    with torch.no_grad():
        bench_sync(step)


@pytest.mark.parametrize("density", [0.1, 0.01])
@pytest.mark.parametrize("impl", ["incrkern AdamW", "torch.topk + incrkern.ops update"])
def test_sparse_step(bench_sync, benchmark, device, impl, density):
    benchmark.group = f"sparse adamw transformer-small d={density} {device.type}"
    params = _params("transformer-small", device)
    if impl == "incrkern AdamW":
        step = incrkern.optim.AdamW(params, **kernels.ADAMW_ARGS, density=density,
                                    select="grad", scope="tensor").step
    else:
        step = kernels._composed_step(params, kernels._torch_tensor_select, density)
    with torch.no_grad():
        bench_sync(step)


@pytest.mark.parametrize("frac", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("impl", ["incrkern topk", "incrkern topk approx", "torch.topk"])
def test_topk(bench_sync, benchmark, device, impl, frac):
    benchmark.group = f"topk 1M k={frac} {device.type}"
    n = 1_000_000
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0)).to(device)
    k = math.ceil(frac * n)
    if impl == "torch.topk":
        bench_sync(torch.topk, scores, k, sorted=False)
    else:
        bench_sync(incrkern.ops.topk, scores, k, approx=impl.endswith("approx"))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("impl", ["incrkern select", "torch"])
def test_select(bench_sync, benchmark, device, impl, scope):
    benchmark.group = f"select {scope} transformer-small k=0.01 {device.type}"
    shapes = SHAPES["transformer-small"]
    grads = [p.grad for p in _params("transformer-small", device)]
    sizes = [math.prod(s) for s in shapes]
    if scope == "global":
        k = math.ceil(0.01 * sum(sizes))
        offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), device=device)
        if impl == "torch":
            bench_sync(kernels._torch_global_select, grads, k, offsets)
            return
    else:
        k = [math.ceil(0.01 * s) for s in sizes]
        if impl == "torch":
            bench_sync(kernels._torch_tensor_select, grads, k)
            return
    bench_sync(incrkern.ops.select, grads, k, score="grad", scope=scope)


@pytest.mark.parametrize("shape", ["1x1M", "100x10k"])
@pytest.mark.parametrize("impl", ["incrkern accumulate_", "torch._foreach_add_"])
def test_accumulate(bench_sync, benchmark, device, impl, shape):
    benchmark.group = f"accumulate {shape} {device.type}"
    grads = [p.grad for p in _params(shape, device)]
    accs = [torch.zeros_like(g) for g in grads]
    if impl == "torch._foreach_add_":
        bench_sync(torch._foreach_add_, accs, grads, alpha=0.5)
    else:
        bench_sync(incrkern.ops.accumulate_, accs, grads, 0.5)
