"""Drop-in torch.optim optimizers with incremental (sparse) updates.

Every optimizer takes torch's arguments plus, per param group:
  density          fraction of each tensor's (or the group's) elements updated per step
  select           how they are chosen: "grad", "grad_sq", "weight", "accumulated", "random"
  scope            "tensor" (k per tensor) or "global" (k over the param group)
  topk             "exact" or "approx" selection
  accumulate_steps apply one update every n step() calls, with the mean gradient
  mask             "dynamic" (reselect every update), "fixed" (once), or N (every N updates);
                   the constructor also takes {param: positions}: a fixed mask given
                   (see IncrementalOptimizer.set_mask and incrkern.finetune)
  bias_correction  Adam: "tensor" (the tensor's update count) or "element" (per element)
  fisher_beta      EMA factor of g^2 for select="grad_sq"
"""
from .adam import Adam, AdamW
from .base import IncrementalOptimizer
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "IncrementalOptimizer"]
