"""torch.distributed.checkpoint for ShardedOptimizer: saved on one world size or
mesh, resumed on another.

The dict given to dcp.save, and the one dcp.load fills (every key a string, as DCP
writes its paths):
  param_groups: the wrapped optimizer's groups (options and counters, the same on
    every rank: DCP saves them once);
  state.<i>.<name>: params[i]'s state. Tensors of the shard's size (moments,
    accumulators, master weights) as DTensors on the param's mesh with its
    placements: DCP saves each block once and reads into any other sharding the
    parts it covers. Counters ("step", "layer_chosen"), the same on every rank, as
    they are.
  positions.<i>.rank<r>.<name>: the positions rank r's shard keeps ("indices": a
    fixed mask, or mask=N's current one) as flat positions in the full tensor
    ("positions"), and with mask="fixed" the k-long state aligned with them. Their
    sizes differ between ranks and follow the selection, not the sharding, so no
    DTensor holds them: the ranks of one replica save theirs (HSDP's replicas hold
    the same), and every loading rank reads every saved rank's entries and keeps
    those inside its own shard. They cover about `density` of the params, so
    reading them all is cheap.
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from . import fsdp
from ..optim.base import _stored_positions
from ..optim.checks import COMPACT_STATE_KEYS, UNSIZED_STATE_KEYS

# State of the same value on every rank, whatever the shard's size.
_SCALAR_KEYS = tuple(k for k in UNSIZED_STATE_KEYS if k != "indices")


def _local_positions(positions, shape, offset, local_shape):
    """(flat positions in the block, which of `positions` fall inside it)."""
    inside = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    if not shape or positions.numel() == 0:
        return positions.clone(), inside
    coords = torch.unravel_index(positions, tuple(shape))
    local = torch.zeros_like(positions)
    for d, size in enumerate(local_shape):
        c = coords[d] - offset[d]
        inside &= (c >= 0) & (c < size)
        local = local * size + c
    return local[inside], inside


def _saves_positions(p):
    """Whether this rank writes params[i]'s positions: the first replica along every
    mesh dimension the param is replicated on."""
    mesh = p.device_mesh
    return all(mesh.get_local_rank(d) == 0 for d, placement in enumerate(p.placements)
               if isinstance(placement, Replicate))


def _as_dtensor(tensor, p):
    return DTensor.from_local(tensor, p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride(), run_check=False)


def saved_state(opt):
    """ShardedOptimizer.distributed_state_dict(): what dcp.save writes."""
    inner = opt.optimizer.state_dict()
    fixed = {pid for g in inner["param_groups"] if g["mask"] == "fixed" for pid in g["params"]}
    rank = f"rank{dist.get_rank()}"
    state, positions = {}, {}
    for pid, saved in inner["state"].items():
        p, shard = opt.params[pid], opt.shards[pid]
        kept = saved.get("indices")
        compact = kept is not None and pid in fixed
        entry = None
        if kept is not None and _saves_positions(p):
            shape, offset = opt.block(pid)
            entry = {"positions": fsdp._global_positions(kept.long(), shape, offset, 0,
                                                         tuple(shard.shape))}
            positions.setdefault(str(pid), {})[rank] = entry
        mine = state[str(pid)] = {}
        for name, value in saved.items():
            if name == "indices":
                continue
            if compact and name in COMPACT_STATE_KEYS:
                if entry is not None:
                    entry[name] = value
            elif name in _SCALAR_KEYS or not torch.is_tensor(value):
                mine[name] = value
            elif value.numel() != shard.numel():
                raise ValueError(f"params[{pid}]: state {name!r} has {value.numel()} elements, "
                                 f"its shard {shard.numel()}: not a state to reshard")
            else:
                mine[name] = _as_dtensor(value.reshape(shard.shape), p)
    return {"param_groups": inner["param_groups"], "state": state, "positions": positions}


def _param_index(opt, text, where):
    if not text.isdigit() or int(text) >= len(opt.params):
        raise ValueError(f"{where}: {text!r} is not one of the {len(opt.params)} params' "
                         "indices: a checkpoint of another model?")
    return int(text)


def load_template(opt, metadata, key):
    """ShardedOptimizer.distributed_state_dict(metadata, key): empty tensors laid
    out for this rank, of what the checkpoint holds under `key`."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be where the optimizer's dict was saved (a string), "
                         f"got {key!r}")
    prefix = f"{key}."
    items = {fqn[len(prefix):]: item for fqn, item in sorted(metadata.state_dict_metadata.items())
             if fqn.startswith(prefix)}
    if not any(name.startswith("param_groups.") for name in items):
        raise ValueError(f"key: the checkpoint has no {key}.param_groups (saved under another "
                         "key, or not by distributed_state_dict())")
    state, positions = {}, {}
    for name, item in items.items():
        part, _, rest = name.partition(".")
        if part == "state":
            pid, _, state_key = rest.partition(".")
            i = _param_index(opt, pid, f"metadata: {prefix}{name}")
            slot = state.setdefault(pid, {})
            if not isinstance(item, TensorStorageMetadata):
                slot[state_key] = None   # an object: dcp.load replaces it
                continue
            dtype, shard = item.properties.dtype, opt.shards[i]
            if state_key in _SCALAR_KEYS:
                slot[state_key] = torch.empty(item.size, dtype=dtype)
                continue
            p = opt.params[i]
            if tuple(item.size) != tuple(p.shape):
                raise ValueError(f"metadata: {prefix}{name} has shape {tuple(item.size)}, "
                                 f"params[{i}] {tuple(p.shape)}: a checkpoint of another model?")
            slot[state_key] = _as_dtensor(
                torch.empty(shard.shape, dtype=dtype, device=shard.device), p)
        elif part == "positions":
            pid, _, rest = rest.partition(".")
            _param_index(opt, pid, f"metadata: {prefix}{name}")
            saved_rank, _, entry_key = rest.partition(".")
            positions.setdefault(pid, {}).setdefault(saved_rank, {})[entry_key] = torch.empty(
                item.size, dtype=item.properties.dtype)
    return {"param_groups": opt.optimizer.state_dict()["param_groups"], "state": state,
            "positions": positions}


