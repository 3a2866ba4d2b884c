"""Rectified flow, as SD 3.5 and FLUX.1 train and sample it, written as pure functions.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (arXiv:2403.03206):
the noisy input is the straight line x_t = (1 - s) x0 + s e between data x0 (s = 0) and noise e (s = 1), and the
model predicts its velocity v = e - x0 (Sec. 2, 3.1). What varies is how s is drawn in training (Sec. 3.1:
uniform, logit-normal (eq. 19), mode sampling with heavy tails (eq. 20); kohya's FLUX "sigmoid"), how it is
shifted towards noise for large images (Sec. 5.3.2: s' = shift s / (1 + (shift - 1) s); FLUX.1: a shift that
grows with the image's token count), and how each sample's loss is weighted.

Oracles (tests/test_flow.py): diffusers' `compute_density_for_timestep_sampling` and
`compute_loss_weighting_for_sd3` (training_utils.py), the SD3 LoRA example's noising and `precondition_outputs`,
and `FlowMatchEulerDiscreteScheduler` (schedulers/scheduling_flow_match_euler_discrete.py): `set_timesteps` and
`step`. Timesteps handed to the transformers are s * 1000 (diffusers' units).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffusion.timesteps import DENSITIES, sample_density  # noqa: F401 (the densities of this module's objective)

LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


# ---------------------------------------------------------------------------------------------------
# Training: noising, targets, timestep densities, shifts, loss weights


def _per_sample(s: torch.Tensor, ndim: int) -> torch.Tensor:
    return s.reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - s) x0 + s e, sigmas (B,) in [0, 1]."""
    s = _per_sample(sigmas, x0.ndim).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's velocity dx_t/ds = e - x0: what SD 3.5 and FLUX predict."""
    return noise - x0


