"""Kernel benchmarks: dense optimizer steps, selection, sparse steps, accumulation and
optimizer state bytes, each against its torch counterpart timed in the same run.

Each section is a list of cases; a case builds its tensors, times every implementation
on them and returns records (see common.figure). An implementation that raises gives a
record with available=False and the failure, never a number.
"""
import gc
import math
import time

import torch

import incrkern
from . import common
from .common import (BYTES_ACCUMULATE, BYTES_ACCUMULATE_SQ, BYTES_ADAMW, BYTES_ADAMW_16BIT,
                     BYTES_SELECT_PASS, BYTES_SGD_MOMENTUM, BYTES_SGD_MOMENTUM_16BIT, figure,
                     measure, unavailable)
from .shapes import numel, transformer_shapes

ADAMW_ARGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
SGD_ARGS = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
TORCH_IMPLS = {"torch for-loop": dict(foreach=False), "torch foreach": dict(foreach=True),
               "torch fused": dict(fused=True)}
REFERENCE = "torch fused"
MIN_REPEATS = 3  # the fewest timed calls of a row, unless its Sizes says otherwise


def make_tensors(shapes, device, seed=0, requires_grad=True, dtype=torch.float32):
    """Params (leaf tensors) with .grad set, reproducibly."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, device=device).to(dtype)
        if requires_grad:
            p.requires_grad_(True)
        p.grad = torch.randn(shape, generator=gen, device=device).to(dtype)
        params.append(p)
    return params


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(fn, ctx, min_repeats=MIN_REPEATS):
    """Times fn under no_grad; any exception becomes an unavailable record."""
    def run():
        with torch.no_grad():
            fn()
    try:
        timing = measure(run, device=ctx["device"], warmup=ctx["sizes"].warmup,
                         repeats=ctx["sizes"].repeats, min_time_s=ctx["sizes"].min_time_s,
                         max_time_s=ctx["sizes"].max_time_s,
                         min_repeats=min(min_repeats, ctx["sizes"].repeats))
    except Exception as exc:  # noqa: BLE001 - report, do not hide or crash
        return None, common.failure(exc)
    return timing, None


def _record(timing, error, ctx, *, nbytes, reference_s, **fields):
    if timing is None:
        return unavailable(error, **fields)
    return figure(timing, nbytes=nbytes, roofline_bps=ctx["roofline_bps"],
                  reference_s=reference_s, **fields)


# ----------------------------------------------------------------------------------
# dense step


def _incrkern_ops_step(kind, params):
    """The dense step through incrkern.ops directly (state kept here, as torch keeps it),
    called as incrkern.optim calls the ops: no Python-level checks (the kernels still
    check), the step counts incremented by the op."""
    grads = [p.grad for p in params]
    # 16-bit params keep fp32 state, as incrkern.optim keeps it.
    state = [torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
             for p in params]
    if kind == "adamw":
        m = [torch.zeros_like(p, dtype=d) for p, d in zip(params, state)]
        v = [torch.zeros_like(p, dtype=d) for p, d in zip(params, state)]
        steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        b1, b2 = ADAMW_ARGS["betas"]

        def step():
            incrkern.ops.adam_update_(params, grads, m, v, steps, lr=ADAMW_ARGS["lr"],
                                      beta1=b1, beta2=b2, eps=ADAMW_ARGS["eps"],
                                      weight_decay=ADAMW_ARGS["weight_decay"],
                                      decoupled_weight_decay=True, maximize=False,
                                      validate=False, increment_steps=True)
        return step
    bufs = [torch.zeros_like(p, dtype=d) for p, d in zip(params, state)]

    def step():
        incrkern.ops.sgd_update_(params, grads, bufs, lr=SGD_ARGS["lr"],
                                 momentum=SGD_ARGS["momentum"], dampening=0.0,
                                 weight_decay=0.0, nesterov=False, maximize=False,
                                 validate=False)
    return step


def _torch_optimizer(kind, params, **impl):
    if kind == "adamw":
        return torch.optim.AdamW(params, **ADAMW_ARGS, **impl)
    return torch.optim.SGD(params, **SGD_ARGS, **impl)


def dense_step_case(kind, shape_name, shapes, dtype=torch.float32):
    def case(ctx):
        params = make_tensors(shapes, ctx["device"], dtype=dtype)
        n = numel(shapes)
        if dtype == torch.float32:
            nbytes = n * (BYTES_ADAMW if kind == "adamw" else BYTES_SGD_MOMENTUM)
        else:
            nbytes = n * (BYTES_ADAMW_16BIT if kind == "adamw" else BYTES_SGD_MOMENTUM_16BIT)
        base = dict(bench="dense_step", optimizer=kind, shapes=shape_name, numel=n,
                    n_tensors=len(shapes), dtype=str(dtype).removeprefix("torch."))
        timings = {}
        for name, impl in TORCH_IMPLS.items():
            opt = _torch_optimizer(kind, params, **impl)
            timings[name] = _timed(opt.step, ctx)
            del opt
            release()
        cls = incrkern.optim.AdamW if kind == "adamw" else incrkern.optim.SGD
        try:
            opt = cls(params, **(ADAMW_ARGS if kind == "adamw" else SGD_ARGS))
            timings["incrkern optim"] = _timed(opt.step, ctx)
        except Exception as exc:  # noqa: BLE001
            timings["incrkern optim"] = (None, common.failure(exc))
        opt = None
        release()
        timings["incrkern ops"] = _timed(_incrkern_ops_step(kind, params), ctx)
        ref = timings[REFERENCE][0]
        ref_s = ref["median_s"] if ref else None
        records = []
        for name, (timing, error) in timings.items():
            rec = _record(timing, error, ctx, nbytes=nbytes, reference_s=ref_s, impl=name,
                          reference=REFERENCE, **base)
            if timing is not None and name.startswith("incrkern"):
                rec["speedup_vs"] = {t: timings[t][0]["median_s"] / timing["median_s"]
                                     for t in TORCH_IMPLS if timings[t][0]}
            records.append(rec)
        del params
        release()
        return records
    case.label = f"dense {kind} {shape_name}" + ("" if dtype == torch.float32 else f" {dtype}")
    return case


# ----------------------------------------------------------------------------------
# selection


def sampled_threshold_topk(scores, k, generator, samples=65536):
    """A torch-only approximate top-k: the threshold that keeps k/n of a random sample,
    then every element at or above it (about k of them)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    m = min(n, samples)
    pick = torch.randint(n, (m,), device=flat.device, generator=generator)
    keep = max(1, round(k * m / n))
    threshold = torch.topk(flat[pick], keep, sorted=False).values.min()
    return (flat >= threshold).nonzero().squeeze(1)


