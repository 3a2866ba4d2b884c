"""SDXL sampling: prompt embeddings and per-image seeds -> clean latents, as diffusers' `StableDiffusionXLPipeline`
(diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py) makes them for the same model, scheduler,
guidance, size and `generator=torch.Generator("cpu").manual_seed(seed)` (tests/test_inference.py: pixels within
3/255).

Image i has its own CPU generator seeded `seeds[i]`: its initial latents are `torch.randn((1, 4, H/8, W/8),
generator=g)` scaled by the sampler's initial sigma, and an ancestral sampler draws its per-step noise from the same
generator (docs/ARCHITECTURE.md, "Seeds"), so any image can be reproduced alone, with any batch size. An empty
negative prompt is SDXL base's zero embedding (`force_zeros_for_empty_prompt`, `negative`). Micro-conditioning:
original size = target size, crop (0, 0).
"""

import torch

from diffusion.samplers import get_sampler, init_noise_sigma, schedule_from_config
from sdxl.configs import SDXL_SCHEDULER_CONFIG


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


@torch.no_grad()
def negative(text_encoder, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, pooled) of the negative prompts, shaped like the prompts' `embeds`, `pooled`: an empty one is zeros
    (SDXL base's force_zeros_for_empty_prompt), the others encoded."""
    neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    given = [i for i, p in enumerate(prompts) if p]
    if given:
        encoded = text_encoder.encode([prompts[i] for i in given])
        neg_embeds[given], neg_pooled[given] = (t.to(embeds.device, embeds.dtype) for t in encoded)
    return neg_embeds, neg_pooled
