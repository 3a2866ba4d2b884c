"""SD 3.5 sampling: prompt embeddings and per-image seeds -> clean latents, as diffusers'
`StableDiffusion3Pipeline.__call__` (pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py) makes them for
the same model, scheduler config, steps, guidance, size and `generator=[torch.Generator("cpu").manual_seed(s) for s
in seeds]` (tests/test_sd3_family.py: pixels within 3/255).

Image i draws its initial latents `torch.randn((1, 16, H/8, W/8), generator=Generator().manual_seed(seeds[i]))`
(the flow starts at pure noise, sigma 1), so any image can be reproduced alone, with any batch size. The schedule
is the model's FlowMatchEulerDiscreteScheduler config (SD 3.5: shift 3.0) through diffusion/flow.py's
`flow_sigmas`, integrated by Euler (`flow_euler`) on the classifier-free-guided velocity
v = v_uncond + g (v_text - v_uncond), g > 1 (the pipeline's `do_classifier_free_guidance`). SD3's unconditional
input is the encoded negative prompt, the empty one included (`negative`), never zeros.
"""

import torch

from diffusion.flow import flow_euler, flow_sigmas
from sd3.configs import SD3_SCHEDULER_CONFIG

SAMPLERS = ("flow_euler",)


@torch.no_grad()
def generate_latents(transformer, embeds, pooled, *, seeds, height, width, steps=28, guidance_scale=7.0,
                     sampler="flow_euler", scheduler_config=SD3_SCHEDULER_CONFIG, neg_embeds=None, neg_pooled=None):
    """embeds (B, L, 4096), pooled (B, 2048) -> clean latents (B, 16, height/8, width/8), fp32.

    neg_embeds/neg_pooled: the negative prompts' (needed when guidance_scale > 1)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not an SD 3.5 sampler; use one of {', '.join(SAMPLERS)}")
    cfg = guidance_scale > 1.0
    if cfg and (neg_embeds is None or neg_pooled is None):
        raise ValueError("guidance_scale > 1 needs the negative prompts' embeddings (the family's `negative`)")
    sigmas, timesteps = flow_sigmas(scheduler_config, steps)
    channels = transformer.config.in_channels
    x = torch.cat([torch.randn((1, channels, height // 8, width // 8), generator=torch.Generator().manual_seed(int(s)),
                               dtype=torch.float32) for s in seeds]).to(embeds.device)  # (B, 16, H/8, W/8)
    dtype = transformer.dtype
    context = (torch.cat([neg_embeds, embeds]) if cfg else embeds).to(dtype)  # (2B, L, 4096) uncond first
    pooled_in = (torch.cat([neg_pooled, pooled]) if cfg else pooled).to(dtype)

    def velocity(x_in, t):
        x_in = torch.cat([x_in, x_in]) if cfg else x_in
        v = transformer(x_in.to(dtype), context, pooled_in, t.expand(x_in.shape[0])).float()
        if not cfg:
            return v
        uncond, text = v.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    return flow_euler(velocity, x, sigmas.to(x.device), timesteps=timesteps.to(x.device))


@torch.no_grad()
def negative(text_encoder, prompts: list[str], embeds: torch.Tensor, pooled: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, pooled) of the negative prompts, on the prompts' device and dtype: every one encoded, the empty one
    too (the pipeline's negative_prompt "" or None)."""
    neg_embeds, neg_pooled = text_encoder.encode(list(prompts))
    return neg_embeds.to(embeds.device, embeds.dtype), neg_pooled.to(pooled.device, pooled.dtype)
