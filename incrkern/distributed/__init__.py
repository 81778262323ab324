"""Top-k gradient compression with error feedback for DistributedDataParallel,
incrkern optimizers on FSDP2's local shards, and a check of select="layer" under DDP.

    from incrkern.distributed import TopKState, topk_hook
    ddp_model.register_comm_hook(TopKState(density=0.01), topk_hook)
"""
from .topk import TopKState, topk_hook, allgather_bytes, allreduce_bytes
from .fsdp import ShardedOptimizer
from .layers import check_same_layers

__all__ = ["TopKState", "topk_hook", "allgather_bytes", "allreduce_bytes", "ShardedOptimizer",
           "check_same_layers"]