def loaded_state(opt, state_dict):
    """The wrapped optimizer's state_dict for this rank's shards from what dcp.load
    filled in load_template's dict; nothing is changed here."""
    if not isinstance(state_dict, dict) or not {"param_groups", "state"} <= state_dict.keys():
        raise ValueError("state_dict must be the dict of distributed_state_dict(metadata, key) "
                         "filled by dcp.load")
    state = {}
    for pid, saved in state_dict["state"].items():
        i = _param_index(opt, str(pid), "state_dict['state']")
        state[i] = {name: value.to_local() if isinstance(value, DTensor) else value
                    for name, value in saved.items()}
    for pid, ranks in state_dict.get("positions", {}).items():
        i = _param_index(opt, str(pid), "state_dict['positions']")
        shard = opt.shards[i]
        shape, offset = opt.block(i)
        entries = [ranks[r] for r in sorted(ranks)]
        names = sorted({name for e in entries for name in e} - {"positions"})
        if any("positions" not in e or set(e) - {"positions"} != set(names) for e in entries):
            raise ValueError(f"state_dict['positions'][{pid!r}]: every saved rank needs "
                             f"'positions' and the same state, got {[sorted(e) for e in entries]}")
        flat = torch.cat([e["positions"].long() for e in entries])
        total = math.prod(shape)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= total):
            raise ValueError(f"state_dict['positions'][{pid!r}]: positions outside "
                             f"[0, {total}): a checkpoint of another model?")
        local, inside = _local_positions(flat, shape, offset, shard.shape)
        order = local.argsort()
        mine = state.setdefault(i, {})
        mine["indices"] = _stored_positions(local[order], shard)
        for name in names:
            mine[name] = torch.cat([e[name] for e in entries])[inside][order]
    return {"state": state, "param_groups": state_dict["param_groups"]}
