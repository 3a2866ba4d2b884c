"""The VAE of every family: a thin fp32 wrapper around diffusers' `AutoencoderKL` (the 8x KL autoencoder of
Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"; SDXL's has 4 latent
channels, SD 3.5's and FLUX.1's 16).

The VAE is diffusers' own by design (docs/ARCHITECTURE.md); this file only fixes the conventions the rest
of the project relies on:
- always fp32: SDXL's original VAE overflows in fp16 (its config says `force_upcast`), and a dtype
  change asked of this module (`.to(torch.bfloat16)`, `.half()`) only moves the device;
- `encode` returns latents already scaled for the UNet, `(z - shift_factor) * scaling_factor`
  (SDXL: shift None, scale 0.13025; SD 3.5: 0.0609, 1.5305; FLUX.1: 0.1159, 0.3611), and `decode` inverts
  it, as diffusers' pipelines do;
- large images decode in tiles with diffusers' `AutoencoderKL.tiled_decode`.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

# Automatic tiling never starts below SDXL's native 1024x1024 px: every SDXL bucket (1024x1024,
# 1536x640, ...) has at most that area and decodes in one exact pass, while a config's smaller
# `sample_size` (madebyollin/sdxl-vae-fp16-fix says 512) would tile, and blur, ordinary images.
MIN_AUTO_TILE = 1024

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"


class LatentVAE(torch.nn.Module):
    """Frozen fp32 `AutoencoderKL`; images in [-1, 1] <-> UNet-scaled latents.

    `tile_size` (image pixels, a multiple of the 8x downsampling) is the tile edge of tiled
    decoding; by default the config's `sample_size` but at least `MIN_AUTO_TILE`. `decode` tiles
    automatically when the latent's area exceeds one tile's, so the memory of a decode stays that
    of one tile-sized image while images up to that area stay exact.
    """

    def __init__(self, vae: AutoencoderKL, tile_size: int | None = None):
        super().__init__()
        cfg = vae.config
        if cfg.latents_mean is not None or cfg.latents_std is not None:
            raise ValueError(
                "this VAE's config has latents_mean/latents_std (a Playground-style latent "
                "normalization); SDXL, SD 3.5 and FLUX.1 VAEs use shift_factor and scaling_factor only"
            )
        self.vae = vae.float().eval().requires_grad_(False)
        self.vae.use_tiling = False  # our `decode` chooses; `encode` never tiles
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # 8
        sample_size = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size
        self.tile_size = tile_size or max(sample_size, MIN_AUTO_TILE)
        if self.tile_size % self.downsample:
            raise ValueError(f"tile_size {self.tile_size} must be a multiple of {self.downsample}")
        self.vae.tile_sample_min_size = self.tile_size  # diffusers' tiled_decode reads these two
        self.vae.tile_latent_min_size = self.tile_size // self.downsample

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", tile_size: int | None = None) -> "LatentVAE":
        """Load from a diffusers model folder (its `vae/`) or a VAE folder; a family's `load_vae` also takes
        single files and the word "tiny"."""
        folder = find_vae_folder(path)
        if (folder / WEIGHTS).is_file():
            variant = None
        elif (folder / WEIGHTS_FP16).is_file():
            variant = "fp16"  # loaded, then cast to fp32 below
        else:
            raise FileNotFoundError(
                f"no {WEIGHTS} (or {WEIGHTS_FP16}) in {folder}: only safetensors weights are loaded; "
                "re-download with ./download_weights.sh or convert the .bin to safetensors"
            )
        vae = AutoencoderKL.from_pretrained(
            folder, variant=variant, use_safetensors=True, local_files_only=True, torch_dtype=torch.float32
        )
        return cls(vae, tile_size=tile_size).to(device)

    @property
    def config(self):
        return self.vae.config

    def _apply(self, fn, recurse=True):
        # Keep the weights fp32 whatever dtype is asked for; only a device move takes effect.
        def keep_fp32(t):
            out = fn(t)
            return t.to(out.device) if t.is_floating_point() and out.dtype != t.dtype else out

        return super()._apply(keep_fp32, recurse)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/8, W/8), fp32."""
        images = images.to(device=self.vae.device, dtype=torch.float32)
        dist = self.vae.encode(images).latent_dist
        z = dist.sample(generator) if sample else dist.mean  # (B, C, H/8, W/8)
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: bool | None = None) -> torch.Tensor:
        """scaled latents (B, C, h, w) -> images (B, 3, 8h, 8w), fp32, nominally in [-1, 1].

        Not clamped, so it equals diffusers' decode; clamp when converting to pixels.
        tile: None = automatic (latent area above one tile), True/False = force.
        """
        z = latents.to(device=self.vae.device, dtype=torch.float32) / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        if tile is None:
            tile = z.shape[-2] * z.shape[-1] > self.vae.tile_latent_min_size**2
        if tile:
            return self.vae.tiled_decode(z).sample
        return self.vae.decode(z).sample


def find_vae_folder(path: str | Path) -> Path:
    """The folder holding the VAE's config.json: `path/vae` or `path` itself."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"VAE path {root} does not exist: pass a diffusers model folder (./download_weights.sh "
            "fetches one), a VAE folder with config.json, or 'tiny'"
        )
    if not root.is_dir():
        raise ValueError(
            f"VAE path {root} is a file: the VAE loads from a diffusers folder (a model folder with "
            "vae/, or a VAE folder with config.json and diffusion_pytorch_model.safetensors)"
        )
    for folder in (root / "vae", root):
        if (folder / "config.json").is_file():
            kind = json.loads((folder / "config.json").read_text()).get("_class_name")
            if kind not in (None, "AutoencoderKL"):
                raise ValueError(f"{folder}/config.json describes a {kind}, not an AutoencoderKL (VAE)")
            return folder
    raise ValueError(
        f"no VAE in {root}: expected {root / 'vae' / 'config.json'} (diffusers model folder) or "
        f"{root / 'config.json'} (VAE folder); pass --vae_model or a complete model folder"
    )
