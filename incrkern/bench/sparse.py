"""The sparse-step benchmark: `incrkern.optim.AdamW(density=d).step()` against
`torch.optim.AdamW(fused=True).step()` on the same params and grads, in the same run,
on real gradients (a pretrained encoder, a model trained from scratch) and on
random-normal ones, with every case sized from the last-level cache.

Sizes. Every case's working set (AdamW: p, g, m, v in fp32, 16 bytes per element) is
at least CACHE_FACTOR times the last-level cache (the CPU's L3, a GPU's L2), so that
neither the dense step nor the chosen lines of a sparse one are served from a cache
between steps. A real model's parameter list is repeated (each copy its own params,
grads and state) until it is that large.

The bound next to each sparse row is the least traffic a step at that density can
have: one read of the score source (|g|: 4 bytes per element; for select=
"accumulated", the residual update r += g and its read: 12 bytes per element), plus,
for every memory line (64 bytes on a CPU, 32-byte sectors on a GPU) that holds a
chosen element, LINES_PER_TOUCHED_LINE line transfers: p, m and v each read and
written. g's line (r's for "accumulated") is not counted again: the score pass has
read it, and a step that updates as it selects need not read it twice.

One case runs in bf16 (params and grads; what a bf16 fine-tune hands the optimizer):
torch's fused AdamW then keeps its state in bf16, incrkern in fp32. Its score read is
2 bytes an element (10 for "accumulated": the residual is fp32), its p lines hold 32
elements and its m and v lines 16, each counted where a chosen element falls; it has
twice the elements of the fp32 cases, so that its working set (p, g, m, v in bf16, 8
bytes an element) is as large. The lines are
counted from the positions the step actually chooses (exact top-k of the real scores),
so clustered real gradients, which touch fewer lines than random ones, get a smaller
bound. "of bound" is the time that bound takes at the copy bandwidth measured in the
same run, divided by the measured time: 100% would be a step that moves nothing it
does not have to, at copy speed.

Beside the per-tensor rows, rows with scope="global" (the k largest over the
concatenation of the case's tensors) at global_densities; their lines are counted
from the global selection's positions.
"""
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

import incrkern
from . import common, gradients
from .common import BYTES_ADAMW, measure
from .kernels import release
from .shapes import (CACHE_FACTOR, most_elements, numel, transformer_at_least,
                     transformer_shapes)

ADAMW_ARGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
BYTES_PER_ELEMENT = 16    # AdamW's working set: p, g, m, v in fp32
LINE_BYTES = {"cpu": 64, "cuda": 32}
LINES_PER_TOUCHED_LINE = 6  # p, m, v read and written (g's line is in the score read)
STATE_BYTES = 4             # incrkern's m and v (and a residual): fp32 for every param dtype
RESIDUAL_BYTES = 8          # select="accumulated": r read and written besides g's read
FALLBACK_LLC = 32 * 2 ** 20  # when neither sysfs nor sysconf tells
MANY_NUMEL = 10_000          # the size of each tensor of the "many small tensors" case
# The most the sparse part holds at once per element of a case, against
# shapes.MEMORY_SHARE of the machine's memory: the copy probe's source and destination
# (16 bytes) for the whole run, and a case's params, grads, both optimizers' state, a
# residual, the chosen positions, for the real cases the model that made the
# gradients, and what the heap keeps of the cases before (bench/README.md, "The
# benchmark's memory"). A machine whose cache asks for more gets smaller cases, and
# the report says so.
PEAK_BYTES_PER_ELEMENT = 88
REFERENCE = "torch AdamW fused (dense)"


# ----------------------------------------------------------------------------------
# the last-level cache


