"""FLUX.1 sampling: prompt embeddings and per-image seeds -> clean latents, as diffusers' `FluxPipeline`
(diffusers/pipelines/flux/pipeline_flux.py) makes them for the same model, scheduler config, size, steps,
guidance and `generator=[torch.Generator("cpu").manual_seed(seed) for each image]` (tests/test_flux_family.py:
pixels within 3/255).

- Noise: image i draws `torch.randn((1, 16, H/8, W/8), generator=Generator().manual_seed(seeds[i]))` (H, W rounded
  down to multiples of 16, as the pipeline), packed into 2x2-patch tokens, so any image can be reproduced alone,
  with any batch size.
- Schedule: the pipeline's base sigmas `np.linspace(1, 1/n, n)`, shifted as its scheduler config says: FLUX.1-dev
  by mu = the image's token count through `calculate_shift` (use_dynamic_shifting), schnell not at all
  (diffusion/flow.py `flow_sigmas`); then Euler steps of the flow ODE (`flow_euler`).
- Guidance: dev's guidance is an input of the transformer (`guidance_scale`, e.g. 3.5; distilled, one call per
  step); schnell has none and ignores it. True classifier-free guidance (`true_cfg_scale` > 1, the pipeline's
  argument of that name) adds a second call on the negative prompt's embeddings per step and mixes
  neg + true_cfg_scale (pos - neg); FLUX.1 has no unconditional embedding of its own, so an empty negative prompt
  is the encoded "" (`negative`), as the pipeline's `negative_prompt=""`.
"""

import numpy as np
import torch

from diffusion.flow import flow_euler, flow_sigmas
from flux.configs import FLUX_DEV_SCHEDULER
from flux.transformer import image_ids, pack_latents, text_ids, unpack_latents

LATENT_CHANNELS = 16


def initial_noise(seeds, height: int, width: int) -> torch.Tensor:
    """(B, 16, h, w) fp32 CPU noise, image i from its own generator seeded seeds[i]; h, w = 2 * (size // 16)."""
    h, w = 2 * (height // 16), 2 * (width // 16)
    return torch.cat([torch.randn((1, LATENT_CHANNELS, h, w), generator=torch.Generator().manual_seed(int(s)),
                                  dtype=torch.float32) for s in seeds])


@torch.no_grad()
def generate_latents(transformer, embeds, pooled, *, seeds, height, width, steps=28, guidance_scale=3.5,
                     scheduler_config=FLUX_DEV_SCHEDULER, neg_embeds=None, neg_pooled=None,
                     true_cfg_scale: float = 1.0) -> torch.Tensor:
    """embeds (B, L, 4096) T5, pooled (B, 768) CLIP-L -> clean latents (B, 16, H/8, W/8), fp32."""
    noise = initial_noise(seeds, height, width)
    b, _, h, w = noise.shape
    x = pack_latents(noise).to(embeds.device)  # (B, N, 64), N = h/2 * w/2
    sigmas, timesteps = flow_sigmas(scheduler_config, steps, image_seq_len=x.shape[1],
                                    sigmas=np.linspace(1.0, 1 / steps, steps))
    dtype, device = transformer.dtype, embeds.device
    img, txt = image_ids(h, w, device=device), text_ids(embeds.shape[1], device=device)
    guidance = (torch.full((b,), float(guidance_scale), device=device)
                if transformer.config.guidance_embeds else None)
    cfg = true_cfg_scale > 1.0  # as the pipeline's do_true_cfg (a negative prompt is always given here)
    if cfg and (neg_embeds is None or neg_pooled is None):
        raise ValueError("true_cfg_scale > 1 needs the negative prompt's embeddings (neg_embeds, neg_pooled)")
    cond = (embeds.to(dtype), pooled.to(dtype))
    uncond = (neg_embeds.to(dtype), neg_pooled.to(dtype)) if cfg else None

    def velocity(x_in, t):
        timestep = (t / 1000).expand(b)  # the pipeline's timestep / 1000: sigma, in float32
        v = transformer(x_in.to(dtype), *cond, timestep, img, txt, guidance=guidance).float()
        if not cfg:
            return v
        v_neg = transformer(x_in.to(dtype), *uncond, timestep, img, txt, guidance=guidance).float()
        return v_neg + true_cfg_scale * (v - v_neg)

    x = flow_euler(velocity, x, sigmas.to(device), timesteps=timesteps.to(device))
    return unpack_latents(x, h, w)  # (B, 16, H/8, W/8)


@torch.no_grad()
def negative(text_encoder, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, pooled) of the negative prompts, shaped like the prompts': every one encoded, the empty one too
    (FLUX.1 has no zero-embedding convention; only true CFG uses them)."""
    neg_embeds, neg_pooled = text_encoder.encode(list(prompts))
    return neg_embeds.to(embeds.device, embeds.dtype), neg_pooled.to(pooled.device, pooled.dtype)
