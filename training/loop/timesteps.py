"""What a training step draws besides its data: timesteps, noise, and how each sample's loss is weighted.

Timestep sampling (the density of t over [min_timestep, max_timestep]):
  uniform       every timestep equally likely (DDPM, Ho et al. 2020);
  logit_normal  u = sigmoid(n), n ~ N(logit_mean, logit_std^2): favours the middle timesteps (SD3, Esser et al.
                2024, eq. 19);
  mode          u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1): heavier middle (scale > 0) or
                tails (scale < 0) (SD3, eq. 20);
  then t = min_timestep + floor(u (max_timestep - min_timestep + 1)), as diffusers'
  `compute_density_for_timestep_sampling` followed by `(u * num_train_timesteps).long()`.
Noise: offset noise (per-channel mean shift), multi-resolution ("pyramid") noise (kohya-ss/sd-scripts
`pyramid_noise_like`, after J. Whitaker 2023), and input perturbation (Ning et al. 2023: the UNet sees
x_t made with noise + gamma * extra noise while the target stays the plain noise).
Loss weighting per sample: Min-SNR-gamma (Hang et al. 2023) or debiased estimation (Yu et al. 2024,
weight 1 / sqrt(SNR) on the epsilon loss), diffusion/ddpm.py.

Every draw comes from the one generator of its micro-batch, for the whole global batch, so a resumed run and N
processes draw exactly what one uninterrupted process draws (training/loop/loss.py).
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from diffusion.ddpm import debiased_weights, min_snr_weights

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("none", "min_snr", "debiased")


@dataclass(frozen=True)
class NoiseRecipe:
    """The flags that decide a micro-batch's timesteps and noise (their names are the flags')."""

    min_timestep: int = 0
    max_timestep: int = 999
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    input_perturbation: float = 0.0

    @classmethod
    def of(cls, args) -> "NoiseRecipe":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def sample_timesteps(n: int, recipe: NoiseRecipe, g: torch.Generator) -> torch.Tensor:
    """n timesteps (long) in [min_timestep, max_timestep] drawn with `recipe.timestep_sampling`."""
    lo, hi = recipe.min_timestep, recipe.max_timestep
    if recipe.timestep_sampling == "uniform":
        return torch.randint(lo, hi + 1, (n,), generator=g)
    if recipe.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.normal(recipe.logit_mean, recipe.logit_std, (n,), generator=g))
    else:  # mode
        v = torch.rand((n,), generator=g)
        u = 1 - v - recipe.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return (lo + (u * (hi - lo + 1)).long()).clamp(lo, hi)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, g: torch.Generator) -> torch.Tensor:
    """Pyramid noise: noise plus upsampled coarser noise at random scales r^i (r in [2, 4)), each weighted
    discount^i, renormalised to unit std over the batch (kohya-ss/sd-scripts `pyramid_noise_like`)."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = torch.rand((), generator=g).item() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=g)
        noise += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:  # the coarsest level is one pixel wide
            break
    return noise / noise.std()


def draw_noise(shape, recipe: NoiseRecipe, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, input noise) for a global batch of `shape`: the target noise (offset and multires applied) and the
    noise x_t is made with (plus input perturbation; the same tensor without it)."""
    n, c = shape[:2]
    noise = torch.randn(tuple(shape), generator=g)
    if recipe.noise_offset > 0:  # shifts each channel's mean: lets the model learn very dark or bright images
        noise = noise + recipe.noise_offset * torch.randn((n, c, 1, 1), generator=g)
    if recipe.multires_noise_iterations > 0:
        noise = multires_noise(noise, recipe.multires_noise_iterations, recipe.multires_noise_discount, g)
    if recipe.input_perturbation > 0:
        return noise, noise + recipe.input_perturbation * torch.randn(noise.shape, generator=g)
    return noise, noise


def loss_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, weighting: str, min_snr_gamma: float,
                 prediction_type: str) -> torch.Tensor | None:
    """Per-sample weights (B,) of the MSE loss, or None for no weighting."""
    if weighting == "min_snr":
        return min_snr_weights(t, alphas_cumprod, min_snr_gamma, prediction_type)
    if weighting == "debiased":
        return debiased_weights(t, alphas_cumprod, prediction_type)
    return None
