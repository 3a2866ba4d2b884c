"""Pretrain a family's tiny model (tiny SDXL, tiny-sd3, tiny-flux) on the tiny world of coloured shapes
(tools/tiny_world.py), on a CPU, through the same family interface the trainer uses (families.py).

    python -m tools.pretrain_tiny sdxl tiny_sdxl_out            # the shipped sdxl/tiny_weights (see the report)
    python -m tools.pretrain_tiny sd3 tiny_sd3_out              # sd3/tiny_weights
    python -m tools.pretrain_tiny flux tiny_flux_out            # flux/tiny_weights
    python -m sdxl.tiny my_tiny --weights tiny_sdxl_out         # a diffusers folder of the result
    python -m tools.pretrain_tiny sdxl /tmp/t --num_images 256 --vae_steps 20 --denoiser_steps 20 --eval_images 2
                                                                # a smoke test, under a minute

Stages, in order:
1. render `num_images` pictures of the tiny world, the held-back colour (purple) left out, each with its full spec:
   its captions are drawn per step with parts left out (`tiny_world.partial_caption`), so the model answers the
   short prompts people write ("a red circle") and varies what they leave out;
2. train the family's tiny VAE (diffusers `AutoencoderKL`, 8x, 4 or 16 latent channels) as an autoencoder, on the
   tiny world with every colour (purple too), shapes of any hue and saturation, and striped and checked
   textures, so that encode -> decode keeps a user's colours and textures (`colour_table` measures it): L1
   weighted up on the shape's pixels, plus a little KL; then set its shift (16-channel families) and scale so
   that the scaled latents have zero mean and unit std (Rombach et al. 2022, Sec. 3); or, with `--vae_from DIR`,
   reuse the VAE an earlier run wrote to DIR (its scale and shift in the file's metadata);
3. encode every picture once (posterior mean) and every caption variant once with the family's random, frozen
   tiny text encoder (shipped with the weights, so the conditioning is reproducible), and the unconditional input
   the family samples with (`negative` of ""): SDXL's zeros, SD 3.5's and FLUX.1's encoded empty prompt;
4. train the family's tiny denoiser with the family's own objective and denoiser call (`objective`, `predict`):
   SDXL epsilon-DDPM with Min-SNR-5 weights, SD 3.5 and FLUX.1 rectified flow; 10% of the captions dropped to
   the unconditional input so that classifier-free guidance works; an EMA of the weights is what is saved;
   FLUX.1-dev-style models then distil guidance into their guidance embedding (`distill_guidance`), as FLUX.1-dev
   itself was made: sampled with embedded guidance and no CFG, it draws what CFG draws;
5. measure what it draws with the family's sampler (64 px, 20 steps, fixed seeds) and the pixel classifiers of
   tools/tiny_world.py, for full captions and for short prompts, and how varied 8 seeds of one short prompt are;
6. write OUT_DIR: the denoiser (fp16), vae.safetensors (scale and shift in its metadata), the text encoders, and
   pretrain_report.json (settings, losses, timings, measured rates). `python -m <family>.tiny DIR --weights
   OUT_DIR` builds a diffusers folder of them; copying them into <family>/tiny_weights/ (and raising the tiny
   model's version) makes them the family's tiny model.
"""

import argparse
import importlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

import families
from common.files import write_json
from diffusion.tiny_parts import tiny_vae
from diffusion.vae import LatentVAE
from sampling.inference import ImageGenerator
from tools import tiny_world
from training.flags import NoiseSettings

SIZE = 64  # pixels; latents are 8x8
DENOISER_FILE = {"sdxl": "unet.fp16.safetensors", "sd3": "transformer.safetensors", "flux": "transformer.safetensors"}
RECIPES = {  # the objective each tiny model is pretrained with (NoiseSettings), its guidance for measuring
    "sdxl": dict(noise=dict(prediction_type="epsilon", timestep_sampling="uniform", loss_weighting="min_snr",
                            min_snr_gamma=5.0), guidance=5.0),
    "sd3": dict(noise=dict(prediction_type="flow", timestep_sampling="logit_normal", flow_shift=1.0), guidance=5.0),
    "flux": dict(noise=dict(prediction_type="flow", timestep_sampling="logit_normal", flow_shift=1.0), guidance=5.0),
}
SHORT_PROMPTS = ("a red circle", "a blue square on a white background", "a green triangle", "a yellow star",
                 "an orange ring", "a black circle on a white background", "a white square on a black background")


