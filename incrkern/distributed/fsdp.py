"""incrkern optimizers on FSDP2 and HSDP models (torch.distributed.fsdp.fully_shard).

The kernels take plain tensors, not DTensors, so the optimizer runs on each rank's
local shards: views of the shards' storage, handed their local gradients before
each step.

scope="tensor": selection is per shard; each rank updates the ceil(density * shard
numel) elements it chooses in its own part of each tensor.

scope="global": the ranks agree on the selection a single process would make on the
whole (unsharded) tensors: the k = ceil(density * total numel) largest scores over
the concatenation of the group's full tensors, ties to the lowest position in that
concatenation. Each rank keys its local scores by their bits (|score| as an
integer: the order of the values, NaN above +inf, -0 equal to +0) and the ranks run
a radix select on the keys: per 8 bits of the key, one all-reduce (SUM) of a
256-bin histogram of the candidates' next digit, which fixes that digit of the k-th
largest key (4 all-reduces for fp32/bf16/fp16 scores, 8 for fp64). Every rank then
takes its elements above that key; of the elements equal to it, the ones of lowest
global position, found the same way (a radix select on the positions, one
all-reduce per 8 bits of the total numel) only when the ties do not all fit.
The all-reduces carry 2 KB each, whatever the model's size; the keys take 8 bytes
per local element while the selection runs. The ranks that agree are those of the
mesh dimension the params are sharded along: all of them under FSDP2; under HSDP
each replica's shard group, every replica choosing the same elements from the same
reduced gradients, with no traffic between replicas.

Checkpoints: fsdp_checkpoint.
"""
import math
from collections.abc import MutableMapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .. import ops
from . import fsdp_checkpoint

try:
    # DTensor's own answer to "which block of the full tensor is this rank's shard";
    # torch has no public one (DCP uses this one). A torch that moves it gets
    # chunk_layout, the same rule for the Shard and Replicate placements
    # scope="global" accepts.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - depends on the torch version
    compute_local_shape_and_global_offset = None

_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS
# The keys of NaN: above +inf's, the same for every NaN (they tie, as in ops.select).
_NAN_KEY32 = 0x7FC00000
_NAN_KEY64 = 0x7FF8000000000000


