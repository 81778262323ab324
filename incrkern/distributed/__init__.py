"""Top-k gradient compression with error feedback for DistributedDataParallel.

    from incrkern.distributed import TopKState, topk_hook
    ddp_model.register_comm_hook(TopKState(density=0.01), topk_hook)
"""
from .topk import TopKState, topk_hook, allgather_bytes, allreduce_bytes

__all__ = ["TopKState", "topk_hook", "allgather_bytes", "allreduce_bytes"]