# ---------------------------------------------------------------------------------------------------
# Data


def render(specs) -> torch.Tensor:
    """uint8 (n, 3, 64, 64) pictures of tiny-world specs."""
    images = np.stack([np.asarray(tiny_world.render(s, SIZE)) for s in tqdm(specs, desc="render", unit="img")])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def colour_and_texture_pictures(n: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, 64, 64): tiny-world shapes in any hue, saturation and value on any grey or coloured
    background, a third of them filled with stripes or checks of two colours (what the VAE must keep)."""
    rng = np.random.default_rng(seed)
    specs = tiny_world.sample_specs(n, seed, include_held_back=True)
    out = []
    for spec in tqdm(specs, desc="colour wheel", unit="img"):
        fg, bg = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        big = SIZE * tiny_world.SUPERSAMPLE
        image = Image.new("RGB", (big, big), bg if rng.random() < 0.5 else tiny_world.TONES[rng.choice(
            list(tiny_world.TONES))])
        fill = Image.new("RGB", (big, big), fg)
        if rng.random() < 1 / 3:  # a texture: stripes (any direction) or checks of fg and a second colour
            other, period = tuple(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(3, 9)) * 4
            yy, xx = np.mgrid[0:big, 0:big]
            kind = rng.integers(3)
            band = (xx // period) % 2 if kind == 0 else (yy // period) % 2 if kind == 1 else \
                ((xx // period) + (yy // period)) % 2
            pixels = np.where(band[..., None] == 1, np.array(other), np.array(fg)).astype(np.uint8)
            fill = Image.fromarray(pixels)
        cx, cy, r = tiny_world.geometry(spec)
        image.paste(fill, (0, 0), tiny_world.shape_mask(spec.shape, cx * big, cy * big, r * big, big))
        out.append(np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1  # uint8 -> [-1, 1]


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def shape_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 + `weight` on the shape, found as in tiny_world.foreground (pixels
    away from their row's border colour). The shape is a small part of the picture, and the part that matters."""
    background = torch.cat([x[..., :2], x[..., -2:]], dim=-1).median(dim=-1).values  # (B, 3, H)
    on_shape = (x - background[..., None]).norm(dim=1, keepdim=True) > 0.2  # (B, 1, H, W)
    return 1 + weight * on_shape.float()


# ---------------------------------------------------------------------------------------------------
# The VAE


