"""Shared pieces of the benchmarks: timing, the copy-bandwidth roofline, the machine's
description and the result records.

Every figure the benchmarks report is measured in the run that reports it: a kernel's
time, the time of its torch counterpart, and the copy bandwidth it is compared with.
"""
import datetime
import math
import os
import platform
import re
import statistics
import time

import torch

import incrkern

# Bytes an implementation must move at least, per element (docs/design.md, "Bytes").
BYTES_ADAMW = 28      # read p, g, m, v; write p, m, v
BYTES_SGD_MOMENTUM = 20  # read p, g, buf; write p, buf
# 16-bit params and grads, the state in fp32 (as incrkern keeps it; torch's fused
# optimizers keep it in the param's dtype, 14 and 10).
BYTES_ADAMW_16BIT = 22
BYTES_SGD_MOMENTUM_16BIT = 14
BYTES_ACCUMULATE = 12  # read acc, g; write acc
BYTES_ACCUMULATE_SQ = 20  # read acc, sq, g; write acc, sq
BYTES_SELECT_PASS = 4  # read one fp32 score per scanned element (one pass, a lower bound)
LINES_ADAMW = 7  # lines of p, g, m, v read and of p, m, v written per touched line


def sparse_step_bytes(shapes, density, device):
    """Bytes a sparse AdamW step must move at least (docs/design.md, "Bytes"): one read
    of every score for the selection, and the memory lines its chosen elements fall
    in, not 28 bytes each.
    Memory moves whole lines (64-byte cache lines on a CPU, 32-byte sectors on a GPU),
    and k random positions of n touch about (n / e) (1 - (1 - k / n)^e) lines of e
    elements: at density 0.01 and fp32 that is 15% of a CPU's lines, 7.7% of a GPU's."""
    line = 32 if torch.device(device).type == "cuda" else 64
    per_line = line // 4
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if n == 0:
            continue
        k = min(n, max(1, math.ceil(density * n)))
        lines = math.ceil(n / per_line)
        total += lines * (1.0 - (1.0 - k / n) ** per_line) * line * LINES_ADAMW
        total += BYTES_SELECT_PASS * n
    return total