def _recall(found, exact, n):
    """Fraction of the exact top-k that an approximate selection found."""
    mask = torch.zeros(n, dtype=torch.bool, device=exact.device)
    mask[exact] = True
    return float(mask[found].sum()) / max(1, exact.numel())


def topk_case(n, frac):
    def case(ctx):
        device = ctx["device"]
        gen = torch.Generator(device=device).manual_seed(1)
        scores = torch.randn(n, generator=gen, device=device).abs_()
        k = max(1, math.ceil(frac * n))
        nbytes = BYTES_SELECT_PASS * n
        base = dict(bench="topk", n=n, k=k, density=frac, numel=n)
        sample_gen = torch.Generator(device=device).manual_seed(2)
        exact = torch.topk(scores, k, sorted=False).indices
        impls = {
            "torch.topk": lambda: torch.topk(scores, k, sorted=False),
            "torch sampled threshold": lambda: sampled_threshold_topk(scores, k, sample_gen),
            "incrkern topk exact": lambda: incrkern.ops.topk(scores, k, approx=False),
            "incrkern topk approx": lambda: incrkern.ops.topk(scores, k, approx=True),
        }
        timings = {name: _timed(fn, ctx, _repeats_of(name, ctx)) for name, fn in impls.items()}
        ref_s = timings["torch.topk"][0]["median_s"] if timings["torch.topk"][0] else None
        records = []
        for name, (timing, error) in timings.items():
            rec = _record(timing, error, ctx, nbytes=nbytes, reference_s=ref_s, impl=name,
                          reference="torch.topk", **base)
            if timing is not None and name != "torch.topk":
                with torch.no_grad():
                    found = impls[name]()
                found = found if isinstance(found, torch.Tensor) else found.indices
                rec["returned_k"] = int(found.numel())
                rec["recall"] = _recall(found, exact, n)
            records.append(rec)
        del scores, exact
        release()
        return records
    case.label = f"topk n={n:.0e} k={frac:g}"
    return case


