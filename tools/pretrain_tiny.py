"""Pretrain the tiny SDXL on the tiny world of coloured shapes (tools/tiny_world.py), on a CPU.

    python -m tools.pretrain_tiny tiny_weights_out          # the shipped weights (about an hour on 2 cores)
    python -m sdxl.tiny my_tiny --weights tiny_weights_out       # a diffusers folder of the result
    python -m tools.pretrain_tiny /tmp/tiny --num_images 256 --vae_steps 20 --decoder_steps 5 --unet_steps 20 \
        --eval_images 2                                            # a smoke test, half a minute

Stages, in order:
1. render `num_images` captioned 64x64 pictures, the held-back colour (purple) left out entirely;
2. train the VAE (diffusers `AutoencoderKL`, SDXL's 4-level 8x layout at small widths) as an
   autoencoder: L1 reconstruction, weighted up on the shape's pixels, + a little KL; then set
   `scaling_factor` so that the scaled latents have unit std (Rombach et al. 2022, Sec. 3); then
   fine-tune its decoder alone on pictures of every colour, purple too, so that the VAE can draw what
   a LoRA will teach (see `finetune_decoder`); the encoder, and so the UNet's data, never sees purple;
3. encode every picture once (posterior mean) and every distinct caption once with the tiny CLIP pair,
   which stays random and frozen (`sdxl.tiny.write_tiny_text_encoders` with `TEXT_ENCODER_SEED`), and is
   shipped with the weights so the conditioning is reproducible;
4. train our `SDXLUNet` as an epsilon-prediction DDPM on the latents with SDXL's noise schedule
   (`diffusion.ddpm`), Min-SNR-5 loss weights (Hang et al. 2023), SDXL micro-conditioning
   (64, 64, 0, 0, 64, 64) and 10% caption dropout to zero prompt and pooled embeddings (what the
   sampler feeds for an empty negative prompt, SDXL's force_zeros_for_empty_prompt), so that
   classifier-free guidance works; an EMA of the weights is what is saved;
5. measure what it draws with our sampler (`sdxl.sample.generate_latents`, euler, 20 steps,
   CFG 5, fixed seeds) and the pixel classifiers of tools/tiny_world.py;
6. write OUT_DIR in the layout of sdxl/tiny_weights/: unet.fp16.safetensors, vae.safetensors (its
   scaling_factor in the file's metadata), text_encoder.safetensors, text_encoder_2.safetensors, and
   pretrain_report.json (settings, losses, timings, measured rates). `python -m sdxl.tiny DIR --weights
   OUT_DIR` builds a diffusers folder of them; copying them into sdxl/tiny_weights/ (and raising
   TINY_VERSION) makes them the `tiny` model.

Budget: the shipped weights took 57 min on one core (the other busy), plus 5 min for the decoder stage,
which was added after that run and applied to its VAE; about 45 min on two free cores.
"""

import argparse
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common.files import write_json
from diffusion.ddpm import add_noise, alphas_cumprod, min_snr_weights
from diffusion.vae import LatentVAE
from sampling.inference import to_pil
from sdxl.sample import generate_latents
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.tiny import TINY_UNET_CONFIG, TINY_VAE_CONFIG, write_tiny_text_encoders
from sdxl.unet import SDXLUNet
from tools import tiny_world

SIZE = 64  # pixels; latents are 8x8
TIME_IDS = (SIZE, SIZE, 0, 0, SIZE, SIZE)  # original size, crop top-left, target size


def render_dataset(n: int, seed: int, include_held_back: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, 64, 64) uint8, captions); the held-back colour only if `include_held_back`."""
    specs = tiny_world.sample_specs(n, seed, include_held_back=include_held_back)
    images = np.stack([np.asarray(tiny_world.render(s, SIZE)) for s in tqdm(specs, desc="render", unit="img")])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [tiny_world.caption(s) for s in specs]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1  # uint8 -> [-1, 1]


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def shape_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 + `weight` on the shape, found as in tiny_world.foreground
    (pixels away from their row's border colour). The shape is a small part of the picture, and the
    part that matters."""
    background = torch.cat([x[..., :2], x[..., -2:]], dim=-1).median(dim=-1).values  # (B, 3, H)
    on_shape = (x - background[..., None]).norm(dim=1, keepdim=True) > 0.2  # (B, 1, H, W)
    return 1 + weight * on_shape.float()


