"""A DDP communication hook that sends only the k largest entries of each gradient.

For each bucket DDP hands over, every rank:
  1. forms the compensated gradient u = g + r (r: its fp32 residual of what it has
     not sent yet; with momentum correction u = r + v, v = m v + g a local velocity);
  2. chooses per tensor the k_i = ceil(density * numel_i) largest |u| (incrkern.ops.select);
  3. keeps the rest in r (r = u with the sent positions cleared);
  4. packs the chosen values (fp32) and their int32 positions in the flat bucket into
     one buffer and all-gathers it (k = sum k_i is the same on every rank, as
     all-gather needs);
  5. when the gather completes, writes into the bucket the sum of every rank's pairs
     divided by the world size.
The first `start_iter` iterations all-reduce the dense gradient instead (DDP rebuilds
its buckets after the first iteration, so a residual kept before then would belong to
a bucket that no longer exists), and so does any bucket for which the all-gather
would move more bytes than an all-reduce (see `allgather_bytes`, `allreduce_bytes`).
"""
import math
import warnings

import torch
import torch.distributed as dist

from .. import ops

TOPK_CHOICES = ("exact", "approx")


def allgather_bytes(k, world_size):
    """Bytes one rank sends in a ring all-gather of k (fp32 value, int32 index) pairs
    from every rank: it forwards the W - 1 other ranks' 8k-byte blocks."""
    return (world_size - 1) * 8 * k


def allreduce_bytes(numel, element_size, world_size):
    """Bytes one rank sends in a ring all-reduce of `numel` elements: a reduce-scatter
    and an all-gather, each W - 1 chunks of 1/W of the tensor."""
    return round(2 * (world_size - 1) * numel * element_size / world_size)


