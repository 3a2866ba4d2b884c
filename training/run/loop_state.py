"""The training loop's state (`LoopState`), what a checkpoint's training_state.pt records of it (with the optimizer,
LR schedule, grad scaler and every RNG), and `restore`, which puts a checkpoint back into a starting run.
The checkpoint folders themselves: training/run/checkpoints.py.
"""

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lora.layer import load_lora_state_dict
from lora.text_encoders import is_text_encoder_name, load_text_encoder_lora_state_dict
from training.run.checkpoints import Checkpoint


@dataclass
class LoopState:
    """Where the training loop stands."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # optimizer steps of `epoch` already trained
    micro_step: int = 0  # micro-batches done in all (streamed shards' noise is keyed by it)
    last_loss: float = math.nan
    nonfinite_steps: int = 0  # skipped steps in all
    best_score: float = math.inf  # --keep_best: the lowest score so far, and its step (-1: none yet)
    best_step: int = -1


def training_state(loop: LoopState, optimizer, scheduler, scaler, data_fingerprint: str) -> dict:
    """training_state.pt's contents: plain tensors and values only (it loads with weights_only=True)."""
    return {**asdict(loop), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "grad_scaler": scaler.state_dict(), "rng": capture_rng(),
            "data_fingerprint": data_fingerprint}


def restore(checkpoint: Checkpoint, denoiser, optimizer, scheduler, scaler, ema, schedule,
            steps_per_epoch: int | None, text_encoder=None) -> LoopState:
    """Put a checkpoint's LoRA (and EMA) weights, optimizer, LR schedule, grad scaler and RNG states back;
    return where its loop stood. `schedule(step)` is this run's LR multiplier (--max_train_steps may differ).
    `text_encoder`: the run's text encoder when its LoRA trains (--train_text_encoder; it is in the checkpoint
    too), else None."""
    st = checkpoint.state
    load_lora_state_dict(denoiser, {k: v for k, v in checkpoint.lora.items() if not is_text_encoder_name(k)})
    if text_encoder is not None:
        load_text_encoder_lora_state_dict(text_encoder,
                                          {k: v for k, v in checkpoint.lora.items() if is_text_encoder_name(k)})
    if ema is not None:
        ema.load_state_dict(checkpoint.ema)
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["lr_scheduler"])
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)  # the same value when the length is unchanged
    scaler.load_state_dict(st["grad_scaler"])
    restore_rng(st["rng"])
    loop = LoopState(st["step"], st["epoch"], st["position"], st["micro_step"], st["last_loss"], st["nonfinite_steps"],
                     st.get("best_score", math.inf), st.get("best_step", -1))
    if steps_per_epoch is not None and loop.position >= steps_per_epoch:  # saved at an epoch's end
        loop.epoch, loop.position = loop.epoch + 1, 0
    return loop


def capture_rng() -> dict:
    """Every global RNG state (LoRA dropout draws from torch's), as tensors/ints/floats for weights_only loading."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                             has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
