"""The optimizer of the LoRA parameters and its learning-rate schedule.

  adamw               torch.optim.AdamW (Loshchilov & Hutter 2019)
  adamw8bit           bitsandbytes' 8-bit AdamW (Dettmers et al. 2022): less optimizer memory, CUDA only
  prodigy             prodigyopt's Prodigy (Mishchenko & Defazio 2023): estimates its own step size; lr 1.0
  adamw_schedulefree  schedulefree's AdamW (Defazio et al. 2024): no LR schedule (its own warmup); the weights to
                      evaluate and save (x) differ from those it trains (y): `eval_weights` swaps them in
  adafactor           transformers' Adafactor (Shazeer & Stern 2018) at a fixed learning rate, factored state

The schedule is a multiplier of the peak learning rate per optimizer step: linear warmup, then constant, linear
decay to 0, or cosine decay to 0 over the run's length.
"""

import math
from contextlib import contextmanager

import torch

# optimizer -> (the module it needs, the command that installs it); None: a dependency of the trainer
OPTIMIZERS = {"adamw": None, "adamw8bit": ("bitsandbytes", "pip install bitsandbytes"),
              "prodigy": ("prodigyopt", "pip install -e .[recipes]"),
              "adamw_schedulefree": ("schedulefree", "pip install -e .[recipes]"), "adafactor": None}


def make_optimizer(params, opt) -> torch.optim.Optimizer:
    """The optimizer of `opt.optimizer` (the run's OptimizerSettings) over `params` (tensors, or torch param groups:
    the text encoders' LoRA has its own lr) (training/config.py has checked its package is there)."""
    betas, lr = (opt.adam_beta1, opt.adam_beta2), opt.learning_rate
    if opt.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=opt.adam_epsilon, weight_decay=opt.weight_decay)
    if opt.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, betas=betas, eps=opt.adam_epsilon, weight_decay=opt.weight_decay,
                       d_coef=opt.prodigy_d_coef, use_bias_correction=opt.prodigy_use_bias_correction,
                       safeguard_warmup=opt.prodigy_safeguard_warmup)
    if opt.optimizer == "adamw_schedulefree":
        from training.loop.schedule_free import AdamWScheduleFree

        optimizer = AdamWScheduleFree(params, lr=lr, betas=betas, eps=opt.adam_epsilon,
                                      weight_decay=opt.weight_decay, warmup_steps=opt.warmup_steps)
        optimizer.train()
        return optimizer
    if opt.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, eps=(1e-30, 1e-3), weight_decay=opt.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    tensors = [p for group in params for p in group["params"]] if isinstance(params[0], dict) else params
    fused = {"fused": True} if all(p.is_cuda for p in tensors) else {}  # a GPU: one kernel for every LoRA tensor
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=opt.adam_epsilon, weight_decay=opt.weight_decay,
                             **fused)


@contextmanager
def eval_weights(optimizer):
    """Within the block the parameters hold the weights to evaluate and save: schedule-free's x (its `eval()`),
    then its training weights y again, bit for bit. Other optimizers train the weights they evaluate."""
    if not hasattr(optimizer, "eval"):  # only schedule-free optimizers have train/eval modes
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def lr_schedule(opt, total: int):
    """`step -> multiplier` of this run (`opt`: its OptimizerSettings): schedule-free warms up inside the optimizer
    and has no schedule."""
    if opt.optimizer == "adamw_schedulefree":
        return constant
    return lambda step: lr_multiplier(step, opt.warmup_steps, total, opt.lr_scheduler)


def constant(step: int) -> float:
    return 1.0


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