def _repeats_of(impl, ctx):
    """The fewest timed calls of a selection row: torch's take seconds on large sizes."""
    return ctx["sizes"].selection_reference_repeats if impl.startswith("torch") else MIN_REPEATS


def _torch_global_select(grads, k, offsets):
    flat = torch.cat([g.reshape(-1) for g in grads]).abs_()
    idx = torch.topk(flat, k, sorted=False).indices.sort().values
    bounds = torch.searchsorted(idx, offsets).tolist()
    return [idx[bounds[i]:bounds[i + 1]] - offsets[i] for i in range(len(grads))]


def _torch_tensor_select(grads, ks):
    return [torch.topk(g.reshape(-1).abs(), k, sorted=False).indices
            for g, k in zip(grads, ks)]


def select_case(scope, shapes, frac, shape_name="transformer"):
    def case(ctx):
        device = ctx["device"]
        params = make_tensors(shapes, device, requires_grad=False)
        grads = [p.grad for p in params]
        n = numel(shapes)
        sizes = [math.prod(s) for s in shapes]
        base = dict(bench="select", scope=scope, shapes=shape_name, numel=n,
                    n_tensors=len(shapes), density=frac)
        nbytes = BYTES_SELECT_PASS * n
        if scope == "global":
            k = max(1, math.ceil(frac * n))
            offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()),
                                   device=device)
            ref_name = "torch cat+topk"
            impls = {ref_name: lambda: _torch_global_select(grads, k, offsets)}
            ks = k
        else:
            ks = [max(1, math.ceil(frac * s)) for s in sizes]
            k = sum(ks)
            ref_name = "torch topk per tensor"
            impls = {ref_name: lambda: _torch_tensor_select(grads, ks)}
        base["k"] = k
        for approx in (False, True):
            impls[f"incrkern select {'approx' if approx else 'exact'}"] = (
                lambda approx=approx: incrkern.ops.select(grads, ks, score="grad",
                                                          scope=scope, approx=approx))
        timings = {name: _timed(fn, ctx, _repeats_of(name, ctx)) for name, fn in impls.items()}
        ref_s = timings[ref_name][0]["median_s"] if timings[ref_name][0] else None
        records = [_record(t, e, ctx, nbytes=nbytes, reference_s=ref_s, impl=name,
                           reference=ref_name, **base) for name, (t, e) in timings.items()]
        del params, grads
        release()
        return records
    case.label = f"select {scope} {shape_name} k={frac:g}"
    return case


# ----------------------------------------------------------------------------------
# sparse step: selection + update at a density, against dense torch fused AdamW


