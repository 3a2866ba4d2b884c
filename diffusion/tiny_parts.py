"""What the three tiny models (sdxl/tiny.py, sd3/tiny.py, flux/tiny.py) build the same way: seeded random
modules that leave the caller's RNG alone, the tiny VAE with the scale and shift its pretraining measured, and
text encoders loaded from the shipped weights (T5's tied token embedding stored once)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file


def seeded(seed: int, make):
    """`make()` with the global RNG seeded to `seed`, the caller's RNG state left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def tiny_vae(config: dict, seed: int, weights: Path | None = None) -> AutoencoderKL:
    """The tiny VAE of `config`: random from `seed`, or the weights of `weights/vae.safetensors`, whose metadata
    carries the scaling_factor (and shift_factor, 16-channel families) measured when it was trained."""
    vae = seeded(seed, lambda: AutoencoderKL(**config))
    if weights is not None:
        path = Path(weights) / "vae.safetensors"
        vae.load_state_dict(load_file(path), strict=True)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        vae.register_to_config(**{k: float(meta[k]) for k in ("scaling_factor", "shift_factor") if k in meta})
    return vae


def load_text_encoder_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a shipped text encoder's weights into `model` (strict). T5 files store the token embedding once as
    `shared.weight`, which the encoder's `embed_tokens` is tied to."""
    sd = load_file(path)
    if "shared.weight" in sd:
        sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    model.load_state_dict(sd, strict=True)
