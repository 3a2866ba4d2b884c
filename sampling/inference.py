"""Turning prompts into images with any family's model (+ LoRAs): seeded noise, guidance, its sampler.

The counterpart of diffusers' pipelines (`StableDiffusionXLPipeline.__call__`, `StableDiffusion3Pipeline`,
`FluxPipeline`), with the same results for the same model, LoRA, scheduler, guidance, size and
`generator=torch.Generator("cpu").manual_seed(seed)` (tests/test_inference.py holds SDXL to 3/255 per pixel). The
sampling itself is the family's `sample` (sdxl/sample.py, ...): each image i has its own CPU generator seeded
`seeds[i]` for its initial latents and every ancestral step (docs/ARCHITECTURE.md, "Seeds"), so any image can be
reproduced alone, with any batch size. LoRAs are merged into the fp32 denoiser weights, which are then cast once to
the inference dtype; the VAE decodes in fp32, one image at a time (tiled above 1024x1024 px, see diffusion/vae.py).
"""

import math
import re

import numpy as np
import torch
from PIL import Image

import families
from lora.reading import load_lora


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


def _training_sample(family, denoiser, text_encoder, embeds, pooled, seeds, height, width, steps, guidance_scale,
                     scheduler_config):
    """Clean latents of what a training run draws (grids, scores): the family's default sampler, CFG against empty
    negative prompts."""
    neg_embeds, neg_pooled = family.negative(text_encoder, [""] * len(seeds), embeds, pooled)
    return family.sample(denoiser, embeds, pooled, neg_embeds, neg_pooled, seeds=seeds, height=height, width=width,
                         steps=steps, guidance_scale=guidance_scale, sampler=family.DEFAULTS["sampler"],
                         scheduler_config=scheduler_config)


@torch.no_grad()
def sample_grid(family, denoiser, vae, text_encoder, embeds, pooled, *, images_per_prompt: int, height: int,
                width: int, scheduler_config: dict, steps: int = 20, guidance_scale: float = 5.0) -> Image.Image:
    """The sample grid of a training run: one row per prompt (embeds (P, L, ctx), pooled (P, pooled)), its
    images seeded 0, 1, ..., so grids of successive validations show the same noise turned into pictures."""
    rows = []
    for p in range(embeds.shape[0]):
        n = images_per_prompt
        latents = _training_sample(family, denoiser, text_encoder, embeds[p : p + 1].expand(n, -1, -1),
                                   pooled[p : p + 1].expand(n, -1), list(range(n)), height, width, steps,
                                   guidance_scale, scheduler_config)
        rows.append(vae.decode(latents))
    return images_to_grid(torch.cat(rows), rows=len(rows))


@torch.no_grad()
def sample_images(family, denoiser, vae, text_encoder, embeds, pooled, seeds: list[int], *, height: int, width: int,
                  scheduler_config: dict, steps: int = 20, guidance_scale: float = 5.0,
                  batch_size: int = 8) -> list[Image.Image]:
    """One image per (embeds[i] (L, ctx), pooled[i], seeds[i]), `batch_size` at a time, as PIL images: what
    a training run scores (training/loop/scoring.py)."""
    images = []
    for start in range(0, len(seeds), batch_size):
        part = slice(start, start + batch_size)
        latents = _training_sample(family, denoiser, text_encoder, embeds[part], pooled[part], seeds[part], height,
                                   width, steps, guidance_scale, scheduler_config)
        images += [image for i in range(len(latents)) for image in to_pil(vae.decode(latents[i : i + 1]))]
    return images


