"""Timestep densities shared by the objectives (diffusion/ddpm.py, diffusion/flow.py): where in the noise range a
training step lands, as a number u in [0, 1] (0 = clean, 1 = pure noise).

  uniform       every time equally likely (DDPM, Ho et al. 2020);
  logit_normal  u = sigmoid(n), n ~ N(logit_mean, logit_std^2): favours the middle (SD3, Esser et al. 2024, eq. 19);
  mode          u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1): heavier middle (scale > 0) or tails
                (scale < 0) (SD3, eq. 20);
  sigmoid       u = sigmoid(sigmoid_scale n), n ~ N(0, 1) (kohya's FLUX `--timestep_sampling sigmoid`);
the first three as diffusers' `compute_density_for_timestep_sampling` draws them from the same generator.
"""

import math

import torch

DENSITIES = ("uniform", "logit_normal", "mode", "sigmoid")


def sample_density(scheme: str, n: int, generator: torch.Generator | None = None, *, logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29, sigmoid_scale: float = 1.0,
                   device="cpu") -> torch.Tensor:
    """n draws u in (0, 1), float32: `uniform`; `logit_normal` sigmoid(N(mean, std^2)) (eq. 19); `mode`
    1 - v - scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1) (eq. 20); `sigmoid` sigmoid(scale N(0, 1)) (kohya's
    FLUX `--timestep_sampling sigmoid`). The first three equal diffusers' `compute_density_for_timestep_sampling`
    on the same generator."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator, device=device))
    if scheme == "sigmoid":
        return torch.sigmoid(sigmoid_scale * torch.randn((n,), generator=generator, device=device))
    if scheme not in DENSITIES:
        raise ValueError(f"timestep density {scheme!r} is not supported; use one of {', '.join(DENSITIES)}")
    v = torch.rand((n,), generator=generator, device=device)
    if scheme == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return v


def unit_times(n: int, density: str, g: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
               mode_scale: float = 1.29) -> torch.Tensor:
    """n draws u in [0, 1] (float32) of `density` (`sample_density` with positional settings)."""
    return sample_density(density, n, g, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