def chunk_layout(shape, mesh, placements):
    """(local shape, global offset) of this rank's block of a tensor of `shape`: for
    each mesh dimension in turn, Shard(d) cuts what is left of dim d as torch.chunk
    does (ceil(size / mesh size) per rank, the last ranks' blocks short or empty);
    Replicate and Partial keep it whole."""
    local, offset = list(shape), [0] * len(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            d = placement.dim % len(shape)
            rank, world = mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim)
            chunk = -(-local[d] // world)
            start = min(local[d], rank * chunk)
            offset[d] += start
            local[d] = min(local[d], start + chunk) - start
    return tuple(local), tuple(offset)


def shard_layout(shape, mesh, placements):
    """(local shape, global offset) of this rank's shard: torch's own answer where
    this torch has it, else chunk_layout."""
    if compute_local_shape_and_global_offset is None:
        return chunk_layout(shape, mesh, placements)
    local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(local), tuple(offset)


def shard_mesh_dim(params):
    """The one mesh dimension along which every param is sharded (Shard), the params
    being replicated along the others: 0 for FSDP2's (Shard(0),), 1 for HSDP's
    (Replicate(), Shard(0)). A ValueError naming `params` for anything else: the
    ranks that agree on a selection must together hold each tensor once."""
    meshes = {p.device_mesh for p in params}
    if len(meshes) > 1:
        raise ValueError("params: scope='global' needs every param on one device mesh, got "
                         + ", ".join(sorted(str(m) for m in meshes)))
    dims = set()
    for i, p in enumerate(params):
        sharded = [d for d, placement in enumerate(p.placements)
                   if not isinstance(placement, Replicate)]
        if len(sharded) != 1 or not isinstance(p.placements[sharded[0]], Shard):
            raise ValueError(
                f"params[{i}]: scope='global' needs each param sharded (Shard) along one "
                "mesh dimension and replicated along the others, as FSDP2's (Shard(0),) "
                f"or HSDP's (Replicate(), Shard(0)); its placements are {p.placements}")
        dims.add(sharded[0])
    if len(dims) > 1:
        raise ValueError("params: scope='global' needs every param sharded along the same "
                         f"mesh dimension, they are along dimensions {sorted(dims)}")
    return dims.pop() if dims else 0


class _ParamGroup(MutableMapping):
    """A param group of the wrapped optimizer with the DTensor params in place of
    their local shards (what torch.amp.GradScaler reads the gradients from); other
    keys read and write the wrapped group, so that setting "lr" here sets it there."""

    def __init__(self, group, params):
        self._group, self._params = group, params

    def __getitem__(self, key):
        return self._params if key == "params" else self._group[key]

    def __setitem__(self, key, value):
        if key == "params":
            raise KeyError("params: a ShardedOptimizer's params are fixed when it is made")
        self._group[key] = value

    def __delitem__(self, key):
        if key == "params":
            raise KeyError("params: a ShardedOptimizer's params are fixed when it is made")
        del self._group[key]

    def __iter__(self):
        return iter(self._group)

    def __len__(self):
        return len(self._group)


class ShardedOptimizer:
    """`optimizer_class(local shards, **options)` driven from the FSDP2 parameters.

        model = fully_shard(model)        # or fully_shard(model, mesh=...) for HSDP
        opt = ShardedOptimizer(model.parameters(), incrkern.optim.AdamW, lr=1e-3,
                               density=0.01)                  # scope="global" too
        loss.backward(); opt.step(); opt.zero_grad()

    `optimizer` is the wrapped optimizer; its state_dict holds this rank's shards'
    state. `param_groups` are its groups with the DTensor params in place of the
    shards. Make it after fully_shard and after moving the model: a shard whose
    storage moved later raises at the next step.

    select="layer" draws whole tensors by their full sizes, the same on every rank
    (the global random generator in the same state on every rank, as under DDP).

    With scope="global" (see the module's docstring) every rank takes part in each
    step's selection: every rank must step, with the same params having gradients.
    The result is the selection of a one-process optimizer with scope="global" on
    the full tensors, element for element. The params need one device mesh, each
    sharded (Shard) along one mesh dimension, the same for all, and replicated
    (Replicate) along any other: FSDP2's 1-D mesh, or HSDP's 2-D (replicate, shard)
    mesh, where the ranks of each shard group agree on a selection and every replica
    makes the same one from its identical reduced gradients. It needs a score every
    rank can compute on its own (select "grad", "grad_sq", "weight" or
    "accumulated"; not "random"); topk="approx" selects exactly here.

    torch.amp.GradScaler: `scaler.step(opt)` checks the DTensor gradients for
    inf/NaN (DTensor reduces the flag over the mesh, so every rank sees the same
    one) and hands the wrapped optimizer the loss scale and the flag, as it hands
    them to an incrkern optimizer: the kernels unscale as they read, and a flagged
    step changes nothing on any rank.

    Checkpoints with torch.distributed.checkpoint resume on any world size and
    either mesh: `distributed_state_dict()` for dcp.save; to load,
    `distributed_state_dict(metadata, key)` (the checkpoint's metadata and where the
    dict was saved) for a dict of empty tensors laid out for this rank, filled by
    dcp.load and given to `load_distributed_state_dict` (incrkern.distributed.
    fsdp_checkpoint says how the state is laid out). A resumed run continues as the
    uninterrupted one bit for bit where the selection does not depend on the shard
    boundaries: scope="global", or any mask="fixed" once its mask is made;
    scope="tensor" with a mask it remakes selects per shard, so other shards choose
    other elements.
    """

    def __init__(self, params, optimizer_class, **options):
        self.params = list(params)
        for i, p in enumerate(self.params):
            if not isinstance(p, DTensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a DTensor: give "
                                "the parameters of a fully_shard model (or use the "
                                "optimizer directly)")
        self.shards = [p.to_local().detach() for p in self.params]
        self._blocks = {}
        self.optimizer = optimizer_class(self.shards, **options)
        full_numels = {id(shard): p.numel() for p, shard in zip(self.params, self.shards)}
        self.optimizer._layer_numel = lambda shard: full_numels[id(shard)]
        self._param_of = {id(shard): p for p, shard in zip(self.params, self.shards)}
        if any(g["scope"] == "global" for g in self.optimizer.param_groups):
            self._set_up_global_selection()

    @property
    def param_groups(self):
        return [_ParamGroup(g, [self._param_of[id(s)] for s in g["params"]])
                for g in self.optimizer.param_groups]

    @property
    def _step_supports_amp_scaling(self):
        # GradScaler then hands step() the scale and the inf flag (attributes
        # grad_scale, found_inf) instead of unscaling the grads itself: passed on.
        return getattr(self.optimizer, "_step_supports_amp_scaling", False)

    def block(self, i):
        """(full shape, offset of this rank's block in it) of params[i], checked
        against its local shard."""
        if i not in self._blocks:
            p, shard = self.params[i], self.shards[i]
            local_shape, offset = shard_layout(p.shape, p.device_mesh, p.placements)
            if tuple(local_shape) != tuple(shard.shape):
                raise ValueError(f"params[{i}]: its local shard has shape "
                                 f"{tuple(shard.shape)}, its placements {p.placements} "
                                 f"give {tuple(local_shape)}")
            self._blocks[i] = (tuple(p.shape), tuple(offset))
        return self._blocks[i]

    def _set_up_global_selection(self):
        for group in self.optimizer.param_groups:
            if group["scope"] == "global" and group["select"] == "random":
                raise ValueError("scope='global' with select='random' is not supported by "
                                 "ShardedOptimizer: the ranks draw their keys apart")
        dim = shard_mesh_dim(self.params)
        self.process_group = (self.params[0].device_mesh.get_group(dim) if self.params
                              else None)
        # Per local shard: (full shape, offset of the shard's block in it).
        self._layout = {id(shard): self.block(i) for i, shard in enumerate(self.shards)}
        self.optimizer._global_select = self._select_global

    def _select_global(self, group, shards, tensors, score, weights):
        """The optimizer's selection for a scope='global' group: local indices."""
        scores = weights if score == "weight" else tensors
        layouts = [self._layout[id(s)] for s in shards]
        total = sum(math.prod(shape) for shape, _ in layouts)
        k = ops.density_k(float(group["density"]), total)
        return agreed_topk(scores, k, layouts, self.process_group)

    def step(self):
        for i, (p, shard) in enumerate(zip(self.params, self.shards)):
            if p.to_local().data_ptr() != shard.data_ptr():
                raise RuntimeError(f"params[{i}]'s local shard moved since the optimizer was "
                                   "made (the model was moved or re-sharded): make it again")
            shard.grad = None if p.grad is None else p.grad.to_local()
        amp = {name: getattr(self, name) for name in ("grad_scale", "found_inf")
               if name in vars(self)}
        for name, value in amp.items():
            setattr(self.optimizer, name, value)
        try:
            self.optimizer.step()
        finally:
            for name in amp:
                delattr(self.optimizer, name)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=True)   # the shards' grads are only views

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    # -- torch.distributed.checkpoint ----------------------------------------------------

    def distributed_state_dict(self, metadata=None, key=None):
        """For dcp.save: the state laid out to be resharded (fsdp_checkpoint). With
        `metadata` (a checkpoint's, e.g. dcp.FileSystemReader(path).read_metadata())
        and `key` (where the dict was saved in the state_dict given to dcp.save): the
        same structure with empty tensors laid out for this rank, for dcp.load to fill
        in place."""
        if metadata is None:
            return fsdp_checkpoint.saved_state(self)
        return fsdp_checkpoint.load_template(self, metadata, key)

    def load_distributed_state_dict(self, state_dict):
        """Loads what dcp.load filled in `distributed_state_dict(metadata, key)`; a
        state that does not fit raises and changes nothing."""
        self.optimizer.load_state_dict(fsdp_checkpoint.loaded_state(self, state_dict))