class ImageGenerator:
    """A family's model (+ merged LoRAs) ready to sample: prompts and seeds in, PIL images out.

        gen = ImageGenerator.from_pretrained("tiny", loras=[("my_lora.safetensors", 0.8)])
        images = gen.generate("a photo of a cat", 4, seed=0, width=64, height=64, steps=4)
    """

    def __init__(self, family, denoiser, text_encoder, vae, scheduler_config: dict, defaults: dict | None = None):
        self.family, self.denoiser, self.text_encoder, self.vae = family, denoiser, text_encoder, vae
        self.scheduler_config = dict(scheduler_config)
        self.defaults = dict(defaults or family.DEFAULTS)  # this model's (family.defaults(path))

    @classmethod
    def from_pretrained(cls, model, vae_model=None, loras=(), device="cpu", dtype=torch.float32) -> "ImageGenerator":
        """Load a model of any family (a diffusers folder, the vendor's single .safetensors file, or a tiny name),
        the VAE of `vae_model` (default: the model's), and merge each `(path, scale)` of `loras` (any LoRA file
        lora/reading.py reads). The denoiser and text encoder run in `dtype`, the VAE in fp32."""
        family = families.of(model)
        path = family.resolve(model)
        # Merged in fp32 (on the CPU, so the device never holds an fp32 model), then cast once: one rounding.
        # A LoRA file's text-encoder part goes into the encoders the same way.
        where = dict(dtype=torch.float32, device="cpu") if loras else dict(dtype=dtype, device=device)
        denoiser, text_encoder = family.load_denoiser(path, **where), family.load_text_encoder(path, **where)
        names = family.lora_names(str(model))
        for lora_path, scale in loras:
            load_lora(denoiser, lora_path, names, scale=scale, text_encoder=text_encoder)
        denoiser = denoiser.to(device=device, dtype=dtype)
        text_encoder = text_encoder.to(device=device, dtype=dtype)
        vae = family.load_vae(family.resolve(vae_model) if vae_model else path, device=device)
        return cls(family, denoiser, text_encoder, vae, family.scheduler_config(model), family.defaults(model))

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def encode(self, prompts: list[str], negative_prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """(embeds, pooled, neg_embeds, neg_pooled) on the denoiser's device (the family says what an empty negative
        prompt is: SDXL's zeros, ...)."""
        embeds, pooled = self.text_encoder.encode(list(prompts))  # (B, L, ctx), (B, P)
        neg_embeds, neg_pooled = self.family.negative(self.text_encoder, list(negative_prompts), embeds, pooled)
        return tuple(t.to(self.device) for t in (embeds, pooled, neg_embeds, neg_pooled))

    @torch.no_grad()
    def generate_unique_batch(self, prompts: list[str], seeds: list[int], negative_prompts: list[str] | None = None,
                              *, width=None, height=None, steps=None, guidance_scale=None, sampler=None,
                              true_cfg_scale=None) -> list:
        """One image per (prompt, seed, negative prompt): image i depends on its own three only, so a batch
        equals the same images made one by one (up to the denoiser's batched float rounding). Settings left out
        are the model's defaults (`family.defaults(path)`); true_cfg_scale only for a family whose defaults have
        it (FLUX.1's true classifier-free guidance)."""
        if len(prompts) != len(seeds) or (negative_prompts is not None and len(negative_prompts) != len(prompts)):
            raise ValueError(f"need one seed and one negative prompt per prompt; got {len(prompts)} prompts, "
                             f"{len(seeds)} seeds, {len(negative_prompts or prompts)} negative prompts")
        d = self.defaults
        width, height = width or d["width"], height or d["height"]
        parse_size(f"{width}x{height}")
        if true_cfg_scale is not None and "true_cfg_scale" not in d:
            raise ValueError(f"true_cfg_scale: {self.family.TITLE} has no true classifier-free guidance option; its "
                             "guidance_scale is its guidance")
        extra = {"true_cfg_scale": d["true_cfg_scale"] if true_cfg_scale is None else true_cfg_scale} \
            if "true_cfg_scale" in d else {}
        embeds, pooled, neg_embeds, neg_pooled = self.encode(prompts, negative_prompts or [""] * len(prompts))
        latents = self.family.sample(self.denoiser, embeds, pooled, neg_embeds, neg_pooled, seeds=seeds,
                                     height=height, width=width, steps=steps or d["steps"],
                                     guidance_scale=d["guidance_scale"] if guidance_scale is None else guidance_scale,
                                     sampler=sampler or d["sampler"], scheduler_config=self.scheduler_config,
                                     **extra)
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