def precondition_outputs(model_pred: torch.Tensor, x_t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The x0 estimate x_t - s v, as the diffusers SD3 example's `--precondition_outputs` (then the target is x0):
    an x0 loss equals the velocity loss times s^2."""
    return model_pred * (-_per_sample(sigmas, model_pred.ndim).to(model_pred.dtype)) + x_t




def shift_sigmas(sigmas, shift: float):
    """s' = shift s / (1 + (shift - 1) s) (Esser et al. 2024, Sec. 5.3.2): shift > 1 moves s towards noise (SD3,
    SD 3.5: 3.0). Tensors or numpy arrays, computed in their own dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX.1's resolution-dependent shift: mu linear in the image's token count (packed 2x2 latent patches) from
    base_shift at base_seq_len to max_shift at max_seq_len (diffusers' `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(sigmas, mu: float):
    """s' = e^mu / (e^mu + (1/s - 1)): the fixed shift with shift = e^mu (FLUX.1; diffusers'
    `FlowMatchEulerDiscreteScheduler.time_shift`, exponential type)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)


def training_sigmas(u: torch.Tensor, shift: float = 1.0, num_train_timesteps: int | None = None) -> torch.Tensor:
    """The noise levels s (B,) of a training batch from density draws u (B,).

    Continuous (num_train_timesteps None): s = shift(u). Discrete, as the diffusers SD3 / FLUX LoRA examples:
    s = the scheduler's table of T shifted levels at index floor(u T), the table descending from s = 1
    (FlowMatchEulerDiscreteScheduler(shift=shift).sigmas; the model's timestep is then s * T)."""
    if num_train_timesteps is None:
        return shift_sigmas(u, shift)
    T = num_train_timesteps
    table = torch.arange(T, 0, -1, dtype=torch.float32) / T  # (T,): 1, (T-1)/T, ..., 1/T
    table = shift_sigmas(table, shift).to(u.device)
    return table[(u * T).to(torch.int64)]


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample weights of the velocity loss (B,): `none` 1; `sigma_sqrt` s^-2; `cosmap` 2 / (pi (1 - 2s + 2s^2))
    (Esser et al. 2024, Sec. 3.1), as diffusers' `compute_loss_weighting_for_sd3`."""
    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    if scheme != "none":
        raise ValueError(f"loss weighting {scheme!r} is not supported; use one of {', '.join(LOSS_WEIGHTINGS)}")
    return torch.ones_like(sigmas)


@dataclass(frozen=True)
class FlowObjective:
    """Rectified flow as SD 3.5 and FLUX.1 train (the `Objective` of families.py): t is the noise level s in [0, 1],
    drawn from a density (`timestep_sampling`) over [min_timestep, max_timestep + 1] / 1000, then shifted: by the
    fixed `shift` (SD 3.5: 3.0, the model's scheduler shift), or with `flux_shift` by FLUX.1's shift for the image's
    token count (`tokens(latent_shape)`, `dynamic`: the scheduler's base/max shift and lengths). The target is the
    velocity e - x0, or x0 with SD3's output preconditioning; per-sample weights `none`, `sigma_sqrt`, `cosmap`."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: float = 1.0
    dynamic: dict | None = None  # FLUX.1's dynamic shift settings (base_shift, max_shift, base/max_image_seq_len)
    tokens: Callable | None = None  # latent shape -> the image's token count (FLUX.1: packed 2x2 patches)
    min_timestep: int = 0
    max_timestep: int = 999
    loss_weighting: str = "none"
    precondition: bool = False

    def shifted(self, u: torch.Tensor, latent_shape) -> torch.Tensor:
        if self.timestep_sampling != "flux_shift":
            return shift_sigmas(u, self.shift)
        d = self.dynamic or {}
        mu = flux_mu(self.tokens(latent_shape), d.get("base_image_seq_len", 256), d.get("max_image_seq_len", 4096),
                     d.get("base_shift", 0.5), d.get("max_shift", 1.15))
        return time_shift(u.clamp(min=1e-6), mu)

    def draw_times(self, n: int, g: torch.Generator, latent_shape) -> torch.Tensor:
        """n noise levels s (float32) in [min_timestep, max_timestep + 1] / 1000, shifted."""
        density = "sigmoid" if self.timestep_sampling == "flux_shift" else self.timestep_sampling
        u = sample_density(density, n, g, logit_mean=self.logit_mean, logit_std=self.logit_std,
                           mode_scale=self.mode_scale, sigmoid_scale=self.sigmoid_scale)
        lo, hi = self.min_timestep / 1000, (self.max_timestep + 1) / 1000
        return self.shifted(lo + u * (hi - lo), latent_shape)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noisy_input(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0 if self.precondition else velocity_target(x0, noise)

    def output(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return precondition_outputs(prediction, x_t, t) if self.precondition else prediction

    def weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return None if self.loss_weighting == "none" else loss_weights(self.loss_weighting, t)

    def validation_times(self, k: int) -> torch.Tensor:
        """k fixed, unshifted noise levels spread over the trained range (the validation loss's)."""
        return torch.linspace(self.min_timestep + 0.5, self.max_timestep + 0.5, k) / 1000


# ---------------------------------------------------------------------------------------------------
# Sampling: the schedule and the Euler sampler

UNSUPPORTED = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
               "stochastic_sampling")


def flow_sigmas(scheduler_config: dict, num_steps: int, image_seq_len: int | None = None,
                sigmas=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (n + 1,), timesteps (n,)), float32, equal to `FlowMatchEulerDiscreteScheduler.from_config(cfg)
    .set_timesteps(n, sigmas=sigmas, mu=mu)`'s: n levels evenly spaced from the table's highest to lowest sigma
    (or the given base `sigmas`), shifted by `shift` (SD 3.5: 3.0) or, with use_dynamic_shifting (FLUX.1), by
    time_shift with mu = flux_mu(image_seq_len, the config's base/max shift and lengths); stretched to end at
    shift_terminal if set; then a final 0. timesteps = sigmas * num_train_timesteps.

    FluxPipeline passes base sigmas `np.linspace(1.0, 1 / n, n)`; StableDiffusion3Pipeline passes none. Karras,
    exponential, beta and inverted sigmas, stochastic sampling and linear time shifts are refused."""
    cfg = scheduler_config
    bad = [k for k in UNSUPPORTED if cfg.get(k)]
    if cfg.get("time_shift_type", "exponential") != "exponential":
        bad.append("time_shift_type")
    if bad:
        raise ValueError(f"scheduler_config: {', '.join(f'{k}={cfg[k]!r}' for k in bad)} is not supported; only "
                         "static or dynamic (exponential) shifting and shift_terminal are")
    T, shift, dynamic = cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0), cfg.get("use_dynamic_shifting")
    if dynamic and image_seq_len is None:
        raise ValueError("scheduler_config has use_dynamic_shifting: pass image_seq_len (the image's token count)")
    if sigmas is None:  # the scheduler's own table ends (float32, shifted unless dynamic), then float64 linspace
        ends = torch.tensor([1.0, 1.0 / T], dtype=torch.float32) if dynamic else \
            shift_sigmas(torch.tensor([T, 1], dtype=torch.float32) / T, shift)
        s = np.linspace(ends[0].item() * T, ends[1].item() * T, num_steps) / T
    else:
        s = np.array(sigmas).astype(np.float32)
    if dynamic:
        mu = flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        s = time_shift(s, mu)
    else:
        s = shift_sigmas(s, shift)
    if cfg.get("shift_terminal"):  # stretch so that the last level is shift_terminal
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    s = torch.from_numpy(np.asarray(s)).float()
    return torch.cat([s, torch.zeros(1)]), s * T


@torch.no_grad()
def flow_euler(model, x, sigmas, *, timesteps, extra_args=None, callback=None):
    """Euler's method for the flow ODE dx/ds = v(x, s) (Esser et al. 2024; Lipman et al. 2023, flow matching), as
    diffusers' FlowMatchEulerDiscreteScheduler.step: x <- x + (s_next - s) v."""
    if len(sigmas) != len(timesteps) + 1:
        raise ValueError(f"need len(sigmas) == len(timesteps) + 1, got {len(sigmas)} and {len(timesteps)}")
    x, sigmas = x.float(), sigmas.float()
    for i, t in enumerate(timesteps):
        v = model(x, t, **(extra_args or {})).float()  # velocity e - x0, t = s * 1000
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i].item(), "denoised": x - sigmas[i] * v})
        x = x + (sigmas[i + 1] - sigmas[i]) * v  # dt in float32, as the scheduler
    return x