def train_vae(config: dict, images: torch.Tensor, args) -> tuple[AutoencoderKL, dict]:
    """Autoencoder training: shape-weighted L1 + kl_weight * KL per latent element. Returns the VAE with its
    scale (and, for configs with a shift, shift) set so that scaled posterior means have zero mean, unit std."""
    vae = AutoencoderKL(**config)
    channels = vae.config.latent_channels
    with torch.no_grad():  # posterior std starts at e^-3, not 1: early latents are not drowned in noise
        conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
        conv.bias[channels:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    bar = tqdm(range(args.vae_steps), desc="vae", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, warmup=min(50, args.vae_steps // 10 + 1))
        x = to_unit(images[torch.randint(len(images), (args.vae_batch,), generator=gen)])  # (B, 3, 64, 64)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        w = shape_weights(x, args.vae_shape_weight)
        l1 = ((recon - x).abs() * w).mean() / w.mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = l1 + args.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sample = to_unit(images[:2048])
        z = torch.cat([vae.encode(sample[i : i + 256]).latent_dist.mean for i in range(0, len(sample), 256)])
    shift = round(z.mean().item(), 5) if config.get("shift_factor") is not None else None
    scale = round(1.0 / (z - (shift or 0.0)).std().item(), 5)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return vae, {"final_weighted_l1": l1.item(), "final_kl": kl.item(), "latent_mean": z.mean().item(),
                 "latent_std": z.std().item(), "scaling_factor": scale, "shift_factor": shift}


PALETTE = {  # colour in -> its RGB; what comes out is named by the nearest of these (the colour table)
    **tiny_world.COLOURS, "pink": (240, 120, 180), "cyan": (40, 200, 220), "brown": (130, 80, 40),
    "teal": (20, 130, 130), "magenta": (220, 40, 200), "lime": (160, 230, 40), "navy": (20, 30, 120),
    "olive": (120, 120, 30), "gray": (128, 128, 128),
}


@torch.no_grad()
def colour_table(vae: AutoencoderKL, n: int = 8, seed: int = 77) -> dict:
    """For each colour of PALETTE: `n` shapes of it on tiny-world backgrounds, encoded and decoded; the colour the
    decoded shape's mean foreground pixel is nearest to (most common over the n), and the mean RGB distance of
    in and out. Striped squares too: whether the stripes survive (contrast kept)."""
    latent = LatentVAE(vae)
    names, rgbs = list(PALETTE), np.array(list(PALETTE.values()), dtype=np.float32)
    rows = {}
    for k, (name, rgb) in enumerate(PALETTE.items()):
        specs = [s for s in tiny_world.sample_specs(4 * n, seed + k, include_held_back=True)
                 if name not in tiny_world.tones(s.background)][:n]  # visible on its background
        pictures = []
        for spec in specs:
            image = tiny_world.render(spec, SIZE)
            mask, px = tiny_world.foreground(image)
            px[mask] = rgb
            pictures.append(px.astype(np.uint8))
        x = to_unit(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2))
        out = ((latent.decode(latent.encode(x, sample=False)).clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
        found, distance = [], []
        for picture, decoded in zip(pictures, out, strict=True):
            mask, _ = tiny_world.foreground(Image.fromarray(picture))
            mean = decoded[mask].mean(axis=0)
            found.append(names[int(np.argmin(np.linalg.norm(rgbs - mean, axis=1)))])
            distance.append(float(np.linalg.norm(mean - np.array(rgb))))
        rows[name] = {"out": max(set(found), key=found.count), "kept": found.count(name) / len(found),
                      "rgb_distance": round(float(np.mean(distance)), 1)}
    stripes = colour_and_texture_pictures(64, seed)  # a third are textured; contrast inside the shape survives?
    x = to_unit(stripes)
    y = latent.decode(latent.encode(x, sample=False)).clamp(-1, 1)
    rows["textures_l1"] = round(float((y - x).abs().mean()), 4)
    return rows


# ---------------------------------------------------------------------------------------------------
# The denoiser


def caption_variants(spec) -> list[str]:
    """Every caption of a spec: each subset of the optional parts (2^3 = 8)."""
    parts = tiny_world.OPTIONAL_PARTS
    return [tiny_world.caption(spec, tuple(p for i, p in enumerate(parts) if mask >> i & 1)) for mask in range(8)]


@torch.no_grad()
def encode_captions(family, text_encoder, captions: list[str]):
    """Each distinct caption once: (row of each caption, embeds (U, L, C), pooled (U, P)) and the unconditional
    input (1, L, C), (1, P) the family samples with."""
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    parts = [text_encoder.encode(unique[i : i + 256]) for i in tqdm(range(0, len(unique), 256), desc="captions")]
    embeds, pooled = (torch.cat(p) for p in zip(*parts, strict=True))
    uncond = family.negative(text_encoder, [""], embeds[:1], pooled[:1])
    return row, embeds, pooled, uncond


def micro_conditioning(n: int) -> dict:
    """The batch fields a family's `predict` may read (SDXL's time ids): 64 px pictures, uncropped."""
    size = torch.tensor([[SIZE, SIZE]]).repeat(n, 1)
    return {"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size}


def train_denoiser(family, denoiser, objective, latents, rows, embeds, pooled, uncond, args) -> tuple:
    """The family's objective on cached latents; captions are drawn per step (`rows`: (n, 8) variant rows per
    picture), `caption_dropout` of them replaced by the unconditional input. Returns the EMA copy and the losses."""
    import copy

    denoiser.train().requires_grad_(True)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.denoiser_lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 2)
    batch = micro_conditioning(args.denoiser_batch)
    losses = []
    bar = tqdm(range(args.denoiser_steps), desc=family.NAME, unit="step")
    for step in bar:
        lr = cosine_lr(step, args.denoiser_steps, args.denoiser_lr, warmup=min(200, args.denoiser_steps // 10 + 1))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (args.denoiser_batch,), generator=gen)
        variant = torch.randint(8, (args.denoiser_batch,), generator=gen)
        x0, caption_rows = latents[idx], rows[idx, variant]  # (B, C, 8, 8), (B,)
        keep = torch.rand(args.denoiser_batch, generator=gen) >= args.caption_dropout  # (B,)
        context = torch.where(keep[:, None, None], embeds[caption_rows], uncond[0])  # dropped -> unconditional
        text = torch.where(keep[:, None], pooled[caption_rows], uncond[1])
        t = objective.draw_times(args.denoiser_batch, gen, x0.shape)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = objective.noisy(x0, noise, t)
        prediction = objective.output(family.predict(denoiser, x_t, t, context, text, batch), x_t, t)
        per_sample = F.mse_loss(prediction, objective.target(x0, noise, t), reduction="none").mean(dim=(1, 2, 3))
        weights = objective.weights(t)
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            for e, p in zip(ema.parameters(), denoiser.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{lr:.1e}")
    every = max(1, len(losses) // 20)
    return ema, {"loss_curve": [round(float(np.mean(losses[i : i + every])), 4) for i in range(0, len(losses), every)]}


def distill_guidance(family, teacher, objective, latents, rows, embeds, pooled, uncond, args) -> tuple:
    """FLUX.1-dev-style guidance distillation (what FLUX.1-dev's embedded guidance is): the student, fed guidance g
    in [1, 6] through its guidance embedding, learns the teacher's classifier-free-guided velocity at scale g
    (teacher: the pretrained EMA model, guidance embedding fed 1). Returns the student's EMA and its losses."""
    import copy

    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=args.distill_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 4)
    batch, losses = micro_conditioning(args.denoiser_batch), []
    bar = tqdm(range(args.distill_steps), desc="distil guidance", unit="step")
    for step in bar:
        idx = torch.randint(len(latents), (args.denoiser_batch,), generator=gen)
        variant = torch.randint(8, (args.denoiser_batch,), generator=gen)
        x0, caption_rows = latents[idx], rows[idx, variant]
        t = objective.draw_times(args.denoiser_batch, gen, x0.shape)
        x_t = objective.noisy(x0, torch.randn(x0.shape, generator=gen), t)
        g = 1 + 5 * torch.rand(args.denoiser_batch, generator=gen)  # (B,)
        context, text = embeds[caption_rows], pooled[caption_rows]
        with torch.no_grad():
            cond = family.predict(teacher, x_t, t, context, text, batch | {"guidance": torch.ones_like(g)})
            free = family.predict(teacher, x_t, t, uncond[0].expand_as(context), uncond[1].expand_as(text),
                                  batch | {"guidance": torch.ones_like(g)})
            target = free + g.view(-1, 1, 1, 1) * (cond - free)
        loss = F.mse_loss(family.predict(student, x_t, t, context, text, batch | {"guidance": g}), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), student.parameters(), strict=True):
                e.lerp_(p, 1 - min(args.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    return ema, {"distill_loss_curve": [round(float(np.mean(losses[i : i + 50])), 5)
                                        for i in range(0, len(losses), 50)]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Measuring


def measure(generator: ImageGenerator, per_colour: int, guidance: float, seed: int = 1000) -> dict:
    """Full captions: per colour, the share of pictures whose dominant colour is the one asked, and the share of
    right shapes; short prompts: the share of the asked colour; seeds: mean pairwise MS-SSIM of 8 seeds of one
    short prompt next to that of 8 real tiny-world pictures of it."""
    result = {"colour": {}, "shape_hits": {s: [0, 0] for s in tiny_world.SHAPES}}
    settings = dict(width=SIZE, height=SIZE, steps=20, guidance_scale=guidance)
    for k, colour in enumerate(tiny_world.COLOURS):
        specs = tiny_world.sample_specs(per_colour, seed + k, only={"colour": [colour]})
        images = generator.generate_unique_batch([tiny_world.caption(s) for s in specs],
                                                 list(range(seed, seed + per_colour)), **settings)
        result["colour"][colour] = float(np.mean([tiny_world.dominant_colour(im) == colour for im in images]))
        for spec, im in zip(specs, images, strict=True):
            if colour != tiny_world.HELD_BACK:
                result["shape_hits"][spec.shape][0] += tiny_world.shape_of(im) == spec.shape
                result["shape_hits"][spec.shape][1] += 1
    hits = result.pop("shape_hits")
    result["shape"] = {s: h / max(1, n) for s, (h, n) in hits.items()}
    result["shape_overall"] = sum(h for h, _ in hits.values()) / max(1, sum(n for _, n in hits.values()))
    short = {}
    for prompt in SHORT_PROMPTS:
        colour = next(c for c in tiny_world.COLOURS if f" {c} " in f" {prompt} ")
        images = generator.generate_unique_batch([prompt] * per_colour, list(range(seed, seed + per_colour)),
                                                 **settings)
        short[prompt] = float(np.mean([tiny_world.dominant_colour(im) == colour for im in images]))
    result["short_prompts"] = short
    prompt = SHORT_PROMPTS[0]
    images = generator.generate_unique_batch([prompt] * 8, list(range(seed, seed + 8)), **settings)
    real = [tiny_world.render(spec, SIZE) for spec in prompt_specs(prompt, 8, seed)]
    result["seed_diversity"] = {"prompt": prompt, "ms_ssim_generated": pairwise_ms_ssim(images),
                                "ms_ssim_real": pairwise_ms_ssim(real)}
    return result


def prompt_specs(prompt: str, n: int, seed: int) -> list:
    """`n` tiny-world specs that fit a (short) prompt: what it names fixed, the rest random."""
    background = next((b for b in sorted(tiny_world.BACKGROUNDS, key=len, reverse=True)
                       if f"on a {b} background" in prompt), None)
    rest = f" {prompt.replace(f'on a {background} background', '').replace(',', ' ')} "
    only = {field: [v for v in values if f" {v} " in rest]
            for field, values in (("colour", tiny_world.COLOURS), ("shape", tiny_world.SHAPES),
                                  ("size", tiny_world.SIZES), ("position", tiny_world.POSITIONS))}
    only = {k: v for k, v in only.items() if v} | ({"background": [background]} if background else {})
    return tiny_world.sample_specs(n, seed, only=only)


def pairwise_ms_ssim(images: list[Image.Image]) -> float:
    """Mean MS-SSIM over every pair of 64 px images (3 scales at 64 px, evaluation/metrics.py): how alike a set is."""
    from evaluation.metrics import ms_ssim_function, pair_values

    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    pairs = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
    return round(float(pair_values(ms_ssim_function(x.shape[-1]), x, x, pairs).mean()), 4)


def write_weights(out_dir: Path, family_name: str, denoiser, vae: AutoencoderKL, folder: Path) -> dict:
    """The weights in the family's tiny_weights layout (the denoiser in fp16). Returns the file sizes."""
    state = {k: v.half().contiguous() for k, v in denoiser.state_dict().items()}
    save_file(state, out_dir / DENOISER_FILE[family_name])
    metadata = {"format": "pt", "scaling_factor": repr(vae.config.scaling_factor)}
    if vae.config.shift_factor is not None:
        metadata["shift_factor"] = repr(vae.config.shift_factor)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, out_dir / "vae.safetensors", metadata=metadata)
    for encoder in sorted(folder.glob("text_encoder*")):
        shutil.copyfile(encoder / "model.safetensors", out_dir / f"{encoder.name}.safetensors")
    return {p.name: p.stat().st_size for p in sorted(out_dir.glob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a family's tiny model on the tiny world, on a CPU.")
    p.add_argument("family", choices=list(families.FAMILIES), help="which tiny model: sdxl, sd3 or flux")
    p.add_argument("out_dir", type=Path, help="folder to write the weights into (created; must not hold any)")
    g = p.add_argument_group("data")
    g.add_argument("--num_images", type=int, default=16384, help="pictures rendered for training (default 16384)")
    g.add_argument("--seed", type=int, default=0, help="seed of the pictures, initial weights and noise")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae_steps", type=int, default=2500, help="VAE optimizer steps (default 2500)")
    g.add_argument("--vae_batch", type=int, default=16, help="VAE batch size (default 16)")
    g.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate, AdamW (default 1e-3)")
    g.add_argument("--vae_kl_weight", type=float, default=1e-4, help="weight of the per-element KL term")
    g.add_argument("--vae_from", type=Path, help="reuse the vae.safetensors of this folder (an earlier OUT_DIR or "
                   "<family>/tiny_weights) instead of training one")
    g.add_argument("--vae_shape_weight", type=float, default=4.0, help="extra L1 weight on shape pixels (default 4)")
    g = p.add_argument_group("denoiser")
    g.add_argument("--denoiser_steps", type=int, default=3500, help="optimizer steps (default 3500)")
    g.add_argument("--denoiser_batch", type=int, default=64, help="batch size (default 64)")
    g.add_argument("--denoiser_lr", type=float, default=1e-3, help="peak learning rate, AdamW (default 1e-3)")
    g.add_argument("--caption_dropout", type=float, default=0.1, help="share of unconditional captions (default 0.1)")
    g.add_argument("--ema_decay", type=float, default=0.999, help="decay of the saved weight average")
    g.add_argument("--distill_steps", type=int, default=1000, help="guidance distillation steps, FLUX.1-dev-style "
                   "models only (default 1000)")
    g.add_argument("--distill_lr", type=float, default=2e-4, help="its learning rate (default 2e-4)")
    g = p.add_argument_group("run")
    g.add_argument("--eval_images", type=int, default=16, help="images drawn per colour to measure (default 16)")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    return p


def vae_stage(tiny, args) -> tuple[AutoencoderKL, dict]:
    """The tiny model's VAE: trained on the world (purple too) and on the colour wheel and textures, or, with
    --vae_from, one this tool trained before, with its measured scale and shift; and its colour table."""
    if args.vae_from is None:
        vae_images = torch.cat([render(tiny_world.sample_specs(args.num_images // 4, args.seed + 1,
                                                               include_held_back=True)),
                                colour_and_texture_pictures(args.num_images // 4, args.seed + 5)])
        vae, report = train_vae(tiny.TINY_VAE_CONFIG, vae_images, args)
    else:
        vae = tiny_vae(tiny.TINY_VAE_CONFIG, 0, args.vae_from).eval().requires_grad_(False)
        report = {"from": str(args.vae_from), "scaling_factor": vae.config.scaling_factor,
                  "shift_factor": vae.config.shift_factor}
    return vae, {**report, "colour_table": colour_table(vae)}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.out_dir.exists() and any(args.out_dir.glob("*.safetensors")):
        print(f"error: {args.out_dir} already holds weights; choose a new folder or delete it", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    family, tiny = families.get(args.family), importlib.import_module(f"{args.family}.tiny")
    recipe = RECIPES[args.family]
    report, clock = {"family": args.family, "args": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()}}, {}
    start = time.time()

    specs = tiny_world.sample_specs(args.num_images, args.seed)
    images = render(specs)
    clock["render_s"] = time.time() - start

    vae, report["vae"] = vae_stage(tiny, args)
    clock["vae_s"] = time.time() - start - sum(clock.values())

    folder = Path(tempfile.mkdtemp(prefix=f"tiny-{args.family}-random-"))
    tiny.build(folder / "model", weights=None)  # random: the text encoder is kept as it is (frozen)
    model = folder / "model"
    text_encoder = family.load_text_encoder(model, dtype=torch.float32, device="cpu")
    latent_vae = LatentVAE(vae)
    with torch.no_grad():
        latents = torch.cat([latent_vae.encode(to_unit(images[i : i + 256]), sample=False)
                             for i in tqdm(range(0, len(images), 256), desc="encode")])  # (n, C, 8, 8)
    report["latents"] = {"std": latents.std().item(), "mean": latents.mean().item()}
    variants = [caption_variants(s) for s in specs]
    row, embeds, pooled, uncond = encode_captions(family, text_encoder, [c for v in variants for c in v])
    rows = torch.tensor([[row[c] for c in v] for v in variants])  # (n, 8)
    clock["encode_s"] = time.time() - start - sum(clock.values())

    denoiser = family.load_denoiser(model, dtype=torch.float32, device="cpu")
    objective = family.objective(NoiseSettings(**recipe["noise"]), model)
    denoiser, report["denoiser"] = train_denoiser(family, denoiser, objective, latents, rows, embeds, pooled, uncond,
                                                  args)
    if getattr(getattr(denoiser, "config", None), "guidance_embeds", False) and args.distill_steps:
        denoiser, report["distillation"] = distill_guidance(family, denoiser, objective, latents, rows, embeds,
                                                            pooled, uncond, args)
    clock["denoiser_s"] = time.time() - start - sum(clock.values())

    generator = ImageGenerator(family, denoiser.eval(), text_encoder, latent_vae, family.scheduler_config(model))
    report["drawn"] = measure(generator, args.eval_images, recipe["guidance"])
    clock["measure_s"] = time.time() - start - sum(clock.values())

    report["files"] = write_weights(args.out_dir, args.family, denoiser, vae, model)
    shutil.rmtree(folder, ignore_errors=True)
    report["parameters"] = {"denoiser": sum(p.numel() for p in denoiser.parameters()),
                            "vae": sum(p.numel() for p in vae.parameters())}  # fmt: skip
    report["seconds"] = {**{k: round(v, 1) for k, v in clock.items()}, "total": round(time.time() - start, 1)}
    report["threads"] = torch.get_num_threads()
    write_json(args.out_dir / "pretrain_report.json", report)
    print(json.dumps({k: report[k] for k in ("drawn", "seconds", "files")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