def train_vae(images: torch.Tensor, args) -> tuple[AutoencoderKL, dict]:
    """Autoencoder training: shape-weighted L1 + kl_weight * KL per latent element. Returns the VAE
    (scaling_factor set so that the posterior means have unit std) and what was measured."""
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    with torch.no_grad():  # posterior std starts at e^-3, not 1: early latents are not drowned in noise
        vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
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
        sample = to_unit(images[:2048])  # (<=2048, 3, 64, 64)
        z = torch.cat([vae.encode(sample[i : i + 256]).latent_dist.mean for i in range(0, len(sample), 256)])
        recon_l1 = (vae.decode(z[:256]).sample - sample[:256]).abs().mean().item()
    vae.register_to_config(scaling_factor=round(1.0 / z.std().item(), 5))
    return vae, {"final_weighted_l1": l1.item(), "final_kl": kl.item(), "recon_l1": recon_l1,
                 "latent_std": z.std().item(), "latent_mean": z.mean().item(),
                 "scaling_factor": vae.config.scaling_factor}  # fmt: skip


def finetune_decoder(vae: AutoencoderKL, images: torch.Tensor, args) -> dict:
    """Fine-tune the decoder alone (encoder frozen) on pictures of every colour, the held-back one too.

    The encoder fixes the latent space, so the UNet's data and the latents of the base colours do not
    change; but a decoder that never saw purple draws its latents green or white, and then no LoRA on
    the UNet could teach purple. SDXL's own VAE draws any colour; so must ours."""
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 3)
    bar = tqdm(range(args.decoder_steps), desc="decoder", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.decoder_steps, args.decoder_lr, warmup=50)
        x = to_unit(images[torch.randint(len(images), (args.vae_batch,), generator=gen)])  # (B, 3, 64, 64)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(gen)  # (B, 4, 8, 8)
        w = shape_weights(x, args.vae_shape_weight)
        l1 = ((vae.decode(z).sample - x).abs() * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        l1.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval().requires_grad_(False)
    return {"decoder_final_weighted_l1": l1.item()}


@torch.no_grad()
def encode_images(vae: LatentVAE, images: torch.Tensor) -> torch.Tensor:
    """Scaled posterior means (n, 4, 8, 8) of all pictures."""
    return torch.cat([vae.encode(to_unit(images[i : i + 256]), sample=False)
                      for i in tqdm(range(0, len(images), 256), desc="encode", unit="batch")])  # fmt: skip


@torch.no_grad()
def encode_captions(text_encoder: SDXLTextEncoder, captions: list[str]):
    """Each distinct caption once: (index of each caption's row, embeds (U, 77, 96), pooled (U, 32))."""
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    parts = [text_encoder.encode(unique[i : i + 256]) for i in range(0, len(unique), 256)]
    embeds, pooled = (torch.cat(p) for p in zip(*parts, strict=True))
    return torch.tensor([row[c] for c in captions]), embeds, pooled


def train_unet(latents, caption_rows, embeds, pooled, args) -> tuple[SDXLUNet, dict]:
    """Epsilon-prediction DDPM training on cached latents; returns the EMA UNet and what was measured."""
    unet = SDXLUNet(TINY_UNET_CONFIG)
    ema = SDXLUNet(TINY_UNET_CONFIG).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
    ac = alphas_cumprod()
    gen = torch.Generator().manual_seed(args.seed + 2)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(args.unet_batch, 1)  # (B, 6)
    losses = []
    bar = tqdm(range(args.unet_steps), desc="unet", unit="step")
    for step in bar:
        lr = cosine_lr(step, args.unet_steps, args.unet_lr, warmup=min(200, args.unet_steps // 10 + 1))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (args.unet_batch,), generator=gen)
        x0 = latents[idx]  # (B, 4, 8, 8)
        rows = caption_rows[idx]
        keep = (torch.rand(args.unet_batch, generator=gen) >= args.caption_dropout).float()  # (B,)
        context = embeds[rows] * keep[:, None, None]  # (B, 77, 96); dropped -> zeros
        text_embeds = pooled[rows] * keep[:, None]  # (B, 32)
        t = torch.randint(0, len(ac), (args.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = unet(add_noise(x0, noise, t, ac), t, context, {"text_embeds": text_embeds, "time_ids": time_ids})
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (per_sample * min_snr_weights(t, ac, gamma=5.0, prediction_type="epsilon")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{lr:.1e}")
    every = max(1, len(losses) // 20)
    return ema.eval(), {"loss_curve": [round(float(np.mean(losses[i : i + every])), 4)
                                       for i in range(0, len(losses), every)]}  # fmt: skip


@torch.no_grad()
def draw(unet, text_encoder, vae, prompts: list[str], seed: int, batch: int = 32, guidance_scale: float = 5.0):
    """PIL images of `prompts`, image i seeded `seed + i`: our euler sampler, 20 steps, empty negative prompt."""
    images = []
    for start in range(0, len(prompts), batch):
        embeds, pooled = text_encoder.encode(prompts[start : start + batch])
        seeds = range(seed + start, seed + start + len(embeds))
        latents = generate_latents(unet, embeds, pooled, seeds=seeds, height=SIZE, width=SIZE, steps=20,
                                   guidance_scale=guidance_scale, sampler="euler")  # (b, 4, 8, 8)
        images += to_pil(vae.decode(latents))
    return images


def measure(unet, text_encoder, vae, colours, per_colour: int, seed: int = 1000) -> dict:
    """For each colour, `per_colour` captions of that colour (random shape, size, place, background):
    the share of drawn images whose dominant colour is it, and the share whose shape is the one asked."""
    result = {"colour": {}, "shape_hits": {s: [0, 0] for s in tiny_world.SHAPES}}
    for k, colour in enumerate(colours):
        specs = tiny_world.sample_specs(per_colour, seed + k, only={"colour": [colour]})
        images = draw(unet, text_encoder, vae, [tiny_world.caption(s) for s in specs], seed)
        result["colour"][colour] = float(np.mean([tiny_world.dominant_colour(im) == colour for im in images]))
        for spec, im in zip(specs, images, strict=True):
            result["shape_hits"][spec.shape][0] += tiny_world.shape_of(im) == spec.shape
            result["shape_hits"][spec.shape][1] += 1
    hits = result.pop("shape_hits")
    result["shape"] = {s: h / max(1, n) for s, (h, n) in hits.items()}
    result["shape_overall"] = sum(h for h, _ in hits.values()) / max(1, sum(n for _, n in hits.values()))
    return result


def write_weights(out_dir: Path, unet: SDXLUNet, vae: AutoencoderKL, text_encoder_dir: Path) -> dict:
    """The weights in sdxl/tiny_weights/'s layout (the UNet in fp16). Returns the file sizes."""
    save_file({k: v.half().contiguous() for k, v in unet.state_dict().items()}, out_dir / "unet.fp16.safetensors")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, out_dir / "vae.safetensors",
              metadata={"format": "pt", "scaling_factor": repr(vae.config.scaling_factor)})
    for name in ("text_encoder", "text_encoder_2"):
        shutil.copyfile(text_encoder_dir / name / "model.safetensors", out_dir / f"{name}.safetensors")
    return {p.name: p.stat().st_size for p in sorted(out_dir.glob("*.safetensors"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Pretrain the tiny SDXL (VAE, then UNet) on the tiny world; CPU.")
    p.add_argument("out_dir", type=Path, help="folder to write the model into (created; must not hold a model)")
    g = p.add_argument_group("data")
    g.add_argument("--num_images", type=int, default=16384, help="pictures rendered for training (default 16384)")
    g.add_argument("--seed", type=int, default=0, help="seed of the pictures, initial weights and noise")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae_steps", type=int, default=1500, help="VAE optimizer steps (default 1500)")
    g.add_argument("--vae_batch", type=int, default=16, help="VAE batch size (default 16)")
    g.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate, AdamW (default 1e-3)")
    g.add_argument("--vae_kl_weight", type=float, default=1e-4, help="weight of the per-element KL term")
    g.add_argument("--vae_shape_weight", type=float, default=4.0, help="extra L1 weight on shape pixels (default 4)")
    g.add_argument("--decoder_steps", type=int, default=600, help="decoder-only steps on every colour (default 600)")
    g.add_argument("--decoder_lr", type=float, default=5e-4, help="peak learning rate of those steps (default 5e-4)")
    g.add_argument("--vae_from", type=Path, help="take the VAE from this earlier output folder (its vae.safetensors) "
                   "instead of training one")
    g = p.add_argument_group("UNet")
    g.add_argument("--unet_steps", type=int, default=3500, help="UNet optimizer steps (default 3500)")
    g.add_argument("--unet_batch", type=int, default=64, help="UNet batch size (default 64)")
    g.add_argument("--unet_lr", type=float, default=1e-3, help="UNet peak learning rate, AdamW (default 1e-3)")
    g.add_argument("--caption_dropout", type=float, default=0.1, help="share of zeroed (unconditional) captions")
    g.add_argument("--ema_decay", type=float, default=0.999, help="decay of the saved weight average")
    g = p.add_argument_group("run")
    g.add_argument("--eval_images", type=int, default=32, help="images drawn per colour to measure (default 32)")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = p.parse_args(argv)
    if (args.out_dir / "unet.fp16.safetensors").exists():
        print(f"error: {args.out_dir} already holds weights; choose a new folder or delete it", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report, clock = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, {}
    start = time.time()

    images, captions = render_dataset(args.num_images, args.seed)
    clock["render_s"] = time.time() - start
    if args.vae_from:
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        vae.load_state_dict(load_file(args.vae_from / "vae.safetensors"))
        with safe_open(str(args.vae_from / "vae.safetensors"), framework="pt") as f:
            vae.register_to_config(scaling_factor=float(f.metadata()["scaling_factor"]))
        report["vae"] = {"from": str(args.vae_from), "scaling_factor": vae.config.scaling_factor}
    else:
        vae, report["vae"] = train_vae(images, args)
        all_colours = render_dataset(args.num_images // 4, args.seed + 1, include_held_back=True)[0]
        report["vae"] |= finetune_decoder(vae, all_colours, args)
    clock["vae_s"] = time.time() - start - sum(clock.values())

    text_encoder_dir = Path(tempfile.mkdtemp(prefix="tiny-text-"))
    write_tiny_text_encoders(text_encoder_dir)  # random, frozen, TEXT_ENCODER_SEED
    text_encoder = SDXLTextEncoder.from_pretrained(text_encoder_dir)
    sdxl_vae = LatentVAE(vae)
    latents = encode_images(sdxl_vae, images)  # (n, 4, 8, 8)
    report["latents"] = {"std": latents.std().item(), "mean": latents.mean().item()}
    caption_rows, embeds, pooled = encode_captions(text_encoder, captions)
    clock["encode_s"] = time.time() - start - sum(clock.values())

    unet, report["unet"] = train_unet(latents, caption_rows, embeds, pooled, args)
    clock["unet_s"] = time.time() - start - sum(clock.values())

    colours = [c for c in tiny_world.COLOURS if c != tiny_world.HELD_BACK]
    report["drawn"] = measure(unet, text_encoder, sdxl_vae, colours, args.eval_images)
    report["drawn"]["held_back"] = measure(unet, text_encoder, sdxl_vae, [tiny_world.HELD_BACK],
                                           args.eval_images)["colour"]  # fmt: skip
    clock["measure_s"] = time.time() - start - sum(clock.values())

    report["files"] = write_weights(args.out_dir, unet, vae, text_encoder_dir)
    shutil.rmtree(text_encoder_dir, ignore_errors=True)
    report["parameters"] = {"unet": sum(p.numel() for p in unet.parameters()),
                            "vae": sum(p.numel() for p in vae.parameters())}  # fmt: skip
    report["seconds"] = {**{k: round(v, 1) for k, v in clock.items()}, "total": round(time.time() - start, 1)}
    report["threads"] = torch.get_num_threads()
    write_json(args.out_dir / "pretrain_report.json", report)
    print(json.dumps({k: report[k] for k in ("drawn", "seconds", "files")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