def _composed_step(params, selector, density):
    """incrkern.ops.adam_update_ at the positions a selector chose, per tensor (with
    torch.topk as the selector: what the optimizer's own selection saves)."""
    grads = [p.grad for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
    ks = [max(1, math.ceil(density * p.numel())) for p in params]
    b1, b2 = ADAMW_ARGS["betas"]

    def step():
        indices = None if density >= 1.0 else selector(grads, ks)
        incrkern.ops.adam_update_(params, grads, m, v, steps, lr=ADAMW_ARGS["lr"], beta1=b1,
                                  beta2=b2, eps=ADAMW_ARGS["eps"],
                                  weight_decay=ADAMW_ARGS["weight_decay"],
                                  decoupled_weight_decay=True, maximize=False,
                                  indices=indices, validate=False, increment_steps=True)
    return step


def sparse_step_case(shape_name, shapes, densities):
    def case(ctx):
        params = make_tensors(shapes, ctx["device"])
        n = numel(shapes)
        base = dict(bench="sparse_step", optimizer="adamw", shapes=shape_name, numel=n,
                    n_tensors=len(shapes))
        opt = torch.optim.AdamW(params, **ADAMW_ARGS, fused=True)
        ref, ref_err = _timed(opt.step, ctx)
        del opt
        release()
        ref_s = ref["median_s"] if ref else None
        records = [_record(ref, ref_err, ctx, nbytes=BYTES_ADAMW * n, reference_s=ref_s,
                           impl="torch AdamW fused (dense)", density=None, k=n,
                           reference="torch AdamW fused (dense)", **base)]
        for d in densities:
            k = n if d >= 1.0 else sum(max(1, math.ceil(d * math.prod(s))) for s in shapes)
            nbytes = BYTES_ADAMW * k if d >= 1.0 else \
                common.sparse_step_bytes(shapes, d, ctx["device"])
            fields = dict(density=d, k=k, reference="torch AdamW fused (dense)", **base)
            for mode in ("exact", "approx"):
                name = f"incrkern AdamW {mode}"
                try:
                    extra = {} if d >= 1.0 else dict(density=d, select="grad", scope="tensor",
                                                      topk=mode)
                    opt = incrkern.optim.AdamW(params, **ADAMW_ARGS, **extra)
                    timing, error = _timed(opt.step, ctx)
                except Exception as exc:  # noqa: BLE001
                    timing, error = None, common.failure(exc)
                opt = None
                release()
                records.append(_record(timing, error, ctx, nbytes=nbytes, reference_s=ref_s,
                                       impl=name, **fields))
            timing, error = _timed(_composed_step(params, _torch_tensor_select, d), ctx,
                                   ctx["sizes"].selection_reference_repeats)
            records.append(_record(timing, error, ctx, nbytes=nbytes, reference_s=ref_s,
                                   impl="torch.topk + incrkern.ops update", **fields))
            release()
        del params
        release()
        return records
    case.label = f"sparse step {shape_name}"
    return case


# ----------------------------------------------------------------------------------
# accumulate


def accumulate_case(shape_name, shapes, with_sq):
    def case(ctx):
        device = ctx["device"]
        params = make_tensors(shapes, device, requires_grad=False)
        grads = [p.grad for p in params]
        accs = [torch.zeros_like(g) for g in grads]
        sqs = [torch.zeros_like(g) for g in grads] if with_sq else None
        n = numel(shapes)
        nbytes = n * (BYTES_ACCUMULATE_SQ if with_sq else BYTES_ACCUMULATE)
        base = dict(bench="accumulate", shapes=shape_name, numel=n, n_tensors=len(shapes),
                    sq=with_sq)
        if with_sq:
            ref_name = "torch._foreach_add_ + _foreach_addcmul_"

            def ref():
                torch._foreach_add_(accs, grads, alpha=0.25)
                torch._foreach_addcmul_(sqs, grads, grads, value=0.25)
        else:
            ref_name = "torch._foreach_add_"

            def ref():
                torch._foreach_add_(accs, grads, alpha=0.25)
        timings = {ref_name: _timed(ref, ctx),
                   "incrkern accumulate_": _timed(
                       lambda: incrkern.ops.accumulate_(accs, grads, 0.25, sq_accs=sqs), ctx)}
        ref_s = timings[ref_name][0]["median_s"] if timings[ref_name][0] else None
        records = [_record(t, e, ctx, nbytes=nbytes, reference_s=ref_s, impl=name,
                           reference=ref_name, **base) for name, (t, e) in timings.items()]
        del params, grads, accs, sqs
        release()
        return records
    case.label = f"accumulate{' +sq' if with_sq else ''} {shape_name}"
    return case


# ----------------------------------------------------------------------------------
# optimizer state bytes per parameter


STATE_MODES = {
    "torch AdamW": None,
    "incrkern dense": dict(),
    "dynamic (density 0.01)": dict(density=0.01, select="grad"),
    "fixed mask (density 0.01)": dict(density=0.01, select="grad", mask="fixed"),
    "accumulated (density 0.01)": dict(density=0.01, select="accumulated"),
    "accumulate_steps=4 (density 0.01)": dict(density=0.01, select="grad", accumulate_steps=4),
}


def state_bytes_case(transformer):
    def case(ctx):
        shapes = transformer_shapes(**transformer)
        n = numel(shapes)
        records = []
        for mode, extra in STATE_MODES.items():
            fields = dict(bench="state_bytes", mode=mode, numel=n, n_tensors=len(shapes))
            params = make_tensors(shapes, ctx["device"])
            try:
                if extra is None:
                    opt = torch.optim.AdamW(params, **ADAMW_ARGS)
                else:
                    opt = incrkern.optim.AdamW(params, **ADAMW_ARGS, **extra)
                with torch.no_grad():
                    for _ in range(extra.get("accumulate_steps", 1) * 2 if extra else 2):
                        opt.step()
                nbytes = common.state_bytes(opt)
                records.append(dict(fields, available=True, state_bytes=nbytes,
                                    bytes_per_param=nbytes / n))
            except Exception as exc:  # noqa: BLE001
                records.append(unavailable(common.failure(exc), **fields))
            del params
        return records
    case.label = "state bytes"
    return case


# ----------------------------------------------------------------------------------


def cases(sizes):
    """Every kernel case for a Sizes, in the order they run."""
    sets = sizes.shape_sets()
    out = []
    for kind in ("sgd", "adamw"):
        for name, shapes in sets.items():
            out.append(dense_step_case(kind, name, shapes))
        for dtype in (torch.bfloat16, torch.float16):
            out.append(dense_step_case(kind, "one_tensor", sets["one_tensor"], dtype))
    for n in sizes.select_sizes:
        for frac in sizes.select_fracs:
            out.append(topk_case(n, frac))
    for scope in ("tensor", "global"):
        for frac in sizes.select_fracs:
            out.append(select_case(scope, sizes.select_shapes(), frac))
    for name, shapes in sets.items():
        out.append(sparse_step_case(name, shapes, sizes.densities))
    for name, shapes in sets.items():
        for with_sq in (False, True):
            out.append(accumulate_case(name, shapes, with_sq))
    out.append(state_bytes_case(sizes.state_transformer))
    return out


def _with_reference_spread(records):
    """Adds to every figure its reference's max/min sample ratio, so a table can tell a
    speedup measured against a disturbed reference."""
    refs = [r for r in records if r.get("available") and r.get("impl") == r.get("reference")
            and "min_s" in r]
    for rec in records:
        for ref in refs:
            if ref["reference"] == rec.get("reference") and all(
                    ref.get(key) == rec.get(key) for key in
                    ("bench", "optimizer", "shapes", "n", "k", "scope", "sq")
                    if not (rec["bench"] == "sparse_step" and key == "k")):
                rec["reference_spread"] = ref["max_s"] / ref["min_s"]
    return records


def sizes_summary(sizes):
    """The cases' sizes, and the cache they were taken from, for the report."""
    return dict(sizes.cache or {}, one_tensor=sizes.one_tensor,
                many=[sizes.many_count, sizes.many_numel],
                transformer=numel(sizes.shape_sets()["transformer"]),
                select=list(sizes.select_sizes), select_transformer=numel(sizes.select_shapes()))


def run(sizes, device, progress=None):
    """Runs every kernel case; returns {"copy_bandwidth": ..., "records": [...]}.

    The copy bandwidth is measured before every case (others may share the machine);
    fractions of it are taken against the best of those measurements, the most the
    machine was seen to copy in this run."""
    ctx = {"device": torch.device(device), "sizes": sizes}
    probe = common.CopyProbe(sizes.copy_numel, device)
    probe.measure(warmup=2, repeats=5)
    records = []
    case_seconds = {}
    all_cases = cases(sizes)
    bar = progress(total=len(all_cases), desc="kernels") if progress else None
    for case in all_cases:
        if bar:
            bar.set_postfix_str(case.label)
        probe.measure()
        ctx["roofline_bps"] = probe.best
        t0 = time.perf_counter()
        records.extend(_with_reference_spread(case(ctx)))
        case_seconds[case.label] = time.perf_counter() - t0
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    probe.measure(warmup=1, repeats=5)
    roofline = probe.best
    for rec in records:
        if rec.get("available") and "bytes" in rec and "median_s" in rec:
            rec["frac_copy_bw"] = rec["bytes"] / rec["median_s"] / roofline
    samples = [s["bytes_per_s"] for s in probe.samples]
    best_add = probe.best_add
    probe.close()
    return {
        "mode": sizes.name,
        "sizes": sizes_summary(sizes),
        "copy_bandwidth": {"numel": sizes.copy_numel, "roofline_bytes_per_s": roofline,
                           "median_bytes_per_s": sorted(samples)[len(samples) // 2],
                           "min_bytes_per_s": min(samples), "measurements": len(samples),
                           "samples_bytes_per_s": samples,
                           "add_bytes_per_s": best_add,
                           "note": "measured before every case; fractions use the best"},
        "case_seconds": case_seconds,
        "records": records,
    }