# ----------------------------------------------------------------------------------
# timing


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, *, device="cpu", warmup=2, repeats=5, min_time_s=0.0, max_time_s=None,
            min_repeats=3, max_repeats=50):
    """Runs fn `warmup` times untimed, then times one call per sample: `repeats` samples,
    more (up to `max_repeats`) while they add up to less than `min_time_s`, so a short
    kernel gets enough samples that one descheduled call does not move the median; fewer
    (down to `min_repeats`) once they add up to more than `max_time_s`, so a slow
    baseline does not eat the time budget.

    CPU: time.perf_counter around the call. CUDA: a pair of events around the call on
    the current stream, read after a synchronize. Returns the median, min and max in
    seconds and the number of samples.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    while len(samples) < max_repeats:
        n, total = len(samples), sum(samples)
        if n >= repeats and total >= min_time_s:
            break
        if max_time_s is not None and n >= min_repeats and total >= max_time_s:
            break
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "repeats": len(samples)}


def measure_pair(fn, reference, *, device="cpu", warmup=2, repeats=5, min_time_s=0.0,
                 max_time_s=None, min_repeats=3, max_repeats=50):
    """measure() of fn and of `reference` taking turns, one call each per round, with
    measure()'s rule for the number of rounds (on the two calls' time together): a
    shared machine whose bandwidth drifts between rows moves both alike, so their
    ratio holds. Returns (fn's timing, reference's timing)."""
    return measure_turns([fn, reference], device=device, warmup=warmup, repeats=repeats,
                         min_time_s=min_time_s, max_time_s=max_time_s,
                         min_repeats=min_repeats, max_repeats=max_repeats)


def measure_turns(fns, *, device="cpu", warmup=2, repeats=5, min_time_s=0.0, max_time_s=None,
                  min_repeats=3, max_repeats=50):
    """measure_pair for any number of calls: one call of each per round. Returns their
    timings in order."""
    device = torch.device(device)
    for _ in range(warmup):
        for f in fns:
            f()
    synchronize(device)
    samples = tuple([] for _ in fns)
    while len(samples[0]) < max_repeats:
        n, total = len(samples[0]), sum(sum(t) for t in samples)
        if n >= repeats and total >= min_time_s:
            break
        if max_time_s is not None and n >= min_repeats and total >= max_time_s:
            break
        for f, out in zip(fns, samples):
            out.append(measure(f, device=device, warmup=0, repeats=1, min_repeats=1,
                               max_repeats=1)["median_s"])
    return tuple({"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                  "repeats": len(t)} for t in samples)


class CopyProbe:
    """Measures the copy bandwidth: bytes/s of a large `dst.copy_(src)` (fp32), counting
    the bytes read plus written. It keeps its two buffers, so it can be measured again
    between benchmarks without paying for new pages; `best` is the highest median seen,
    the roofline every fraction of copy bandwidth is taken against.

    With `add=True` it also times `dst.add_(src)` (12 bytes per element: it reads the
    line it writes, so a CPU pays no read for ownership on top), reported beside the copy
    as a second, informational figure."""

    def __init__(self, numel, device="cpu", add=True):
        self.device = torch.device(device)
        self.src = torch.randn(numel, device=self.device)
        self.dst = torch.empty_like(self.src)
        self.nbytes = 2 * self.src.numel() * self.src.element_size()
        self.add = add
        self.samples = []
        self.add_samples = []

    def measure(self, warmup=1, repeats=3):
        timing = measure(lambda: self.dst.copy_(self.src), device=self.device, warmup=warmup,
                         repeats=repeats)
        sample = {"numel": self.src.numel(), "bytes": self.nbytes,
                  "bytes_per_s": self.nbytes / timing["median_s"], **timing}
        self.samples.append(sample)
        if self.add:
            timing = measure(lambda: self.dst.add_(self.src, alpha=1e-6), device=self.device,
                             warmup=warmup, repeats=repeats)
            self.add_samples.append(1.5 * self.nbytes / timing["median_s"])
        return sample

    @property
    def best(self):
        return max(s["bytes_per_s"] for s in self.samples)

    @property
    def best_add(self):
        return max(self.add_samples) if self.add_samples else None

    def close(self):
        self.src = self.dst = None


def copy_bandwidth(numel, *, device="cpu", warmup=2, repeats=7):
    """One measurement of the copy bandwidth (see CopyProbe)."""
    probe = CopyProbe(numel, device, add=False)
    sample = probe.measure(warmup=warmup, repeats=repeats)
    probe.close()
    return sample


# ----------------------------------------------------------------------------------
# the machine


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cache_sizes():
    """{'L2': '1024K', 'L3': '32768K', ...} of cpu0, from sysfs (empty where unknown)."""
    sizes = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(base, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, entry, "size")) as f:
                size = f.read().strip()
            if kind != "Instruction":
                sizes[f"L{level}"] = size
    except OSError:
        pass
    return sizes


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device):
    """A short file-name-safe tag: 'cpu-amd-epyc', 'cuda-nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    name = device_name(device).lower()
    name = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", "", name)
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-")
    return f"{device.type}-{name}" if name else device.type


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def memory_bytes(device):
    """The memory a benchmark's tensors live in: a GPU's, else the machine's physical
    memory (None when neither tells)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(device):
    device = torch.device(device)
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_caches": cpu_cache_sizes(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "incrkern": incrkern.__version__,
        "build": {k: v for k, v in incrkern.build_info().items()
                  if k in ("cuda_kernels", "cuda_kernels_loaded", "extension_loaded",
                           "load_error", "cuda_archs", "nvcc", "cxx")},
        "load_average": _load_average(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["torch_cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------------
# optimizer state


def state_bytes(opt):
    """Bytes of every tensor in opt.state (nested dicts and lists included)."""
    seen = set()

    def walk(value):
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(s) for s in opt.state.values())


# ----------------------------------------------------------------------------------
# records


def failure(exc, context=""):
    """The reason of a record whose implementation raised: 'failed: <type>: <message>'."""
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"failed{context}: {type(exc).__name__}: {text}"


def unavailable(reason, **fields):
    """The record of an implementation that could not be measured (it raised)."""
    return {**fields, "available": False, "reason": reason}


def figure(timing, *, nbytes, roofline_bps, reference_s=None, **fields):
    """A kernel figure: the timing, speedup over the torch reference measured in the
    same run (reference time / this time; 1.0 for the reference itself), achieved bytes/s
    with `nbytes` counted as in docs/design.md ("Bytes"), and its fraction of the copy
    bandwidth."""
    median = timing["median_s"]
    bps = nbytes / median if median > 0 else float("nan")
    return {
        **fields,
        "available": True,
        **timing,
        "bytes": int(nbytes),
        "gb_per_s": bps / 1e9,
        "frac_copy_bw": bps / roofline_bps if roofline_bps else float("nan"),
        "speedup_vs_ref": (reference_s / median) if reference_s else None,
    }


def finite_positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