class TopKState:
    """The hook's settings and memory, one per DDP model.

    density: fraction in (0, 1] of each gradient tensor sent per iteration.
    start_iter: iterations of plain all-reduce before compression starts (>= 2 with
        error feedback: DDP rebuilds its buckets after the first iteration).
    topk: "exact" (the k largest |u|, ties to the lowest index) or "approx" (a sampled
        threshold; the count is then trimmed or padded to k, which all-gather needs).
    error_feedback: keep what was not sent in an fp32 residual per bucket (4 bytes
        per gradient element) and add it to the next gradient. Off: it is dropped.
    momentum_correction, momentum: Deep Gradient Compression's local velocity
        v = momentum * v + g, accumulated into the residual, and cleared where sent
        (momentum factor masking); pair it with an optimizer without momentum.

    Counters: `iter` (iterations seen), `bytes_sent` (bytes this rank sent in the last
    completed iteration, by the ring model of allgather_bytes / allreduce_bytes),
    `total_bytes_sent`.
    """

    def __init__(self, process_group=None, density=0.01, start_iter=10, topk="exact",
                 error_feedback=True, momentum_correction=False, momentum=0.9):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or \
                not 0.0 < density <= 1.0:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        if not isinstance(topk, str) or topk not in TOPK_CHOICES:
            raise ValueError(f"topk must be one of {', '.join(map(repr, TOPK_CHOICES))}, "
                             f"got {topk!r}")
        if momentum_correction and not error_feedback:
            raise ValueError("momentum_correction=True needs error_feedback=True: the "
                             "velocity is accumulated into the residual")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or \
                not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if error_feedback and start_iter < 2:
            raise ValueError(f"start_iter must be >= 2 with error feedback, got {start_iter}: "
                             "DDP's first iteration runs on provisional buckets, rebuilt "
                             "after it (torch's PowerSGD hook asks the same)")
        self.process_group = process_group
        self.density = float(density)
        self.start_iter = start_iter
        self.topk = topk
        self.error_feedback = bool(error_feedback)
        self.momentum_correction = bool(momentum_correction)
        self.momentum = float(momentum)
        self.iter = 0
        self.bytes_sent = 0
        self.total_bytes_sent = 0
        self._bytes_this_iter = 0
        self._warned_fallback = False
        # Error-feedback memory: one fp32 flat tensor per bucket (bucket index -> tensor),
        # laid out as the bucket. A parameter's slice is found by its key, the order in
        # which the hook first saw it (DDP's first iteration: the same in a resumed run),
        # so that when DDP rebuilds its buckets (after its first iteration, or in a new
        # DDP model) every parameter's residual moves to its new place.
        self.residuals = {}
        self.velocities = {}
        self._param_keys = {}   # Parameter -> key
        self._layouts = {}      # bucket index -> ((key, offset, numel), ...)
        self._where = {}        # key -> (bucket index, offset, numel)
        self._loose = {"residual": {}, "velocity": {}}   # key -> slice in no bucket now

    # --- memory -----------------------------------------------------------------------

    def _stores(self):
        stores = {"residual": self.residuals}
        if self.momentum_correction:
            stores["velocity"] = self.velocities
        return stores

    def _layout(self, bucket, offsets):
        keys = [self._param_keys.setdefault(p, len(self._param_keys))
                for p in bucket.parameters()]
        return tuple((key, o, n) for key, (o, n) in zip(keys, offsets))

    def _memory(self, index, layout, numel, device):
        """(residual, velocity or None) of bucket `index`; re-laid out from where each
        parameter's slice was (zero for a parameter not seen before) when the bucket's
        parameters changed."""
        if self._layouts.get(index) != layout:
            self._relayout(index, layout, numel, device)
        return self.residuals[index], self.velocities.get(index)

    def _relayout(self, index, layout, numel, device):
        stores = self._stores()
        fresh = {name: torch.zeros(numel, dtype=torch.float32, device=device)
                 for name in stores}
        for key, offset, n in layout:
            source = self._where.get(key)
            for name, store in stores.items():
                if source is not None:
                    b, o, m = source
                    piece = store[b][o:o + m]
                else:
                    piece = self._loose[name].pop(key, None)
                if piece is not None and piece.numel() == n:
                    fresh[name][offset:offset + n].copy_(piece)
        # Parameters that left this bucket and were not taken yet by another one.
        keys = {key for key, _, _ in layout}
        for key, offset, n in self._layouts.get(index, ()):
            if key not in keys and self._where.get(key) == (index, offset, n):
                for name, store in stores.items():
                    self._loose[name][key] = store[index][offset:offset + n].clone()
                del self._where[key]
        for key, offset, n in layout:
            self._where[key] = (index, offset, n)
        for name, store in stores.items():
            store[index] = fresh[name]
        self._layouts[index] = layout

    def state_dict(self):
        """Iteration and, per parameter key, the residual and velocity (cloned); the
        settings and the process group are not included."""
        saved = {name: {key: t.clone() for key, t in self._loose[name].items()}
                 for name in self._stores()}
        for name, store in self._stores().items():
            for key, (b, o, n) in self._where.items():
                saved[name][key] = store[b][o:o + n].clone()
        return {"iter": self.iter, "residuals": saved["residual"],
                "velocities": saved.get("velocity", {}),
                "total_bytes_sent": self.total_bytes_sent}

    def load_state_dict(self, state_dict):
        """Restores a state_dict() into a state that has not yet run with its new DDP
        model (the keys are given again in the order the hook first sees the
        parameters)."""
        missing = {"iter", "residuals", "velocities"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict lacks {', '.join(sorted(missing))}")
        residuals, velocities = state_dict["residuals"], state_dict["velocities"]
        for name, saved in (("residuals", residuals), ("velocities", velocities)):
            for key, t in saved.items():
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                    raise ValueError(f"state_dict {name}[{key}] must be an fp32 tensor")
        if self.momentum_correction and set(velocities) != set(residuals):
            raise ValueError("state_dict has no velocity for some residuals (saved without "
                             "momentum_correction?)")
        self.iter = int(state_dict["iter"])
        self.total_bytes_sent = int(state_dict.get("total_bytes_sent", 0))
        self.residuals, self.velocities = {}, {}
        self._param_keys, self._layouts, self._where = {}, {}, {}
        self._loose = {"residual": {int(k): t.detach().clone() for k, t in residuals.items()},
                       "velocity": {int(k): t.detach().clone() for k, t in velocities.items()}
                       if self.momentum_correction else {}}

    # --- counters -----------------------------------------------------------------------

    def _count(self, bucket, nbytes):
        self._bytes_this_iter += nbytes
        if bucket.is_last():
            self.iter += 1
            self.bytes_sent = self._bytes_this_iter
            self.total_bytes_sent += self._bytes_this_iter
            self._bytes_this_iter = 0


def _on_failure(what, index):
    def wrap(fut):
        try:
            return fut.value()
        except Exception as e:  # a rank died, the group timed out, ...
            raise RuntimeError(f"incrkern topk_hook: the {what} of bucket {index} failed "
                               f"(did a rank exit or time out?): {e}") from e
    return wrap


def _allreduce(group, world_size, buffer, index):
    buffer.div_(world_size)   # first, as torch's allreduce_hook does, against fp16 overflow
    work = dist.all_reduce(buffer, group=group, async_op=True)
    check = _on_failure("all-reduce", index)
    return work.get_future().then(lambda fut: check(fut)[0])


def _choose(state, parts, ks):
    """Per tensor: positions (int64, into the tensor) of exactly min(k_i, chosen)
    entries; approx selections that overshoot k_i are trimmed to their k_i largest."""
    chosen = ops.select(parts, ks, score="grad", approx=state.topk == "approx",
                        validate=False)
    if state.topk == "approx":
        for i, (part, idx, k) in enumerate(zip(parts, chosen, ks)):
            if idx.numel() > k:
                chosen[i] = idx[ops.topk(part[idx].abs(), k)]
    return chosen


def _sum_gathered(gathered, world_size, k, numel):
    """The sum, in fp32, of every rank's k (value, position) pairs as the all-gather
    packed them (per rank: k values as int32 bits, then k positions), added rank by
    rank in rank order, so that every rank computes the same bits. One index_add_ a
    rank: a rank's positions are distinct (save padding zeros at position 0), so no two
    additions of one call meet at an element. One call over all the ranks' pairs adds
    on CUDA by atomics, in an order that may differ from rank to rank, and the
    replicas' gradients would then differ in their last bits."""
    pairs = gathered.view(world_size, 2, k)
    total = torch.zeros(numel, dtype=torch.float32, device=gathered.device)
    for rank in range(world_size):
        total.index_add_(0, pairs[rank, 1].long(), pairs[rank, 0].view(torch.float32))
    return total


def _compress(state, group, world_size, bucket, offsets, ks, layout):
    """Selects, updates the memory and starts the all-gather; returns the future."""
    buffer = bucket.buffer()
    numel, k = buffer.numel(), sum(ks)
    grad = buffer.float() if buffer.dtype != torch.float32 else buffer
    if state.error_feedback:
        residual, velocity = state._memory(bucket.index(), layout, numel, buffer.device)
        if state.momentum_correction:
            new_velocity = torch.add(grad, velocity, alpha=state.momentum)
            u = residual + new_velocity
        else:
            u = residual + grad
    else:
        u = grad
    parts = [u[o:o + n] for o, n in offsets]
    chosen = _choose(state, parts, ks)
    flat = torch.cat([idx + o for idx, (o, _) in zip(chosen, offsets)])
    # Padding (approx selections that came short of k) sends the value 0 at position 0.
    packed = torch.zeros(2 * k, dtype=torch.int32, device=buffer.device)
    packed[:flat.numel()] = u[flat].view(torch.int32)
    packed[k:k + flat.numel()] = flat
    if state.error_feedback:
        # r keeps what was not sent; a non-finite u (an overflowed step GradScaler will
        # skip) is sent but leaves r and v as they were.
        # A sum is finite only if every term is (one that overflows takes the slow path
        # for nothing); it costs a tenth of isfinite's pass.
        finite = None if torch.isfinite(u.sum()) else torch.isfinite(u)
        u.index_fill_(0, flat, 0.0)
        state.residuals[bucket.index()] = u if finite is None else \
            torch.where(finite, u, residual)
        if state.momentum_correction:
            new_velocity.index_fill_(0, flat, 0.0)
            state.velocities[bucket.index()] = new_velocity if finite is None else \
                torch.where(finite, new_velocity, velocity)
    gathered = torch.empty(world_size * 2 * k, dtype=torch.int32, device=buffer.device)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = all_gather(gathered, packed, group=group, async_op=True)
    check = _on_failure("all-gather", bucket.index())

    def scatter(fut):
        check(fut)
        buffer.copy_(_sum_gathered(gathered, world_size, k, numel).div_(world_size))
        return buffer

    return work.get_future().then(scatter)


def topk_hook(state, bucket):
    """DDP communication hook: top-k sparsified, error-compensated gradient averaging.
    Register with ``ddp_model.register_comm_hook(TopKState(...), topk_hook)``."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    buffer = bucket.buffer()
    grads = bucket.gradients()
    base = buffer.data_ptr()
    offsets = [((g.data_ptr() - base) // buffer.element_size(), g.numel()) for g in grads]
    layout = state._layout(bucket, offsets)   # from the first iteration on: see _relayout
    dense = allreduce_bytes(buffer.numel(), buffer.element_size(), world_size)
    if state.iter < state.start_iter:
        state._count(bucket, dense)
        return _allreduce(group, world_size, buffer, bucket.index())
    ks = [min(n, math.ceil(state.density * n)) for _, n in offsets]
    sparse = allgather_bytes(sum(ks), world_size)
    if world_size > 1 and sparse >= dense:
        if not state._warned_fallback:
            state._warned_fallback = True
            warnings.warn(f"incrkern topk_hook: at density {state.density} with {world_size} "
                          f"ranks, bucket {bucket.index()} would send {sparse} bytes by "
                          f"all-gather against {dense} by all-reduce; such buckets are "
                          "all-reduced (top-k pays below a density of about 1 / world "
                          "size for fp32 gradients)", stacklevel=2)
        state._count(bucket, dense)
        return _allreduce(group, world_size, buffer, bucket.index())
    state._count(bucket, sparse)
    return _compress(state, group, world_size, bucket, offsets, ks, layout)
