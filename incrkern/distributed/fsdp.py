"""incrkern optimizers on FSDP2 models (torch.distributed.fsdp.fully_shard).

The kernels take plain tensors, not DTensors, so the optimizer runs on each rank's
local shards: views of the shards' storage, handed their local gradients before
each step. Selection (`density`, scope="tensor") is then per shard: each rank updates
the ceil(density * shard numel) elements it chooses in its own part of each tensor.
"""
import torch
from torch.distributed.tensor import DTensor


class ShardedOptimizer:
    """`optimizer_class(local shards, **options)` driven from the FSDP2 parameters.

        model = fully_shard(model)
        opt = ShardedOptimizer(model.parameters(), incrkern.optim.AdamW, lr=1e-3,
                               density=0.01)
        loss.backward(); opt.step(); opt.zero_grad()

    `optimizer` is the wrapped optimizer; its state_dict holds this rank's shards'
    state. Make it after fully_shard and after moving the model: a shard whose
    storage moved later raises at the next step.
    """

    def __init__(self, params, optimizer_class, **options):
        self.params = list(params)
        for i, p in enumerate(self.params):
            if not isinstance(p, DTensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a DTensor: give "
                                "the parameters of a fully_shard model (or use the "
                                "optimizer directly)")
        self.shards = [p.to_local().detach() for p in self.params]
        self.optimizer = optimizer_class(self.shards, **options)

    def step(self):
        for i, (p, shard) in enumerate(zip(self.params, self.shards)):
            if p.to_local().data_ptr() != shard.data_ptr():
                raise RuntimeError(f"params[{i}]'s local shard moved since the optimizer was "
                                   "made (the model was moved or re-sharded): make it again")
            shard.grad = None if p.grad is None else p.grad.to_local()
        self.optimizer.step()

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
