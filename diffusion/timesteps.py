"""Timestep densities shared by the objectives (diffusion/ddpm.py, diffusion/flow.py): where in the noise range a
training step lands, as a number u in [0, 1] (0 = clean, 1 = pure noise).

  uniform       every time equally likely (DDPM, Ho et al. 2020);
  logit_normal  u = sigmoid(n), n ~ N(logit_mean, logit_std^2): favours the middle (SD3, Esser et al. 2024, eq. 19;
                FLUX trainers call it `sigmoid`);
  mode          u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1): heavier middle (scale > 0) or tails
                (scale < 0) (SD3, eq. 20);
as diffusers' `compute_density_for_timestep_sampling` draws them from the same generator.
"""

import math

import torch

DENSITIES = ("uniform", "logit_normal", "mode")


def unit_times(n: int, density: str, g: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
               mode_scale: float = 1.29) -> torch.Tensor:
    """n draws u in [0, 1] (float32) of `density`."""
    if density == "uniform":
        return torch.rand((n,), generator=g)
    if density == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=g))
    if density == "mode":
        v = torch.rand((n,), generator=g)
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    raise ValueError(f"timestep density {density!r} is not one of {', '.join(DENSITIES)}")