def _keys(scores):
    """One int64 key per element of the scores, concatenated, ordered as |score|,
    and the number of bits they use: float64 keys if any score is float64, else
    float32 ones (exact for bf16 and fp16)."""
    wide = any(t.dtype == torch.float64 for t in scores)
    dtype, int_dtype = (torch.float64, torch.int64) if wide else (torch.float32, torch.int32)
    nan_key = _NAN_KEY64 if wide else _NAN_KEY32
    parts = []
    for t in scores:
        magnitude = t.reshape(-1).to(dtype).abs()
        key = magnitude.view(int_dtype).long()
        parts.append(torch.where(torch.isnan(magnitude), nan_key, key))
    if not parts:
        return torch.empty(0, dtype=torch.int64), 31
    return torch.cat(parts), 63 if wide else 31


def agreed_kth_largest(values, k, bits, group):
    """Radix select across the ranks of `group`: (v, larger, equal) where v is the
    k-th largest of every rank's `values` (int64 in [0, 2**bits), 1 <= k <= their
    count), `larger` how many are above v and `equal` how many equal it, over all
    ranks. One all-reduce of 256 counts per 8 bits, the same on every rank."""
    rest, prefix = k, 0
    candidates = values
    for shift in range(_RADIX_BITS * ((bits - 1) // _RADIX_BITS), -1, -_RADIX_BITS):
        digits = (candidates >> shift) & (_BINS - 1)
        counts = torch.bincount(digits, minlength=_BINS)
        dist.all_reduce(counts, group=group)
        at_or_above = counts.flip(0).cumsum(0).flip(0)   # [d]: how many digits are >= d
        digit = int((at_or_above >= rest).nonzero().max())
        rest -= int(at_or_above[digit] - counts[digit])
        prefix = (prefix << _RADIX_BITS) | digit
        candidates = candidates[digits == digit]
    return prefix, k - rest, int(counts[digit])


def _global_positions(local, shape, offset, base, local_shape):
    """Positions in the concatenation of the full tensors of the flat indices `local`
    into a shard of `local_shape`: the block at `offset` of a tensor of `shape` that
    starts at `base` in the concatenation."""
    if not shape:
        return local + base
    coords = torch.unravel_index(local, local_shape)
    position = torch.full_like(local, base)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        position += (coords[d] + offset[d]) * stride
        stride *= shape[d]
    return position


def agreed_topk(scores, k, layouts, group):
    """The k elements of largest |score| over the concatenation of the full tensors,
    ties to the lowest position in it, as indices into this rank's shards.

    scores: this rank's local shards' scores; layouts: per shard (full shape, offset
    of the shard's block in it); k: the count over all ranks. Every rank of `group`
    calls it with its own shards of the same tensors."""
    sizes = [t.numel() for t in scores]
    device = scores[0].device if scores else torch.device("cpu")
    total = sum(math.prod(shape) for shape, _ in layouts)
    if k >= total:
        return [torch.arange(n, device=device) for n in sizes]
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=device) for _ in sizes]
    keys, bits = _keys(scores)
    cut, larger, equal = agreed_kth_largest(keys, k, bits, group)
    chosen = keys > cut
    tied = keys == cut
    take = k - larger
    if take < equal:   # ties left over: the `take` of lowest global position
        tied_at = tied.nonzero().reshape(-1)
        positions = torch.empty_like(tied_at)
        start, base = 0, 0
        for t, (shape, offset), n in zip(scores, layouts, sizes):
            inside = (tied_at >= start) & (tied_at < start + n)
            positions[inside] = _global_positions(tied_at[inside] - start, shape, offset,
                                                  base, tuple(t.shape))
            start, base = start + n, base + math.prod(shape)
        # Lowest positions first: the largest of total - 1 - position.
        reversed_positions = total - 1 - positions
        last, _, _ = agreed_kth_largest(reversed_positions, take,
                                        max(1, (total - 1).bit_length()), group)
        tied = torch.zeros_like(tied)
        tied[tied_at[reversed_positions >= last]] = True
    chosen |= tied
    return [part.nonzero().reshape(-1) for part in torch.split(chosen, sizes)]
