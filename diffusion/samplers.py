"""Noise schedules and samplers for SDXL inference, written as pure functions.

Schedules reproduce diffusers' `set_timesteps` of the scheduler each sampler mirrors (timestep
spacing of Lin et al. 2023, Table 2; sigmas linearly interpolated in t; Karras et al. 2022 Eq. 5
with rho=7 and the log-sigma interpolation back to t). Samplers share one signature, in the style
of k-diffusion:

    latents = sampler(model, x, sigmas, timesteps=timesteps, extra_args={...}, callback=None,
                      generators=[g0, g1, ...], prediction_type="epsilon")

`x` is in sigma form, x = x0 + sigma * noise (B, 4, H/8, W/8), float32. The caller draws it:
`torch.randn((1, 4, h, w), generator=g_i) * init_noise_sigma(sigmas, name, spacing)` per image.
`model(x_scaled, timestep, **extra_args)` is the UNet's prediction (eps, or v with
prediction_type="v_prediction"); the sampler passes x_scaled = x / sqrt(sigma^2 + 1) (the UNet's
training-time input scale) and turns the prediction into the denoised x0 itself. Classifier-free
guidance is not a sampler's business: the caller's model function batches cond/uncond and mixes.

Ancestral noise: at every step, image i draws `torch.randn(x.shape[1:], generator=generators[i])`
from its own CPU generator, as diffusers' pipeline does for a single image seeded the same way, so a
batch of 4 equals four batches of 1 and any image can be reproduced alone (docs/ARCHITECTURE.md, "Seeds").
"""

import math

import numpy as np
import torch

from diffusion.ddpm import alphas_cumprod

__all__ = [
    "alphas_cumprod", "timesteps_for", "sigma_table", "karras_sigmas", "sigma_to_t",
    "schedule_from_config", "init_noise_sigma",
    "euler", "euler_a", "ddim", "dpmpp_2m", "SAMPLERS", "get_sampler", "sampler_names",
]  # fmt: skip

SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------------
# Schedules


def _linspace(stop: float, n: int) -> torch.Tensor:
    """numpy.linspace(0, stop, n) in float64: i * (stop / (n - 1)), last value exactly `stop`."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    t = torch.arange(n, dtype=torch.float64) * (stop / (n - 1))
    t[-1] = stop
    return t


def timesteps_for(num_steps: int, spacing: str = "leading", steps_offset: int = 1, num_train_timesteps: int = 1000,
                  rounded: bool = False) -> torch.Tensor:
    """Descending model timesteps (float32, (num_steps,)), as diffusers' EulerDiscreteScheduler.

    leading: 0, r, 2r, ... with r = T // n, plus steps_offset (SDXL: 1, so 20 steps -> 951, ..., 1);
    trailing: T, T - T/n, ... rounded, minus 1 (starts at 999); linspace: n points in [0, T-1] (fractional,
    unless `rounded`, as DDIM and DPM-Solver use them). For some n (61, 103, 121, ...) numpy's arange gives
    trailing n + 1 timesteps, the last one -1 (sigma clamps to sigma(t=0)); diffusers keeps that, so do we."""
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(SPACINGS)}")
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if spacing == "leading":
        t = torch.arange(num_steps, dtype=torch.float64) * (num_train_timesteps // num_steps) + steps_offset
    elif spacing == "trailing":  # numpy.arange(T, 0, -T/n) exactly: ceil(T / (T/n)) values T + i * ((T - T/n) - T)
        step = (num_train_timesteps - num_train_timesteps / num_steps) - num_train_timesteps
        length = math.ceil(num_train_timesteps / (num_train_timesteps / num_steps))
        t = (num_train_timesteps + torch.arange(length, dtype=torch.float64) * step).round() - 1
    else:
        t = _linspace(num_train_timesteps - 1, num_steps)
        t = t.round() if rounded else t
    return t.flip(0).float() if spacing != "trailing" else t.float()


def sigma_table(ac: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1 (float32, ascending)."""
    return ((1 - ac) / ac) ** 0.5


