"""The training loss of one micro-batch, whatever the family: the family's objective (families.py `Objective`)
makes the noisy input and the target, the family's `predict` calls its denoiser, and the loss is

    loss = || objective.output(predict(x_t, t), x_t, t) - objective.target(x0, noise, t) ||^2 per sample
    (DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, target noise or v, diffusion/ddpm.py;
     rectified flow: x_t = (1 - s) x0 + s noise, target noise - x0, diffusion/flow.py)

weighted per sample by the objective's weights (Min-SNR, debiased, SD3's). The noise and times are drawn here,
the validation loss computed here: at fixed times, each validation image with noise drawn from (seed, time,
its path in the folder), so the loss is the same however the images are batched or split over processes.

Every image draws its time and noise from its own CPU generator, seeded by (seed, epoch, step, its position in
the step) (`noise_keys`, training/data/datasets.py): so a resumed run draws the same, and however a step's images
are cut into micro-batches and processes, each image gets the same noise (docs/ARCHITECTURE.md, "Seeds").
"""

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from common.runtime import World
from training.data.masks import masked_mean
from training.loop.noise import draw_noise

VALIDATION_TIMESTEPS = 5  # fixed times per validation image, spread over the trained range


def step_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, *stream): no hidden global RNG state."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def id_stream(key: str) -> tuple[int, int]:
    """Two 32-bit words of a sample id's SHA-256 (e.g. its path in the data folder): a generator stream of its own."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def draw_times_and_noise(seed: int, keys: torch.Tensor, shape, objective, noise
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch's times (B,), noise (B, C, h, w) and the noise x_t is made with (differs from `noise` only
    with --input_perturbation), CPU: image i's from the generator of (seed, *keys[i]) alone. `keys`: (B, k) noise
    keys; `noise`: the run's NoiseSettings."""
    times, noises, inputs = [], [], []
    for key in keys.tolist():
        g = step_generator(seed, *key)
        times.append(objective.draw_times(1, g, (1, *shape[1:])))
        image_noise, input_noise = draw_noise((1, *shape[1:]), noise, g)
        noises.append(image_noise)
        inputs.append(input_noise)
    return torch.cat(times), torch.cat(noises), torch.cat(inputs)


def noise_keys(batch: dict, micro_step: int, world: World) -> torch.Tensor:
    """The batch's noise keys: a folder dataset's (epoch, step, position) per sample; streamed shards, which have no
    steps, (micro-step, rank's position) (the same for the same processes and workers only)."""
    if "noise_keys" in batch:
        return batch["noise_keys"]
    b = len(batch["captions"])
    return torch.tensor([[0x5A4D, micro_step, world.rank * b + i] for i in range(b)])


def diffusion_loss(predict, objective, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                   input_noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   autocast_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-sample MSE of one micro-batch, unweighted; fp32, (B,).

    `predict(x_t, t)` is the family's denoiser call with this batch's conditioning; x0 (B, C, h, w) latents, t (B,),
    noise like x0; input_noise (default: noise) makes x_t, noise makes the target (input perturbation, Ning et al.
    2023); mask (B, 1, h, w) weights each latent pixel, normalised by its mean (--masked_loss, training/data/masks.py).
    The denoiser runs under autocast in `autocast_dtype` (bf16/fp16 over frozen base weights; fp32: no autocast)."""
    x_t = objective.noisy(x0, noise if input_noise is None else input_noise, t)  # (B, C, h, w)
    target = objective.target(x0, noise, t)
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        prediction = predict(x_t, t)
    output = objective.output(prediction.float(), x_t, t)
    per_pixel = F.mse_loss(output, target.float(), reduction="none")  # (B, C, h, w)
    return per_pixel.mean(dim=(1, 2, 3)) if mask is None else masked_mean(per_pixel, mask)  # (B,)


def weighted(loss: torch.Tensor, objective, t: torch.Tensor) -> torch.Tensor:
    """The per-sample loss times the objective's weights of `t` (--loss_weighting), if any."""
    weights = objective.weights(t)
    return loss if weights is None else loss * weights


@torch.no_grad()
def validation_loss(encode, predict, objective, val_data, *, seed: int,
                    autocast_dtype: torch.dtype = torch.float32) -> float:
    """Mean unweighted loss over the validation images at fixed times and fixed noise: comparable across steps and
    runs, whatever their timestep sampling, noise or loss weighting. `encode(batch)` -> (x0, embeds, pooled) on the
    denoiser's device; `predict(batch, embeds, pooled)` -> the family's `predict(x_t, t)` for that batch."""
    ts = objective.validation_times(VALIDATION_TIMESTEPS)
    total, count = 0.0, 0
    for batch in val_data.iter_epoch(0):
        x0, embeds, pooled = encode(batch)
        for k, t in enumerate(ts):
            noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=step_generator(seed, 0x7A1, k, *id_stream(
                key))) for key in batch["keys"]]).to(x0.device)  # each image's own, whatever the batching
            tt = t.repeat(x0.shape[0]).to(x0.device)
            loss = diffusion_loss(predict(batch, embeds, pooled), objective, x0, tt, noise,
                                  autocast_dtype=autocast_dtype)
            total, count = total + loss.sum().item(), count + loss.numel()
    return total / max(1, count)
