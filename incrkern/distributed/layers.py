"""select="layer" under DistributedDataParallel.

The optimizer draws the layers it trains from torch's global random generator, on
every rank apart; DDP keeps the ranks' params equal only if they all draw the same
layers, that is if every rank's generator is in the same state at each step (the
same torch.manual_seed everywhere, and no rank drawing more random numbers than the
others). A rank that draws apart trains other layers with the same mean gradient:
its params leave the others' without any error. `check_same_layers` finds that out.
"""
import torch
import torch.distributed as dist


def check_same_layers(optimizer, process_group=None):
    """Raises RuntimeError, on every rank, when the ranks of `process_group` (None:
    the whole world) have not drawn the same layers at their last step in some
    select='layer' param group of `optimizer`. A collective: every rank calls it."""
    flags = []
    for group in optimizer.param_groups:
        if group["select"] == "layer":
            for p in group["params"]:
                chosen = optimizer.state.get(p, {}).get("layer_chosen")
                flags.append(-1 if chosen is None else int(chosen))
    mine = torch.tensor(flags, dtype=torch.int64)
    world = dist.get_world_size(process_group)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([mine.numel()]), group=process_group)
    if len({int(n) for n in lengths}) != 1:
        raise RuntimeError("check_same_layers: the ranks' optimizers have different "
                           "numbers of select='layer' params")
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=process_group)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, everyone[0]):
            raise RuntimeError(
                f"check_same_layers: rank {rank} drew other layers than rank 0 at the last "
                "step (its params no longer match): select='layer' needs torch's global "
                "random generator in the same state on every rank (the same "
                "torch.manual_seed everywhere; draw per-rank data from a "
                "torch.Generator of its own)")
