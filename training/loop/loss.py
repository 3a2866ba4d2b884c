"""The training objective: denoising score matching on SDXL's noising process (Ho et al. 2020), the noise and
timesteps it is drawn with, and the validation loss.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise;  loss = || unet(x_t, t, text) - target ||^2 per sample
    target = noise (epsilon prediction, SDXL base) or v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0
    (timestep density, noise variants and per-sample loss weights: training/loop/timesteps.py)

Every micro-batch draws its timesteps and noise from a CPU generator seeded by (seed, micro-step) for the
whole global batch and keeps this rank's rows: so a resumed run draws the same, and N processes draw what
one process with the global batch draws (docs/ARCHITECTURE.md, "Seeds").
"""

import numpy as np
import torch
import torch.nn.functional as F

from common.runtime import World
from diffusion.ddpm import add_noise, v_target
from training.data.masks import masked_mean
from training.loop.timesteps import NoiseRecipe, draw_noise, loss_weights, sample_timesteps

VALIDATION_TIMESTEPS = 5  # fixed timesteps per validation image, spread over [min_timestep, max_timestep]


def step_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, *stream): no hidden global RNG state."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def time_ids_of(batch: dict) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size, each (h, w)."""
    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()  # (B, 6)


def draw_timesteps_and_noise(seed: int, micro_step: int, shape, world: World,
                             recipe: NoiseRecipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's rows of micro-batch `micro_step`'s timesteps (B,), noise (B, 4, h, w) and the noise x_t is
    made with (differs from `noise` only with --input_perturbation), CPU (training/loop/timesteps.py)."""
    g = step_generator(seed, micro_step)
    b = shape[0]
    n, mine = b * world.size, slice(world.rank * b, (world.rank + 1) * b)
    t = sample_timesteps(n, recipe, g)[mine]
    noise, input_noise = draw_noise((n, *shape[1:]), recipe, g)
    return t, noise[mine], input_noise[mine]


def diffusion_loss(unet, x0, embeds, pooled, time_ids, t, noise, *, alphas_cumprod: torch.Tensor,
                   prediction_type: str = "epsilon", loss_weighting: str = "none", min_snr_gamma: float = 5.0,
                   input_noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   autocast_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-sample MSE of one micro-batch, optionally weighted (Min-SNR or debiased); fp32, (B,).

    x0 (B, 4, h, w) latents, embeds (B, 77, ctx), pooled (B, P), time_ids (B, 6), t (B,), noise like x0;
    input_noise (default: noise) makes x_t, noise makes the target (input perturbation, Ning et al. 2023);
    mask (B, 1, h, w) weights each latent pixel, normalised by its mean (--masked_loss, training/data/masks.py).
    The UNet runs under autocast in `autocast_dtype` (bf16/fp16 over frozen base weights; fp32: no autocast)."""
    noisy = add_noise(x0, noise if input_noise is None else input_noise, t, alphas_cumprod)  # (B, 4, h, w)
    target = v_target(x0, noise, t, alphas_cumprod) if prediction_type == "v_prediction" else noise
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        pred = unet(noisy, t, embeds, cond)
    per_pixel = F.mse_loss(pred.float(), target.float(), reduction="none")  # (B, 4, h, w)
    loss = per_pixel.mean(dim=(1, 2, 3)) if mask is None else masked_mean(per_pixel, mask)  # (B,)
    weights = loss_weights(t, alphas_cumprod, loss_weighting, min_snr_gamma, prediction_type)
    return loss if weights is None else loss * weights


@torch.no_grad()
def validation_loss(encode, unet, val_data, *, seed: int, min_timestep: int, max_timestep: int, **loss_kwargs) -> float:
    """Mean unweighted loss over the validation images at fixed timesteps and fixed noise: comparable across steps
    and runs, whatever their timestep sampling, noise or loss weighting. `encode(batch)` -> (x0, embeds, pooled) on
    the UNet's device; loss_kwargs go to `diffusion_loss`."""
    loss_kwargs = {**loss_kwargs, "loss_weighting": "none"}
    ts = torch.linspace(min_timestep, max_timestep, VALIDATION_TIMESTEPS).round().long()
    total, count = 0.0, 0
    for i, batch in enumerate(val_data.iter_epoch(0)):
        x0, embeds, pooled = encode(batch)
        time_ids = time_ids_of(batch).to(x0.device)
        for k, t in enumerate(ts):
            noise = torch.randn(x0.shape, generator=step_generator(seed, 0x7A1, i, k)).to(x0.device)
            tt = t.repeat(x0.shape[0]).to(x0.device)
            loss = diffusion_loss(unet, x0, embeds, pooled, time_ids, tt, noise, **loss_kwargs)
            total, count = total + loss.sum().item(), count + loss.numel()
    return total / max(1, count)
