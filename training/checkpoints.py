"""Training checkpoints: one folder per save, written whole or not at all.

    output_dir/checkpoints/step_000500/
        lora.safetensors          LoRA weights (our diffusers-path keys, fp32)
        ema.safetensors           EMA of the LoRA weights, when --use_ema
        training_state.pt         optimizer, LR scheduler, grad scaler, step/epoch/position, RNG states
        config.yaml               the resolved run config
        COMPLETE                  written last: a folder without it is never used

A checkpoint is written into a temporary folder beside its final name, every file fsync'd, then
renamed into place, so a crash mid-save never leaves a folder that looks complete. The state file
holds only tensors and plain Python values and loads with `torch.load(weights_only=True)`.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SCHEMA_VERSION = 1
MARKER = "COMPLETE"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(output_dir: Path, step: int, lora: dict, state: dict, config_yaml: str,
                    ema: dict | None = None) -> Path:
    """Write checkpoints/step_{step:06d}/ atomically and return its path. Refuses non-finite tensors."""
    bad = [k for k, v in {**lora, **(ema or {})}.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"not saving a checkpoint at step {step}: non-finite values in {bad[0]}")
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in lora.items()}, tmp / "lora.safetensors")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        torch.save({"schema_version": SCHEMA_VERSION, **state}, tmp / "training_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / MARKER).write_text(f"schema_version: {SCHEMA_VERSION}\nstep: {step}\n")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # a stale folder of the same step (e.g. from before a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())
