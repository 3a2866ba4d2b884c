"""Turning prompts into images: SDXL base + LoRAs, seeded noise, classifier-free guidance, a sampler.

The counterpart of diffusers' `StableDiffusionXLPipeline.__call__`
(diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py), with the same results for
the same model, LoRA, scheduler, guidance, size and `generator=torch.Generator("cpu").manual_seed(seed)`
(tests/test_inference.py holds them to 3/255 per pixel).

Each image i has its own CPU generator seeded `seeds[i]`; its initial latents are
`torch.randn((1, 4, H/8, W/8), generator=g)` scaled by the sampler's initial sigma, and an ancestral
sampler draws its per-step noise from the same generator (docs/ARCHITECTURE.md, "Seeds"), so any image
can be reproduced alone, with any batch size. An empty negative prompt is SDXL base's zero embedding
(`force_zeros_for_empty_prompt`), a non-empty one is encoded. Micro-conditioning: original size =
target size, crop (0, 0). LoRAs are merged into the fp32 UNet weights, which are then cast once to the
inference dtype; the VAE decodes in fp32, one image at a time (tiled above 1024x1024 px, see sdxl/vae.py).
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.samplers import get_sampler, init_noise_sigma, schedule_from_config
from lora.reading import load_lora
from sdxl.configs import SDXL_SCHEDULER_CONFIG
from sdxl.loading import load_text_encoder, load_unet, load_vae, resolve_model_path

# Defaults of `generate`/`generate_unique_batch` and of generate_images.py (SDXL base's usual settings).
DEFAULTS = {"width": 1024, "height": 1024, "steps": 30, "guidance_scale": 5.0, "sampler": "euler"}


def parse_size(text: str) -> tuple[int, int]:
    """`WxH` (width x height) or `N` (square) -> (width, height); each a positive multiple of 8."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; write WIDTHxHEIGHT (e.g. 1024x768) or one number for a square")
    width, height = int(m[1]), int(m[2] or m[1])
    for side in (width, height):
        if side <= 0 or side % 8:
            lo, hi = max(8, side // 8 * 8), (side // 8 + 1) * 8
            raise ValueError(f"{side} is not a positive multiple of 8 (the VAE downsamples by 8); "
                             f"use e.g. {lo} or {hi}")
    return width, height


@torch.no_grad()
def generate_latents(unet, embeds, pooled, *, seeds, height, width, steps=30, guidance_scale=5.0,
                     sampler="euler", scheduler_config=SDXL_SCHEDULER_CONFIG, neg_embeds=None, neg_pooled=None):
    """embeds (B, 77, ctx), pooled (B, P) -> clean latents (B, 4, height/8, width/8), fp32.

    neg_embeds/neg_pooled: the unconditional inputs of CFG (default: zeros); guidance_scale <= 1 skips CFG."""
    fn, karras = get_sampler(sampler)
    name = sampler.removesuffix("_karras")
    sigmas, timesteps = schedule_from_config(scheduler_config, steps, karras=karras, sampler=name)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    spacing = scheduler_config.get("timestep_spacing", "leading" if name == "ddim" else "linspace")  # as diffusers
    x = torch.cat([torch.randn((1, 4, height // 8, width // 8), generator=g, dtype=torch.float32) for g in generators])
    x = (x * init_noise_sigma(sigmas, name, spacing)).to(embeds.device)  # (B, 4, H/8, W/8)
    b = x.shape[0]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(b, 1)  # (B, 6)
    neg_embeds = torch.zeros_like(embeds) if neg_embeds is None else neg_embeds
    neg_pooled = torch.zeros_like(pooled) if neg_pooled is None else neg_pooled
    dtype = unet.dtype
    cfg = guidance_scale > 1.0  # as diffusers' `do_classifier_free_guidance`
    context = torch.cat([neg_embeds, embeds]) if cfg else embeds  # (2B, 77, ctx) uncond first
    cond = {"text_embeds": torch.cat([neg_pooled, pooled]) if cfg else pooled,
            "time_ids": (time_ids.repeat(2, 1) if cfg else time_ids).to(embeds.device)}
    cond = {k: v.to(dtype) for k, v in cond.items()}
    context = context.to(dtype)

    def model(x_in, t):
        x_in = torch.cat([x_in, x_in]) if cfg else x_in
        pred = unet(x_in.to(dtype), t, context, cond).float()
        if not cfg:
            return pred
        uncond, text = pred.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    return fn(model, x, sigmas.to(x.device), timesteps=timesteps.to(x.device), generators=generators,
              prediction_type=prediction_type)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounded to 8 bits)."""
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def images_to_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """(N, 3, H, W) in [-1, 1] -> one PIL image, `rows` rows of N/rows images."""
    pil = to_pil(images)
    cols = math.ceil(len(pil) / rows)
    w, h = pil[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(pil):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def sample_grid(unet, vae, embeds, pooled, *, images_per_prompt: int, height: int, width: int, steps: int = 20,
                guidance_scale: float = 5.0) -> Image.Image:
    """The sample grid of a training run: one row per prompt (embeds (P, 77, ctx), pooled (P, pooled)), its
    images seeded 0, 1, ..., so grids of successive validations show the same noise turned into pictures."""
    rows = []
    for p in range(embeds.shape[0]):
        n = images_per_prompt
        latents = generate_latents(unet, embeds[p : p + 1].expand(n, -1, -1), pooled[p : p + 1].expand(n, -1),
                                   seeds=list(range(n)), height=height, width=width, steps=steps,
                                   guidance_scale=guidance_scale)
        rows.append(vae.decode(latents))
    return images_to_grid(torch.cat(rows), rows=len(rows))


@torch.no_grad()
def sample_images(unet, vae, embeds, pooled, seeds: list[int], *, height: int, width: int, steps: int = 20,
                  guidance_scale: float = 5.0, batch_size: int = 8) -> list[Image.Image]:
    """One image per (embeds[i] (77, ctx), pooled[i], seeds[i]), `batch_size` at a time, as PIL images: what
    a training run scores (training/loop/scoring.py)."""
    images = []
    for start in range(0, len(seeds), batch_size):
        part = slice(start, start + batch_size)
        latents = generate_latents(unet, embeds[part], pooled[part], seeds=seeds[part], height=height, width=width,
                                   steps=steps, guidance_scale=guidance_scale)
        images += [image for i in range(len(latents)) for image in to_pil(vae.decode(latents[i : i + 1]))]
    return images


def read_scheduler_config(model_path: Path) -> dict:
    """The model folder's scheduler/scheduler_config.json, else SDXL base's (single files carry none)."""
    path = Path(model_path) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(SDXL_SCHEDULER_CONFIG)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}; fix or delete the file (SDXL base's schedule is then used)") from e


class SDXLGenerator:
    """SDXL base (+ merged LoRAs) ready to sample: prompts and seeds in, PIL images out.

        gen = SDXLGenerator.from_pretrained("tiny", loras=[("my_lora.safetensors", 0.8)])
        images = gen.generate("a photo of a cat", 4, seed=0, width=64, height=64, steps=4)
    """

    def __init__(self, unet, text_encoder, vae, scheduler_config: dict | None = None):
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.scheduler_config = dict(scheduler_config or SDXL_SCHEDULER_CONFIG)

    @classmethod
    def from_pretrained(cls, model, vae_model=None, loras=(), device="cpu", dtype=torch.float32) -> "SDXLGenerator":
        """Load SDXL base (a diffusers folder, a single-file .safetensors, or "tiny"), the VAE of `vae_model`
        (default: the model's), and merge each `(path, scale)` of `loras` (any LoRA file `lora.reading.load_lora`
        reads). The UNet and text encoders run in `dtype`, the VAE in fp32."""
        path = resolve_model_path(model)
        # Merged in fp32 (on the CPU, so the device never holds an fp32 UNet), then cast once: one rounding.
        # A LoRA file's text-encoder part goes into the encoders the same way.
        where = dict(dtype=torch.float32, device="cpu") if loras else dict(dtype=dtype, device=device)
        unet, text_encoder = load_unet(path, **where), load_text_encoder(path, **where)
        for lora_path, scale in loras:
            load_lora(unet, lora_path, scale=scale, text_encoder=text_encoder)
        unet, text_encoder = unet.to(device=device, dtype=dtype), text_encoder.to(device=device, dtype=dtype)
        vae = load_vae(resolve_model_path(vae_model) if vae_model else path, device=device)
        return cls(unet, text_encoder, vae, read_scheduler_config(path) if path.is_dir() else None)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode(self, prompts: list[str], negative_prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """(embeds, pooled, neg_embeds, neg_pooled) on the UNet's device; empty negative prompts -> zeros."""
        embeds, pooled = self.text_encoder.encode(list(prompts))  # (B, 77, ctx), (B, P)
        neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        given = [i for i, n in enumerate(negative_prompts) if n]
        if given:
            neg_embeds[given], neg_pooled[given] = self.text_encoder.encode([negative_prompts[i] for i in given])
        return tuple(t.to(self.device) for t in (embeds, pooled, neg_embeds, neg_pooled))

    @torch.no_grad()
    def generate_unique_batch(self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None,
                              *, width=DEFAULTS["width"], height=DEFAULTS["height"], steps=DEFAULTS["steps"],
                              guidance_scale=DEFAULTS["guidance_scale"], sampler=DEFAULTS["sampler"]) -> list:
        """One image per (prompt, seed, negative prompt): image i depends on its own three only, so a batch
        equals the same images made one by one (up to the UNet's batched float rounding)."""
        if len(prompts) != len(seeds) or (negative_prompts is not None and len(negative_prompts) != len(prompts)):
            raise ValueError(f"need one seed and one negative prompt per prompt; got {len(prompts)} prompts, "
                             f"{len(seeds)} seeds, {len(negative_prompts or prompts)} negative prompts")
        parse_size(f"{width}x{height}")
        embeds, pooled, neg_embeds, neg_pooled = self.encode(prompts, negative_prompts or [""] * len(prompts))
        latents = generate_latents(self.unet, embeds, pooled, seeds=seeds, height=height, width=width, steps=steps,
                                   guidance_scale=guidance_scale, sampler=sampler,
                                   scheduler_config=self.scheduler_config, neg_embeds=neg_embeds,
                                   neg_pooled=neg_pooled)  # (B, 4, H/8, W/8)
        # One image at a time: decode memory stays that of one image, and decoding adds no batch dependence.
        return [image for i in range(len(prompts)) for image in to_pil(self.vae.decode(latents[i : i + 1]))]

    def generate(self, prompt: str, n: int, *, seed: int = 0, batch_size: int = 1, negative_prompt: str = "",
                 **settings) -> list:
        """`n` images of one prompt, image i seeded `seed + i`, made `batch_size` at a time."""
        images = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            images += self.generate_unique_batch([prompt] * count, [seed + start + i for i in range(count)],
                                                 [negative_prompt] * count, **settings)
        return images
