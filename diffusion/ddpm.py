"""The forward (noising) process of DDPM training (SD 1.x, SDXL), and the loss weights built on it.

SDXL trains on 1000 discrete timesteps with a "scaled_linear" beta schedule (betas linear in sqrt
space from 0.00085 to 0.012), as diffusers' `DDPMScheduler` / `EulerDiscreteScheduler` configs say
(its scheduler config: sdxl/configs.py).
References: Ho et al. 2020 (DDPM); Salimans & Ho 2022 (v-prediction); Hang et al. 2023 (Min-SNR);
Yu et al. 2024 (debiased estimation).
The training objective built on them, `DDPMObjective`, is SDXL's (sdxl/family.py).
"""

from dataclasses import dataclass

import torch

from diffusion.timesteps import unit_times


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   beta_schedule: str = "scaled_linear") -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 (float32, as diffusers computes it)."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use scaled_linear or linear")
    return torch.cumprod(1.0 - betas, dim=0)


def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    a = _per_sample(ac, t, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
    a = _per_sample(ac, t, x0.ndim)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def min_snr_weights(t: torch.Tensor, ac: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma, (B,). SNR = alpha_bar / (1 - alpha_bar).

    The paper's weight for an x0 loss is min(SNR, gamma). An epsilon loss is SNR times an x0 loss, so
    its weight is min(SNR, gamma) / SNR; a v loss is (SNR + 1) times an x0 loss: min(SNR, gamma) / (SNR + 1).
    """
    a = ac.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def debiased_weights(t: torch.Tensor, ac: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of debiased estimation (Yu et al. 2024, "Unmasking Bias in Diffusion Model
    Training"), (B,): 1 / sqrt(SNR) on the epsilon loss. A v loss is (SNR + 1) / SNR times the epsilon loss, so
    its weight is sqrt(SNR) / (SNR + 1), the same objective."""
    a = ac.to(t.device)[t].float()
    snr = a / (1 - a)
    return snr.sqrt() / (snr + 1) if prediction_type == "v_prediction" else 1 / snr.sqrt()


@dataclass(frozen=True)
class DDPMObjective:
    """Denoising score matching on a DDPM noise schedule (the `Objective` of families.py): integer timesteps t in
    [min_timestep, max_timestep], x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, target the noise (epsilon) or v,
    per-sample weights Min-SNR-gamma or debiased (`loss_weighting`).

    Timesteps: uniform is `randint(min, max + 1)`; logit_normal and mode map their u (diffusion/timesteps.py) to
    t = min + floor(u (max - min + 1)), as diffusers' `compute_density_for_timestep_sampling` followed by
    `(u * num_train_timesteps).to(torch.int64)`."""

    alphas_cumprod: torch.Tensor
    min_timestep: int = 0
    max_timestep: int = 999
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    prediction_type: str = "epsilon"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0

    def draw_times(self, n: int, g: torch.Generator, latent_shape=None) -> torch.Tensor:
        """n timesteps (long) in [min_timestep, max_timestep]."""
        lo, hi = self.min_timestep, self.max_timestep
        if self.timestep_sampling == "uniform":
            return torch.randint(lo, hi + 1, (n,), generator=g)
        u = unit_times(n, self.timestep_sampling, g, self.logit_mean, self.logit_std, self.mode_scale)
        return (lo + (u * (hi - lo + 1)).to(torch.int64)).clamp(lo, hi)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v_target(x0, noise, t, self.alphas_cumprod) if self.prediction_type == "v_prediction" else noise

    def output(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return prediction  # the UNet predicts the target itself

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.loss_weighting == "min_snr":
            return min_snr_weights(t, self.alphas_cumprod, self.min_snr_gamma, self.prediction_type)
        if self.loss_weighting == "debiased":
            return debiased_weights(t, self.alphas_cumprod, self.prediction_type)
        return None

    def validation_times(self, k: int) -> torch.Tensor:
        """k fixed timesteps spread over the trained range (the validation loss's)."""
        return torch.linspace(self.min_timestep, self.max_timestep, k).round().to(torch.int64)