def parse_size(text):
    """'32768K' / '1M' / '512' (sysfs cache sizes) -> bytes; None if unreadable."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20,
                                  "G": 2 ** 30}[match.group(2).upper()]


def llc_bytes(device="cpu", caches=None, sysconf=os.sysconf):
    """(bytes, where it was read) of the last-level cache of `device`: a GPU's L2
    (torch's device properties), else the highest cache level sysfs lists for cpu0
    (`caches`: common.cpu_cache_sizes() by default), else sysconf's L3/L2 size, else
    FALLBACK_LLC."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        size = getattr(props, "L2_cache_size", None)
        if size:
            return int(size), "CUDA L2_cache_size"
        return FALLBACK_LLC, "fallback (no L2_cache_size in the device properties)"
    caches = common.cpu_cache_sizes() if caches is None else caches
    for level in sorted(caches, key=lambda name: int(name[1:]) if name[1:].isdigit() else 0,
                        reverse=True):
        size = parse_size(caches[level])
        if size:
            return size, f"sysfs cpu0 {level}"
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = sysconf(name)
        except (ValueError, OSError):
            continue
        if size and size > 0:
            return int(size), f"sysconf {name}"
    return FALLBACK_LLC, "fallback (no cache size found)"


def working_set_numel(llc, factor=CACHE_FACTOR):
    """Elements whose AdamW working set is `factor` times `llc` bytes."""
    return math.ceil(factor * llc / BYTES_PER_ELEMENT)


def memory_capped_numel(wanted, memory_bytes):
    """`wanted` elements, or fewer where shapes.MEMORY_SHARE of `memory_bytes` (None: no
    limit) would not hold a case of that size at its peak (PEAK_BYTES_PER_ELEMENT)."""
    return max(1, min(wanted, most_elements(memory_bytes, PEAK_BYTES_PER_ELEMENT)))


# ----------------------------------------------------------------------------------
# memory lines


def touched_lines(tensors, indices, line_bytes, element_size=None):
    """Distinct memory lines of `line_bytes` holding a chosen element, summed over the
    tensors: indices[i] are flat positions into tensors[i] (where each tensor starts
    inside its first line is taken from its address). With `element_size`: the lines
    of a line-aligned tensor of that element size and the same shape (an optimizer's
    fp32 state beside 16-bit params)."""
    total = 0
    for t, idx in zip(tensors, indices):
        if idx is None or idx.numel() == 0:
            continue
        size = t.element_size() if element_size is None else element_size
        start = (t.data_ptr() % line_bytes) // size if element_size is None else 0
        lines = torch.div(idx.reshape(-1).long() + start, line_bytes // size,
                          rounding_mode="floor")
        total += int(torch.unique_consecutive(lines.sort().values).numel())
    return total


def total_lines(tensors, line_bytes):
    return sum(math.ceil(((t.data_ptr() % line_bytes) + t.numel() * t.element_size())
                         / line_bytes) for t in tensors if t.numel())


def bound_bytes(numel, lines, line_bytes, select, grad_bytes=4, state_lines=None):
    """The least bytes of a sparse AdamW step (see the module docstring): `lines` of
    p (and g), `state_lines` of m and of v (None: as many as p's, as in fp32)."""
    score = grad_bytes + (RESIDUAL_BYTES if select == "accumulated" else 0)
    state_lines = lines if state_lines is None else state_lines
    return score * numel + 2 * (lines + 2 * state_lines) * line_bytes


# ----------------------------------------------------------------------------------
# sizes per mode


@dataclass
class SparseSizes:
    """What differs between --quick, --full and the smoke test."""
    name: str
    densities: tuple = (0.1, 0.01, 0.001)
    accumulated_density: float = 0.01
    global_densities: tuple = (0.01, 0.1)  # select="grad", exact, scope="global"
    warmup: int = 2             # steps before timing (the state exists and is warm)
    repeats: int = 5
    min_time_s: float = 0.1
    max_time_s: float = 1.0
    fixed_numel: int = None     # None: from the last-level cache
    minilm: dict = field(default_factory=lambda: dict(batch=48, seq_len=64))
    charlm: dict = field(default_factory=lambda: dict(steps=150))
    cache: bool = True           # keep the real gradients between runs


SPARSE_SIZES = {
    "full": SparseSizes("full", repeats=10, min_time_s=0.5, max_time_s=5.0,
                        charlm=dict(steps=600)),
    "quick": SparseSizes("quick"),
    # seconds: the smoke test only; no pretrained model, a small model trained 3 steps
    "tiny": SparseSizes("tiny", densities=(0.1, 0.01), global_densities=(0.01,), repeats=2,
                        min_time_s=0.0, max_time_s=0.0, fixed_numel=40_000, minilm=None,
                        charlm=dict(steps=3, width=16, layers=1, context=16, batch=4,
                                    text_bytes=50_000), cache=False),
}


def rows(sizes):
    """(select, density, topk, scope) of every timed incrkern row."""
    out = [("grad", d, topk, "tensor") for d in sizes.densities for topk in ("exact", "approx")]
    out += [("accumulated", sizes.accumulated_density, topk, "tensor")
            for topk in ("exact", "approx")]
    out += [("grad", d, "exact", "global") for d in sizes.global_densities]
    return out


# ----------------------------------------------------------------------------------
# cases: (weights, grads, description) of each


@dataclass
class Case:
    name: str
    source: str
    weights: list = None
    grads: list = None
    meta: dict = field(default_factory=dict)
    reason: str = None   # why it is not available
    dtype: torch.dtype = torch.float32  # the params' and grads' in the timed steps


def real_case(name, source, options, target, cache, dtype=torch.float32):
    if options is None:
        return Case(name, source, reason="not run in this mode", dtype=dtype)
    try:
        gset = gradients.load(source, None if cache else False, **options)
    except ImportError as exc:
        return Case(name, source, reason=str(exc), dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - the other cases still run
        return Case(name, source, reason=common.failure(exc), dtype=dtype)
    weights, grads, copies = gradients.tile(gset, target)
    return Case(name, source, weights, grads, dict(gset.meta, copies=copies,
                                                   model_numel=gset.numel), dtype=dtype)


def random_case(name, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return Case(name, "random normal", weights, grads, dict(copies=1))


def transformer_for(target):
    """The BERT-style parameter list (12 layers, 30522 words) of the smallest hidden
    width, a multiple of 32, with at least `target` elements."""
    config = transformer_at_least(dict(hidden=32), target)
    return transformer_shapes(**config), config["hidden"]


def transformer_case(target, fixed):
    if fixed:
        return Case("random transformer list", "random normal", reason="not run in this mode")
    shapes, hidden = transformer_for(target)
    case = random_case("random transformer list", shapes)
    case.meta["model"] = f"random normal, BERT-style list, 12 layers, hidden {hidden}"
    return case


def build_cases(sizes, target, target_16bit=None):
    """Every case's builder, in run order (built one at a time: they are large).
    `target_16bit`: the bf16 case's elements (default twice `target`: the same bytes)."""
    many = max(1, math.ceil(target / MANY_NUMEL))
    target_16bit = 2 * target if target_16bit is None else target_16bit
    return [
        ("pretrained MiniLM-L6", lambda: real_case(
            "pretrained MiniLM-L6", "minilm", sizes.minilm, target, sizes.cache)),
        ("char transformer from scratch", lambda: real_case(
            "char transformer from scratch", "charlm", sizes.charlm, target, sizes.cache)),
        ("random one tensor", lambda: random_case("random one tensor", [(target,)])),
        ("random many tensors", lambda: random_case(
            "random many tensors", [(MANY_NUMEL,)] * many)),
        ("random transformer list", lambda: transformer_case(target,
                                                             sizes.fixed_numel is not None)),
        # last: the fp32 cases keep the order, and the heap, of the runs before it
        ("pretrained MiniLM-L6, bf16", lambda: real_case(
            "pretrained MiniLM-L6, bf16", "minilm", sizes.minilm, target_16bit, sizes.cache,
            dtype=torch.bfloat16)),
    ]


# ----------------------------------------------------------------------------------
# timing


def _stepper(opt):
    def step():
        with torch.no_grad():
            opt.step()
    return step


def _time_steps(opt, sizes, device, reference=None):
    """The timing of opt's step; with `reference` (the dense optimizer), the two timed
    taking turns: (timing, the reference's timing, error)."""
    limits = dict(device=device, warmup=max(2, sizes.warmup), repeats=sizes.repeats,
                  min_time_s=sizes.min_time_s, max_time_s=sizes.max_time_s,
                  min_repeats=min(3, sizes.repeats))
    try:
        if reference is None:
            return measure(_stepper(opt), **limits), None, None
        return (*common.measure_pair(_stepper(opt), _stepper(reference), **limits), None)
    except Exception as exc:  # noqa: BLE001 - report, do not hide or crash
        return None, None, common.failure(exc)


def _chosen_positions(grads, density, select, scope, opt):
    """The exact top-k positions (per tensor, or over their concatenation) the next step
    of `opt` chooses: of |g|, or for "accumulated" of |r + g| with r the residual the
    warm-up left."""
    if select == "accumulated":
        scores = [opt.state[p]["residual"] + g for p, g in zip(opt.param_groups[0]["params"],
                                                               grads)]
    else:
        scores = grads
    with torch.no_grad():
        return incrkern.ops.select(scores, density, score="grad", scope=scope)


def run_case(case, sizes, device):
    """Records of one case: the dense torch reference, timed alone before the rows,
    then one record per row, each row timed taking turns with the reference (its
    ratio is to the reference's steps of the same minutes: a shared machine's
    bandwidth drifts between rows)."""
    device = torch.device(device)
    line = LINE_BYTES.get(device.type, 64)
    params = []
    for w, g in zip(case.weights, case.grads):
        p = torch.nn.Parameter(w.to(device, case.dtype))
        p.grad = g.to(device, case.dtype)
        params.append(p)
    case.weights = case.grads = None
    grads = [p.grad for p in params]
    n = sum(p.numel() for p in params)
    size = params[0].element_size()
    lines_all = total_lines(grads, line)
    base = dict(bench="sparse", case=case.name, source=case.source, numel=n,
                n_tensors=len(params), copies=case.meta.get("copies", 1),
                dtype=str(case.dtype).removeprefix("torch."),
                working_set_bytes=4 * size * n, total_lines=lines_all)

    dense = torch.optim.AdamW(params, **ADAMW_ARGS, fused=True)
    ref, _, ref_error = _time_steps(dense, sizes, device)
    records = []
    for select, density, topk, scope in rows(sizes):
        fields = dict(base, impl=f"incrkern AdamW {topk}", select=select, density=density,
                      topk=topk, scope=scope)
        try:
            opt = incrkern.optim.AdamW(params, **ADAMW_ARGS, density=density, select=select,
                                       topk=topk, scope=scope)
            timing, paired, error = _time_steps(opt, sizes, device, reference=dense)
            positions = None if timing is None else _chosen_positions(grads, density, select,
                                                                      scope, opt)
        except Exception as exc:  # noqa: BLE001
            timing, error = None, common.failure(exc)
        opt = None
        release()
        if timing is None:
            records.append(common.unavailable(error, **fields))
            continue
        lines = touched_lines(grads, positions, line)
        state_lines = (lines if size == STATE_BYTES else
                       touched_lines(grads, positions, line, element_size=STATE_BYTES))
        nbytes = bound_bytes(n, lines, line, select, grad_bytes=size, state_lines=state_lines)
        records.append(dict(fields, available=True, **timing,
                            k=sum(int(i.numel()) for i in positions), touched_lines=lines,
                            state_lines=state_lines,
                            lines_fraction=lines / lines_all, bound_bytes=nbytes,
                            reference_s=paired["median_s"],
                            speedup_vs_ref=paired["median_s"] / timing["median_s"],
                            # fastest against fastest: a step's cost when nothing else runs
                            speedup_of_min=paired["min_s"] / timing["min_s"]))
        del positions
    del dense
    dense_bytes = BYTES_ADAMW * n * size // 4  # torch keeps its state in the params' dtype
    if ref is None:
        head = common.unavailable(ref_error, impl=REFERENCE, **base)
    else:
        head = dict(base, impl=REFERENCE, available=True, select=None, density=1.0, topk=None,
                    **ref, speedup_vs_ref=1.0, speedup_of_min=1.0, k=n, touched_lines=lines_all,
                    lines_fraction=1.0, bound_bytes=dense_bytes)
    del params, grads
    release()
    return [head] + records


def run(mode, device, progress=None, out=None):
    """Runs every case; returns {"llc": ..., "cases": [...], "records": [...], ...}.
    The printed line names the cache read and the sizes chosen from it."""
    sizes = SPARSE_SIZES[mode]
    device = torch.device(device)
    llc, llc_source = llc_bytes(device)
    wanted = sizes.fixed_numel or working_set_numel(llc)
    memory = common.memory_bytes(device)
    target = wanted if sizes.fixed_numel else memory_capped_numel(wanted, memory)
    # The bf16 case: as many bytes of p, g, m and v, twice the elements, within memory.
    target_16bit = 2 * target if sizes.fixed_numel else memory_capped_numel(2 * wanted, memory)
    probe = common.CopyProbe(probe_numel(target), device, add=False)
    probe.measure(warmup=2, repeats=5)
    builders = build_cases(sizes, target, target_16bit)
    bar = progress(total=len(builders), desc="sparse") if progress else None
    cases, records, seconds = [], [], {}
    for name, build in builders:
        t0 = time.perf_counter()
        case = build()
        info = dict(name=case.name, source=case.source, available=case.reason is None,
                    reason=case.reason, build_s=time.perf_counter() - t0, **case.meta)
        info["dtype"] = str(case.dtype).removeprefix("torch.")
        if case.reason is None:
            info.update(numel=sum(w.numel() for w in case.weights),
                        n_tensors=len(case.weights))
            info["working_set_bytes"] = (4 * case.dtype.itemsize) * info["numel"]
            probe.measure()  # between cases: the best of all is the roofline
            records += run_case(case, sizes, device)
        cases.append(info)
        seconds[name] = time.perf_counter() - t0
        del case
        release()
        if bar:
            bar.update(1)
    probe.measure(warmup=1, repeats=5)
    bandwidth = probe.best
    for rec in records:
        if rec.get("available"):
            rec["bound_s"] = rec["bound_bytes"] / bandwidth
            rec["frac_of_bound"] = rec["bound_s"] / rec["median_s"]
    probe.close()
    if bar:
        bar.close()
    return {
        "mode": sizes.name,
        "llc_bytes": llc, "llc_source": llc_source, "cache_factor": CACHE_FACTOR,
        "target_numel": target, "sized_from_cache": sizes.fixed_numel is None,
        "wanted_numel": wanted, "memory_capped": target < wanted,
        "target_numel_16bit": target_16bit,
        "memory_capped_16bit": sizes.fixed_numel is None and target_16bit < 2 * wanted,
        "line_bytes": LINE_BYTES.get(device.type, 64),
        "lines_per_touched_line": LINES_PER_TOUCHED_LINE,
        "copy_bandwidth": {"numel": probe_numel(target),
                           "roofline_bytes_per_s": bandwidth,
                           "samples_bytes_per_s": [s["bytes_per_s"] for s in probe.samples]},
        "cases": cases, "case_seconds": seconds, "records": records,
    }


def probe_numel(target):
    """Copy-probe elements for a case size: src and dst (8 bytes per element) as large
    as the case's working set, so the copy is not served from the cache either."""
    return max(1, BYTES_PER_ELEMENT * target // 8)


def sizes_line(sparse):
    """One line naming the cache read and the sizes chosen from it."""
    llc = sparse["llc_bytes"]
    text = (f"last-level cache {llc / 2 ** 20:.3g} MiB ({sparse['llc_source']}); ")
    if sparse["sized_from_cache"] and sparse.get("memory_capped"):
        text += (f"every case {sparse['target_numel'] / 1e6:.3g}M elements, capped by the "
                 f"machine's memory ({sparse['cache_factor']}x the cache would take "
                 f"{sparse['wanted_numel'] / 1e6:.3g}M): the figures may include the cache")
    elif sparse["sized_from_cache"]:
        text += (f"every case at least {sparse['cache_factor']}x it: >= "
                 f"{sparse['target_numel'] / 1e6:.3g}M elements (16 B each: p, g, m, v)")
    if sparse["sized_from_cache"] and "target_numel_16bit" in sparse:
        n16 = sparse["target_numel_16bit"] / 1e6
        text += (f"; the bf16 case >= {n16:.3g}M elements (8 B each), capped by memory"
                 if sparse.get("memory_capped_16bit") else
                 f"; the bf16 case >= {n16:.3g}M elements (8 B each)")
    else:
        text += f"fixed test size {sparse['target_numel']} elements"
    return text
