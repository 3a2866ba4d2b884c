"""Turning prompt embeddings into images: seeded initial noise, classifier-free guidance, a sampler.

Each image i has its own CPU generator seeded `seeds[i]`; its initial latents are
`torch.randn((1, 4, H/8, W/8), generator=g)` scaled by the sampler's initial sigma, and an ancestral
sampler draws its per-step noise from the same generator (DESIGN.md "Seeds and noise"), so any image
can be reproduced alone, with any batch size. The negative prompt is SDXL base's zero embedding
(`force_zeros_for_empty_prompt`). Micro-conditioning: original size = target size, crop (0, 0).
"""

import math

import numpy as np
import torch
from PIL import Image

from sampling.samplers import get_sampler, init_noise_sigma, schedule_from_config
from sdxl.tiny import SDXL_SCHEDULER_CONFIG


@torch.no_grad()
def generate_latents(unet, embeds, pooled, *, seeds, height, width, steps=30, guidance_scale=5.0,
                     sampler="euler", scheduler_config=SDXL_SCHEDULER_CONFIG, neg_embeds=None, neg_pooled=None):
    """embeds (B, 77, ctx), pooled (B, P) -> clean latents (B, 4, height/8, width/8), fp32."""
    fn, karras = get_sampler(sampler)
    name = sampler.removesuffix("_karras")
    sigmas, timesteps = schedule_from_config(scheduler_config, steps, karras=karras, sampler=name)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    spacing = scheduler_config.get("timestep_spacing", "leading")
    x = torch.cat([torch.randn((1, 4, height // 8, width // 8), generator=g, dtype=torch.float32) for g in generators])
    x = (x * init_noise_sigma(sigmas, name, spacing)).to(embeds.device)
    b = x.shape[0]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(b, 1)
    neg_embeds = torch.zeros_like(embeds) if neg_embeds is None else neg_embeds
    neg_pooled = torch.zeros_like(pooled) if neg_pooled is None else neg_pooled
    dtype = unet.dtype
    cfg = guidance_scale > 1.0
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
