"""The embedded tiny SDXL: a random, SDXL-shaped model small enough for a CPU test.

`python -m sdxl.tiny OUT_DIR` writes it from a fixed seed in diffusers' folder layout (unet/, vae/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, model_index.json), which
diffusers' `StableDiffusionXLPipeline.from_pretrained` also loads. It has SDXL's block structure
(3 levels, DownBlock2D first, cross-attention in levels 2-3, mid block, text_time embedding, 8x VAE)
at small widths, and locally built byte-level CLIP tokenizers, so nothing is downloaded.
`--pretrained_model tiny` anywhere calls `tiny_model_path()`, which builds it once into a cache.

Two builds are byte-identical (fixed seeds, sorted JSON); `TINY_VERSION` names the cache folder
and changes whenever what is written changes.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdxl.unet import SDXLUNet, UNetConfig

TINY_VERSION = 1

# Context 96 = tiny CLIP-L 32 + tiny bigG 64; pooled 32 + 6 time ids * 8 = 80.
TINY_UNET_CONFIG = UNetConfig(
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    num_attention_heads=(2, 4, 8),
    cross_attention_dim=96,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)

# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL into `out_dir` (created; must be empty or absent)."""
    from sdxl.text_encoders import write_tiny_text_encoders
    from sdxl.vae import write_tiny_vae

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = SDXLUNet(TINY_UNET_CONFIG)
    (out_dir / "unet").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              out_dir / "unet" / "diffusion_pytorch_model.safetensors")
    write_json(out_dir / "unet" / "config.json", TINY_UNET_CONFIG.to_diffusers())
    write_tiny_vae(out_dir, seed=seed + 1)
    write_tiny_text_encoders(out_dir, seed=seed + 2)
    write_json(out_dir / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER_CONFIG)
    write_json(out_dir / "model_index.json", MODEL_INDEX)
    return out_dir


def cache_dir() -> Path:
    """Where `tiny` is built: $SDXL_LORA_CACHE, else $XDG_CACHE_HOME/sdxl-lora, else ~/.cache/sdxl-lora."""
    if os.environ.get("SDXL_LORA_CACHE"):
        return Path(os.environ["SDXL_LORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl-lora"


def tiny_model_path() -> Path:
    """The tiny model's folder, built on first use. Built in a temporary folder and renamed into
    place, so a crash or a concurrent process never leaves a half-written model behind."""
    final = cache_dir() / f"tiny-v{TINY_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the tiny random SDXL (diffusers folder layout) to OUT_DIR.")
    p.add_argument("out_dir", type=Path, help="folder to create, e.g. ./weights/tiny-sdxl")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    args = p.parse_args(argv)
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        print(f"error: {args.out_dir} already exists and is not an empty folder; choose a new path", file=sys.stderr)
        return 2
    build(args.out_dir, seed=args.seed)
    print(f"wrote the tiny SDXL to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