def _interp(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear table lookup at fractional indices (numpy.interp on 0..T-1), float64."""
    t, table = t.double().clamp(0, len(table) - 1), table.double()
    lo = t.floor().long().clamp(0, len(table) - 2)
    return table[lo] + (table[lo + 1] - table[lo]) * (t - lo)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n sigmas from sigma_max to sigma_min, equally spaced in sigma^(1/rho); float64."""
    ramp = _linspace(1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps of arbitrary sigmas: linear interpolation of log(sigma) between the two
    neighbouring training sigmas, clamped to [0, T-1] (diffusers' `_sigma_to_t`); float64."""
    # numpy's float32 log, as diffusers: torch's differs in the last bit for ~1 in 6 entries, which moves
    # fractional timesteps by one float32 ulp.
    log_table = torch.from_numpy(np.log(sigma_table(ac).numpy()))  # float32, ascending in t
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    lo = (torch.searchsorted(log_table.double(), log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    low, high = log_table[lo], log_table[lo + 1]
    w = ((low.double() - log_sigma) / (low - high).double()).clamp(0, 1)  # (low - high) in float32, as diffusers
    return (1 - w) * lo + w * (lo + 1)


def _base_name(sampler: str) -> tuple[str, bool]:
    base = sampler.removesuffix("_karras")
    if base not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid names: {', '.join(sampler_names())}")
    return base, base != sampler


def schedule_from_config(scheduler_config: dict, num_steps: int, karras: bool = False,
                         sampler: str = "euler") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (n + 1,), timesteps (n,)), both float32, for `sampler` as the diffusers scheduler of that
    kind built with `from_config(scheduler_config)` would set them (a diffusers scheduler_config.json dict;
    SDXL base: scaled_linear betas, leading spacing, steps_offset 1).

    Per sampler, as diffusers: euler/euler_a (EulerDiscrete/EulerAncestralDiscrete) use the timesteps
    above; ddim (DDIMScheduler) rounds linspace timesteps and ends at sigma(t=0) unless set_alpha_to_one;
    dpmpp_2m (DPMSolverMultistep) spaces leading/linspace over n + 1 points and drops the lowest.
    Karras (`karras`, a `_karras` name or use_karras_sigmas in the config): euler-family samplers span
    the chosen timesteps' sigma range and keep fractional timesteps; dpmpp_2m spans the full training
    range and rounds the timesteps. The final sigma is 0 unless final_sigmas_type is "sigma_min"."""
    cfg = scheduler_config
    base, karras_name = _base_name(sampler)
    karras = karras or karras_name or bool(cfg.get("use_karras_sigmas", False))
    if cfg.get("interpolation_type", "linear") != "linear" or cfg.get("rescale_betas_zero_snr", False) \
            or cfg.get("trained_betas") is not None:
        raise ValueError("scheduler_config: only interpolation_type 'linear', no rescale_betas_zero_snr and no "
                         "trained_betas are supported (SDXL's settings); edit the config or use diffusers directly")
    T = cfg.get("num_train_timesteps", 1000)
    ac = alphas_cumprod(T, cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02), cfg.get("beta_schedule", "linear"))
    spacing = cfg.get("timestep_spacing", "leading" if base == "ddim" else "linspace")
    offset = cfg.get("steps_offset", 0)
    table = sigma_table(ac)

    if base == "dpmpp_2m" and spacing != "trailing":
        timesteps = timesteps_for(num_steps + 1, spacing, offset, T, rounded=True)[:-1]
    else:
        timesteps = timesteps_for(num_steps, spacing, offset, T, rounded=base in ("ddim", "dpmpp_2m"))
    sigmas = _interp(timesteps, table)

    if karras and base == "dpmpp_2m":
        sigmas = karras_sigmas(table[0].item(), table[-1].item(), num_steps)
        timesteps = sigma_to_t(sigmas, ac).round().float()
    elif karras:
        lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
        sigmas = karras_sigmas(lo if lo is not None else sigmas[-1].item(), hi if hi is not None else sigmas[0].item(),
                               num_steps)
        timesteps = sigma_to_t(sigmas, ac).float()

    if base == "ddim":
        final = 0.0 if cfg.get("set_alpha_to_one", True) else table[0].item()
    elif base == "euler_a":
        final = 0.0
    else:
        final_type = cfg.get("final_sigmas_type", "zero")
        if final_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type {final_type!r} is not supported; use 'zero' or 'sigma_min'")
        final = 0.0 if final_type == "zero" else table[0].item()
    return torch.cat([sigmas.double(), torch.tensor([final], dtype=torch.float64)]).float(), timesteps


def init_noise_sigma(sigmas: torch.Tensor, sampler: str = "euler", spacing: str = "leading") -> float:
    """Scale of the initial noise, x = randn * this, equal to what the diffusers pipeline starts from.

    Euler schedulers: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading (their
    `init_noise_sigma`). DDIM and DPM-Solver start from N(0, 1) in the alpha form x_t = sqrt(a) x0 +
    sqrt(1 - a) noise, which is sqrt(sigma_max^2 + 1) * N(0, 1) in our sigma form, for every spacing."""
    base, _ = _base_name(sampler)
    sigma_max = sigmas.float().max()
    if base in ("euler", "euler_a") and spacing in ("linspace", "trailing"):
        return sigma_max.item()
    return ((sigma_max**2 + 1) ** 0.5).item()


# ---------------------------------------------------------------------------------------------------
# Samplers: (model, x, sigmas, *, timesteps, extra_args, callback, generators, prediction_type)


def _denoise(model, x, sigma: float, t, extra_args, prediction_type: str) -> torch.Tensor:
    """x0 from the model's prediction at noise level sigma (sigma form: x = x0 + sigma * eps)."""
    c_in = 1 / (sigma**2 + 1) ** 0.5  # the UNet sees sqrt(alpha_bar) * x = alpha-form x_t
    out = model(x * c_in, t, **(extra_args or {})).float()
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
        return x * c_in**2 - out * (sigma * c_in)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


def _step_noise(x: torch.Tensor, generators) -> torch.Tensor:
    """One fresh N(0, 1) draw per image from its own CPU generator (global RNG when None)."""
    if generators is None:
        return torch.randn(x.shape, dtype=torch.float32).to(x.device)
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x.shape[0]}; pass one per image")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(x.device)


def _check(x, sigmas, timesteps):
    if len(sigmas) != len(timesteps) + 1:
        raise ValueError(f"need len(sigmas) == len(timesteps) + 1, got {len(sigmas)} and {len(timesteps)}")
    return x.float(), sigmas.tolist()


@torch.no_grad()
def euler(model, x, sigmas, *, timesteps, extra_args=None, callback=None, generators=None, prediction_type="epsilon"):
    """Euler method for the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn), as
    diffusers' EulerDiscreteScheduler with s_churn=0."""
    x, s = _check(x, sigmas, timesteps)
    for i, t in enumerate(timesteps):
        denoised = _denoise(model, x, s[i], t, extra_args, prediction_type)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised})
        d = (x - denoised) / s[i]  # dx/dsigma
        x = x + d * (s[i + 1] - s[i])
    return x


@torch.no_grad()
def euler_a(model, x, sigmas, *, timesteps, extra_args=None, callback=None, generators=None, prediction_type="epsilon"):
    """Ancestral Euler (Karras et al. 2022 / Song et al. 2021 reverse SDE, eta=1): an Euler step down to
    sigma_down, then fresh noise of std sigma_up, as diffusers' EulerAncestralDiscreteScheduler."""
    x, s = _check(x, sigmas, timesteps)
    for i, t in enumerate(timesteps):
        denoised = _denoise(model, x, s[i], t, extra_args, prediction_type)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised})
        # Split the move to sigma_next into a deterministic part and added noise: up^2 + down^2 = next^2.
        sigma_up = (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5
        sigma_down = (s[i + 1] ** 2 - sigma_up**2) ** 0.5
        d = (x - denoised) / s[i]
        x = x + d * (sigma_down - s[i])
        x = x + _step_noise(x, generators) * sigma_up  # drawn on the last step too, as diffusers
    return x


@torch.no_grad()
def ddim(model, x, sigmas, *, timesteps, extra_args=None, callback=None, generators=None, prediction_type="epsilon"):
    """DDIM, eta=0 (Song et al. 2020, Eq. 12), as diffusers' DDIMScheduler. In sigma form the DDIM
    update is x_next = x0 + sigma_next * eps, i.e. the Euler step; what differs is the schedule
    (integer timesteps, a final sigma(t=0) unless set_alpha_to_one) and the result, returned in
    alpha form x / sqrt(sigma_last^2 + 1) as DDIMScheduler's last `prev_sample`.

    We step to the next schedule sigma, as the paper's sub-sequence does. DDIMScheduler steps from t to
    t - T // n instead: the same for leading spacing (SDXL), and for trailing when n divides T; otherwise
    (linspace; trailing with e.g. 12 steps) it lands between schedule points and the results differ."""
    x, s = _check(x, sigmas, timesteps)
    for i, t in enumerate(timesteps):
        denoised = _denoise(model, x, s[i], t, extra_args, prediction_type)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised})
        eps = (x - denoised) / s[i]
        x = denoised + s[i + 1] * eps
    return x / (s[-1] ** 2 + 1) ** 0.5


