"""The optimizer of the LoRA parameters and its learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) from torch.optim, or bitsandbytes' 8-bit AdamW (Dettmers et al. 2022) for
less optimizer memory. The schedule is a multiplier of the peak learning rate per optimizer step: linear
warmup, then constant, linear decay to 0, or cosine decay to 0 over the run's length.
"""

import math

import torch


def make_optimizer(params, args) -> torch.optim.Optimizer:
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # optional: checked with a clear message by training/config.py

        cls = bnb.optim.AdamW8bit
        kwargs = {}
    else:  # on a GPU, one fused kernel for every LoRA tensor instead of a few per tensor
        cls, kwargs = torch.optim.AdamW, {"fused": True} if all(p.is_cuda for p in params) else {}
    return cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
               weight_decay=args.weight_decay, **kwargs)


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup over `warmup` steps, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
