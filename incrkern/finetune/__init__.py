"""Sparse fine-tuning: calibrated masks (FISH, SIFT), optimizers over given masks,
the optimizer step inside backward, and sparse deltas on disk.

    masks = fish_mask(model, batches, loss_fn, density=0.01)
    opt = incrkern.optim.AdamW(model.parameters(), mask=masks)
    ... train ...
    save_delta(model, base_state_dict, "delta.safetensors")
"""
from .backward import OptimizerInBackward, optimizer_in_backward
from .delta import apply_delta, delta_nbytes, load_delta, make_delta, save_delta
from .masks import fish_mask, gradient_scores, mask_density, random_mask, sift_mask, top_mask

__all__ = ["fish_mask", "sift_mask", "random_mask", "gradient_scores", "top_mask",
           "mask_density", "OptimizerInBackward", "optimizer_in_backward", "make_delta",
           "save_delta", "load_delta", "apply_delta", "delta_nbytes"]
