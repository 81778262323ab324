"""Sparse deltas: a fine-tuned model stored as the few positions that moved.

A delta maps each tensor name of a model's state_dict to the flat positions where
the fine-tuned tensor differs from the base (or the positions of a given mask) and
the fine-tuned values there. On disk it is a safetensors file with, per tensor,
`<name>.indices` (int32 where positions fit, else int64) and `<name>.values` (the
tensor's dtype), and the shapes in the metadata: about density * (4 + 4) bytes per
fp32 parameter plus the header.
"""
import json
import os

import torch

FORMAT = "incrkern-delta"
VERSION = "1"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("sparse deltas need the safetensors package: pip install "
                          "safetensors (or incrkern[finetune])") from e
    return safetensors.torch


def _state(model_or_state, name):
    if isinstance(model_or_state, torch.nn.Module):
        return model_or_state.state_dict(keep_vars=True)
    if isinstance(model_or_state, dict):
        return model_or_state
    raise TypeError(f"{name} must be a torch.nn.Module or a state_dict, got "
                    f"{type(model_or_state).__name__}")


def _changed_positions(new, old):
    """Flat positions where `new` differs from `old` (NaN equal to NaN)."""
    new, old = new.reshape(-1), old.reshape(-1)
    differ = new != old
    if new.is_floating_point():
        differ &= ~(new.isnan() & old.isnan())
    return differ.nonzero().squeeze(1)


def _mask_names(model, masks):
    """{state_dict name: positions} of masks keyed by param or by name."""
    if masks is None:
        return {}
    by_id = {}
    if isinstance(model, torch.nn.Module):
        by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    out = {}
    for key, idx in masks.items():
        name = key if isinstance(key, str) else by_id.get(id(key))
        if name is None:
            raise ValueError("masks has a key that is neither a name nor a param of model")
        out[name] = idx
    return out


def make_delta(model, base, masks=None):
    """{name: (int positions, values, shape)} of `model` against `base` (a module or
    a state_dict with the same names and shapes). Floating tensors only; a tensor
    in `masks` (keyed by param or by name) is stored at its mask's positions, any
    other at the positions that differ; tensors with nothing to store are left out."""
    new, old = _state(model, "model"), _state(base, "base")
    by_name = _mask_names(model, masks)
    unknown = set(by_name) - set(new)
    if unknown:
        raise ValueError(f"masks names tensors the model lacks: {sorted(unknown)}")
    delta = {}
    with torch.no_grad():
        for name, t in new.items():
            if not t.is_floating_point():
                continue
            if name not in old:
                raise ValueError(f"base has no tensor {name!r}")
            if old[name].shape != t.shape:
                raise ValueError(f"{name}: base has shape {tuple(old[name].shape)}, model "
                                 f"{tuple(t.shape)}")
            if name in by_name:
                idx = by_name[name].to(device=t.device, dtype=torch.int64).sort().values
            else:
                idx = _changed_positions(t.detach(), old[name].detach().to(t.device))
            if idx.numel() == 0:
                continue
            if t.numel() < 2 ** 31:
                idx = idx.to(torch.int32)
            values = t.detach().reshape(-1).index_select(0, idx.long())
            delta[name] = (idx.cpu(), values.cpu(), tuple(t.shape))
    return delta


def save_delta(model, base, path, masks=None):
    """Writes make_delta(model, base, masks) to `path` (safetensors); returns the
    file's size in bytes."""
    st = _safetensors()
    delta = make_delta(model, base, masks)
    tensors = {}
    for name, (idx, values, _) in delta.items():
        tensors[name + ".indices"] = idx.contiguous()
        tensors[name + ".values"] = values.contiguous()
    shapes = {name: list(shape) for name, (_, _, shape) in delta.items()}
    st.save_file(tensors, path, metadata={"format": FORMAT, "version": VERSION,
                                          "shapes": json.dumps(shapes)})
    return os.path.getsize(path)


def load_delta(path):
    """The delta saved at `path`: {name: (positions, values, shape)}."""
    st = _safetensors()
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an incrkern delta (format "
                         f"{metadata.get('format')!r})")
    tensors = st.load_file(path)
    shapes = json.loads(metadata["shapes"])
    return {name: (tensors[name + ".indices"], tensors[name + ".values"], tuple(shape))
            for name, shape in shapes.items()}


def apply_delta(model, delta):
    """Writes the delta's values into `model`'s tensors (a module or a state_dict)
    at their positions, in place. Every entry is checked (name, shape, dtype,
    positions) before any tensor is written. Returns the model."""
    if isinstance(delta, (str, os.PathLike)):
        delta = load_delta(delta)
    state = _state(model, "model")
    for name, (idx, values, shape) in delta.items():
        if name not in state:
            raise ValueError(f"delta: the model has no tensor {name!r}")
        t = state[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"delta: {name} has shape {tuple(shape)}, the model's "
                             f"{tuple(t.shape)}")
        if values.dtype != t.dtype:
            raise ValueError(f"delta: {name} values are {values.dtype}, the model's "
                             f"{t.dtype}")
        if idx.dim() != 1 or values.shape != idx.shape:
            raise ValueError(f"delta: {name} needs 1-D positions and values of one length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t.numel()):
            raise ValueError(f"delta: {name} has positions outside [0, {t.numel()})")
    with torch.no_grad():
        for name, (idx, values, _) in delta.items():
            t = state[name]
            idx, values = idx.to(device=t.device, dtype=torch.int64), values.to(t.device)
            if t.is_contiguous():
                t.view(-1).index_copy_(0, idx, values)
            else:
                t.copy_(t.reshape(-1).index_copy(0, idx, values).view(t.shape))
    return model


def delta_nbytes(delta_or_path):
    """Bytes of a delta: the file's size for a path, else its tensors' bytes."""
    if isinstance(delta_or_path, (str, os.PathLike)):
        return os.path.getsize(delta_or_path)
    return sum(idx.numel() * idx.element_size() + v.numel() * v.element_size()
               for idx, v, _ in delta_or_path.values())
