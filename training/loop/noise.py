"""The noise a training step draws besides its timesteps (which the family's objective draws: diffusion/ddpm.py,
diffusion/flow.py, with the densities of diffusion/timesteps.py):

  offset noise        a per-channel mean shift (lets the model learn very dark or bright images);
  multi-resolution    ("pyramid") noise: kohya-ss/sd-scripts `pyramid_noise_like`, after J. Whitaker 2023;
  input perturbation  the denoiser sees x_t made with noise + gamma * extra noise while the target stays the plain
                      noise (Ning et al. 2023).

Each image's draws come from its own generator (training/loop/loss.py), so a resumed run, and any split of a step
into micro-batches and processes, draws exactly what one uninterrupted process draws; multi-resolution noise is
renormalised to unit std per image.
"""


import torch
import torch.nn.functional as F


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


def draw_noise(shape, recipe, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, input noise) for a global batch of `shape`: the target noise (offset and multires applied) and the
    noise x_t is made with (plus input perturbation; the same tensor without it). `recipe`: the run's
    NoiseSettings (noise_offset, multires_noise_iterations/discount, input_perturbation)."""
    n, c = shape[:2]
    noise = torch.randn(tuple(shape), generator=g)
    if recipe.noise_offset > 0:  # shifts each channel's mean: lets the model learn very dark or bright images
        noise = noise + recipe.noise_offset * torch.randn((n, c, 1, 1), generator=g)
    if recipe.multires_noise_iterations > 0:
        noise = multires_noise(noise, recipe.multires_noise_iterations, recipe.multires_noise_discount, g)
    if recipe.input_perturbation > 0:
        return noise, noise + recipe.input_perturbation * torch.randn(noise.shape, generator=g)
    return noise, noise