@torch.no_grad()
def dpmpp_2m(model, x, sigmas, *, timesteps, extra_args=None, callback=None, generators=None,
             prediction_type="epsilon"):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, data prediction, midpoint form), as diffusers'
    DPMSolverMultistepScheduler (dpmsolver++, solver_order 2): the first step and the last step are
    first order (lower_order_final; with a final sigma of 0 the last step returns the denoised x0).
    Half-log-SNR lambda = -log(sigma) in sigma form."""
    x, s = _check(x, sigmas, timesteps)
    old_denoised, h_last = None, None
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        denoised = _denoise(model, x, s[i], t, extra_args, prediction_type)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised})
        if s[i + 1] == 0:
            x = denoised  # first-order step to sigma 0 is exactly x0
            continue
        h = math.log(s[i]) - math.log(s[i + 1])  # lambda_next - lambda
        if old_denoised is None or (i == n - 1 and n < 15):  # diffusers' lower_order_final
            d = denoised
        else:  # linear extrapolation of x0 in lambda from the previous step's x0
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


SAMPLERS = {"euler": euler, "euler_a": euler_a, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


def sampler_names() -> list[str]:
    return [n for base in SAMPLERS for n in (base, f"{base}_karras")]


def get_sampler(name: str):
    """`name` -> (sampler function, karras: bool); a `_karras` suffix selects Karras sigmas."""
    base, karras = _base_name(name)
    return SAMPLERS[base], karras
