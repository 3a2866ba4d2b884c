"""The training loop: a LoRA on the SDXL UNet, by denoising score matching (Ho et al. 2020).

One optimizer step, written out (`train`):
  1. a micro-batch of images -> VAE latents x0 (fp32; cached or not), captions -> CLIP embeddings;
  2. noise and timesteps from a generator seeded by (seed, micro-step), so a resumed run draws the same;
  3. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; the UNet predicts epsilon (or v) under autocast
     over the frozen bf16/fp16 base weights, with the LoRA weights in fp32;
  4. the fp32 MSE, optionally Min-SNR weighted, divided by the accumulation steps, backward;
  5. after `gradient_accumulation_steps` micro-batches: unscale (fp16), clip, check finiteness
     (a non-finite step is skipped: weights and optimizer state unchanged), step, LR schedule, EMA;
  6. log, validate, sample, checkpoint.
"""

import math
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdxl.diffusion import add_noise, alphas_cumprod, min_snr_weights, v_target
from sdxl.loading import load_text_encoder, load_unet, load_vae
from sdxl.lora import LoRAConfig, apply_lora, load_lora_state_dict, lora_parameters, lora_state_dict, save_lora
from training.caching import LatentCache, TextEmbeddingCache
from training.checkpoints import (
    CheckpointError,
    capture_rng,
    check_resumable,
    checkpoint_name,
    restore_rng,
    rewind_metrics,
    save_checkpoint,
    start_or_resume,
)
from training.config import resolved_config_yaml, save_resolved_config
from training.data_loader import build_dataset
from training.distributed import close_world, init_world
from training.ema import EMA
from training.metrics import MetricsLog
from training.signals import Stopped, StopRequest

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VALIDATION_TIMESTEPS = 5  # fixed timesteps per validation image, spread over [min_timestep, max_timestep]


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def step_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, *stream): no hidden global RNG state."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warmup over `warmup` steps, then constant, linear decay to 0, or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_optimizer(params, args):
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
               weight_decay=args.weight_decay)


def time_ids_of(batch: dict) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size, each (h, w)."""
    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()  # (B, 6)


@dataclass
class Models:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    latents: LatentCache
    texts: TextEmbeddingCache
    ac: torch.Tensor  # alphas_cumprod, (1000,)

    def encode(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A data batch -> (x0 latents fp32, prompt embeds, pooled) on `device`."""
        x0 = self.latents.get(batch, self.vae).to(device)  # (B, 4, H/8, W/8)
        embeds, pooled = self.texts.get(batch["captions"], self.text_encoder)
        return x0, embeds.to(device), pooled.to(device)


def diffusion_loss(models: Models, args, x0, embeds, pooled, time_ids, t, noise, autocast_dtype):
    """The per-sample weighted MSE of one micro-batch, fp32, (B,)."""
    ac = models.ac
    noisy = add_noise(x0, noise, t, ac)  # (B, 4, h, w)
    target = v_target(x0, noise, t, ac) if args.prediction_type == "v_prediction" else noise
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        pred = models.unet(noisy, t, embeds, cond)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if args.min_snr_gamma > 0:
        loss = loss * min_snr_weights(t, ac, args.min_snr_gamma, args.prediction_type)
    return loss


@torch.no_grad()
def validation_loss(models: Models, args, val_data, device, autocast_dtype) -> float:
    """Mean loss over the validation images at fixed timesteps and fixed noise: comparable across steps."""
    ts = torch.linspace(args.min_timestep, args.max_timestep, VALIDATION_TIMESTEPS).round().long()
    total, count = 0.0, 0
    for i, batch in enumerate(val_data.iter_epoch(0)):
        x0, embeds, pooled = models.encode(batch, device)
        time_ids = time_ids_of(batch).to(device)
        for k, t in enumerate(ts):
            g = step_generator(args.seed, 0x7A1, i, k)
            noise = torch.randn(x0.shape, generator=g).to(device)
            tt = t.repeat(x0.shape[0]).to(device)
            loss = diffusion_loss(models, args, x0, embeds, pooled, time_ids, tt, noise, autocast_dtype)
            total, count = total + loss.sum().item(), count + loss.numel()
    return total / max(1, count)


def train(args) -> dict:
    """Run a whole training job from a validated config (see training/config.py). Returns a summary.

    Raises `Stopped` after saving a checkpoint when SIGTERM/SIGINT arrive (training/signals.py)."""
    t_start = time.time()
    world, device_name = init_world(args.device)  # one process, or one rank of torchrun
    device = torch.device(device_name)
    output_dir = Path(args.output_dir)
    resume = start_or_resume(args, clear=world.main)  # before anything is written: never clobbers a previous run
    if world.main:
        save_resolved_config(args, output_dir)
    weight_dtype = WEIGHT_DTYPES[args.precision]

    # Data first: a bad dataset stops the run before any model is loaded.
    data_kwargs = dict(resolution=args.image_size, batch_size=args.batch_size, bucketing=args.bucketing, seed=args.seed)
    data = build_dataset(args.data_dir, center_crop=args.center_crop, random_flip=args.random_flip,
                         caption_dropout=args.caption_dropout, shuffle_tags=args.shuffle_tags,
                         keep_tokens=args.keep_tokens, max_bad_fraction=args.max_bad_fraction,
                         rank=world.rank, world_size=world.size, **data_kwargs)
    val_data = None
    if args.val_data_dir and world.main:
        val_data = build_dataset(args.val_data_dir, center_crop=True, **data_kwargs)
    data_summary = data.summary()
    if resume is not None:
        check_resumable(resume, args, data_summary.get("fingerprint", ""))

    unet = load_unet(args.pretrained_model, dtype=weight_dtype, device=device)
    torch.manual_seed(args.seed)  # here, so that the LoRA init and dropout do not depend on how the model loaded
    random.seed(args.seed)
    np.random.seed(args.seed)
    lora_config = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_mode)
    apply_lora(unet, lora_config)
    unet.set_gradient_checkpointing(args.gradient_checkpointing)
    unet.train()
    text_dtype = weight_dtype if device.type == "cuda" else torch.float32
    model_id = f"{Path(str(args.pretrained_model)).name}:{args.vae_model or ''}"
    models = Models(
        unet=unet,
        text_encoder=load_text_encoder(args.pretrained_model, dtype=text_dtype, device=device),
        vae=load_vae(args.vae_model or args.pretrained_model, device=device),
        latents=LatentCache(args.cache_latents, Path(args.cache_dir), model_id),
        texts=TextEmbeddingCache("disk" if args.cache_text_embeddings else "none", Path(args.cache_dir), model_id),
        ac=alphas_cumprod().to(device),
    )

    params = lora_parameters(unet)
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(params, args)
    accum = args.gradient_accumulation_steps
    # Streamed shards have no length: their epochs end when the shards do, and --max_train_steps is needed.
    batches_per_epoch = len(data) if hasattr(data, "__len__") else None
    if batches_per_epoch is None and not args.max_train_steps:
        raise ValueError(f"{args.data_dir} is streamed from .tar shards: give --max_train_steps")
    steps_per_epoch = math.ceil(batches_per_epoch / accum) if batches_per_epoch else None
    total_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch) if steps_per_epoch else 10**9
    schedule = partial(lr_multiplier, warmup=args.warmup_steps, total=total_steps, kind=args.lr_scheduler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    ema = EMA(named, args.ema_decay) if args.use_ema else None
    autocast_dtype = weight_dtype
    config_yaml = resolved_config_yaml(args)

    def say(message: str) -> None:
        if world.main:
            print(message)

    # Where the run starts: step 0, or exactly where the checkpoint left off.
    step, epoch, position, micro, last_loss, nonfinite_total = 0, 0, 0, 0, float("nan"), 0
    if resume is not None:
        st = resume.state
        load_lora_state_dict(unet, resume.lora)
        if ema is not None:
            ema.load_state_dict(resume.ema)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["lr_scheduler"])
        # this run's schedule (--max_train_steps may differ): the same value when it does not
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        scaler.load_state_dict(st["grad_scaler"])
        restore_rng(st["rng"])
        step, epoch, position, micro = st["step"], st["epoch"], st["position"], st["micro_step"]
        last_loss, nonfinite_total = st["last_loss"], st["nonfinite_steps"]
        if batches_per_epoch is not None and position >= batches_per_epoch:
            epoch, position = epoch + 1, 0
        if world.main:
            rewind_metrics(output_dir, step)
        say(f"resuming from {resume.path} at step {step} (epoch {epoch}, batch {position})")

    log = MetricsLog(output_dir, args.wandb_project, args.wandb_run_name, config=vars(args)) if world.main else None
    sampler = SampleGrids(args, output_dir, device) if args.validation_prompts and world.main else None
    n_params = sum(p.numel() for p in params)
    say(f"training {n_params:,} LoRA parameters ({lora_config.target_mode}, rank {lora_config.rank}) on "
          f"{data_summary['num_images']} images, {total_steps} steps, device {device}, {args.precision}"
          + (f", {world.size} processes" if world.size > 1 else ""))

    def validate(step: int) -> None:
        if not world.main:  # the other ranks wait in the next gradient all-reduce
            return
        unet.eval()
        if val_data is not None:
            log.log({"step": step, "val_loss": validation_loss(models, args, val_data, device, autocast_dtype)})
        if sampler is not None:
            with ema.applied() if ema else nullcontext():
                path = sampler.make(step, models)
            log.log_image(step, "samples", path)
        unet.train()

    def save(step: int, epoch: int, position: int) -> Path:
        path = output_dir / "checkpoints" / checkpoint_name(step)
        if not world.main:
            world.barrier()
            return path
        state = {"step": step, "epoch": epoch, "position": position, "micro_step": micro,
                 "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                 "grad_scaler": scaler.state_dict(), "rng": capture_rng(), "last_loss": last_loss,
                 "nonfinite_steps": nonfinite_total, "data_fingerprint": data_summary.get("fingerprint", "")}
        try:
            path = save_checkpoint(output_dir, step, lora_state_dict(unet), state, config_yaml, lora_config,
                                   ema=ema.state_dict() if ema else None, keep_last=args.keep_last)
        except CheckpointError as e:
            raise TrainingError(str(e)) from e
        tqdm.write(f"saved checkpoint {path}")
        world.barrier()
        return path

    if resume is None:
        validate(0)
    nonfinite_run, accum_loss, pending = 0, 0.0, 0
    saved_at, resume_point = (step if resume is not None else None), (epoch, position)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not world.main)
    t_step, samples_since = time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with StopRequest() as stop:
        while step < total_steps and epoch < num_epochs:
            first = position
            for position, batch in enumerate(data.iter_epoch(epoch, first, args.num_workers), start=first):
                # --- one micro-batch: forward and backward --------------------------------------------
                g = step_generator(args.seed, micro)
                x0, embeds, pooled = models.encode(batch, device)
                b, c = x0.shape[:2]
                mine = slice(world.rank * b, (world.rank + 1) * b)  # this rank's rows of the global batch's draws
                t = torch.randint(args.min_timestep, args.max_timestep + 1, (b * world.size,), generator=g)[mine]
                noise = torch.randn((b * world.size, *x0.shape[1:]), generator=g)[mine]
                if args.noise_offset > 0:  # shifts each channel's mean: lets the model learn very dark/bright images
                    noise = noise + args.noise_offset * torch.randn((b * world.size, c, 1, 1), generator=g)[mine]
                t = t.to(device)
                time_ids = time_ids_of(batch).to(device)
                loss = diffusion_loss(models, args, x0, embeds, pooled, time_ids, t, noise.to(device), autocast_dtype)
                loss = loss.mean()
                scaler.scale(loss / accum).backward()
                accum_loss += loss.item() / accum
                micro, pending, samples_since = micro + 1, pending + 1, samples_since + b
                epoch_end = position + 1 == batches_per_epoch
                if pending < accum and not epoch_end:  # an epoch's last step may have fewer micro-batches
                    continue
                pending = 0

                # --- the optimizer step ---------------------------------------------------------------
                reduced = torch.tensor([accum_loss], device=device)
                world.mean([p.grad for p in params if p.grad is not None] + [reduced])  # average over ranks
                accum_loss = reduced.item()
                scaler.unscale_(optimizer)
                max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
                if not (math.isfinite(accum_loss) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()  # fp16: lowers the loss scale; otherwise a no-op
                    nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
                    tqdm.write(f"step {step + 1}: non-finite loss or gradient, step skipped ({nonfinite_run} in a row)")
                    accum_loss = 0.0
                    if nonfinite_run >= args.max_nonfinite_steps:
                        bar.close()
                        if log is not None:
                            log.close()
                        raise TrainingError(f"{nonfinite_run} non-finite steps in a row at step {step + 1}: "
                                            "lower --learning_rate, use --precision bf16/fp32, or check the data")
                    continue
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
                step, nonfinite_run, last_loss, accum_loss = step + 1, 0, accum_loss, 0.0
                resume_point = (epoch, position + 1)  # what a checkpoint of this step records

                # --- report, validate, save -----------------------------------------------------------
                elapsed = time.perf_counter() - t_step
                record = {"step": step, "epoch": epoch, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": grad_norm, "samples_per_s": samples_since / max(elapsed, 1e-9),
                          "peak_mem_mib": peak_memory_mib(device)}
                if world.main and (step % args.log_interval == 0 or step == total_steps):
                    log.log(record)
                t_step, samples_since = time.perf_counter(), 0
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}")
                bar.update(1)
                if args.validation_interval and step % args.validation_interval == 0 and step < total_steps:
                    validate(step)
                due = (args.save_interval and step % args.save_interval == 0) or (
                    epoch_end and args.save_every_n_epochs and (epoch + 1) % args.save_every_n_epochs == 0)
                stopping = world.any(stop.signum is not None, device)  # every rank stops at the same step
                if due or stopping:
                    save(step, *resume_point)
                    saved_at = step
                if stopping:
                    bar.close()
                    if log is not None:
                        log.close()
                    close_world(world)
                    raise Stopped(stop.signum or signal.SIGTERM, output_dir / "checkpoints" / checkpoint_name(step))
                if step >= total_steps:
                    break
            else:  # the epoch ran out (not cut by the last step)
                epoch, position = epoch + 1, 0
    bar.close()

    validate(step)
    if saved_at != step and (args.save_interval or args.save_every_n_epochs):  # so a longer run can continue it
        save(step, *resume_point)
    final = output_dir / "lora_final.safetensors"
    metadata = {"sdxl_lora.training": config_yaml, "ss_steps": str(step), "ss_seed": str(args.seed),
                "ss_learning_rate": str(args.learning_rate), "ss_resolution": str(args.image_size)}
    if world.main:
        with ema.applied() if ema else nullcontext():
            save_lora(unet, final, lora_config, format=args.save_format, metadata=metadata)
        log.close()
    world.barrier()
    close_world(world)
    summary = {
        "steps": step, "time_s": round(time.time() - t_start, 1), "final_loss": last_loss,
        "nonfinite_steps": nonfinite_total, "bad_files": len(data_summary.get("bad_files", [])),
        "missing_captions": len(data_summary.get("missing_captions", [])), "lora": str(final),
        "metrics": str(output_dir / "metrics.jsonl"), "output_dir": str(output_dir),
    }
    return summary


def peak_memory_mib(device) -> float:
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SampleGrids:
    """Sample images from fixed prompts and seeds, saved as one PNG grid per validation."""

    def __init__(self, args, output_dir: Path, device):
        self.prompts, self.n = list(args.validation_prompts), args.num_validation_images
        self.size, self.device = args.image_size, device
        self.dir = output_dir / "samples"

    def make(self, step: int, models: Models) -> Path:
        from sampling.inference import generate_latents, images_to_grid

        embeds, pooled = models.texts.get(self.prompts, models.text_encoder)
        images = []
        for p in range(len(self.prompts)):
            seeds = list(range(self.n))
            latents = generate_latents(models.unet, embeds[p : p + 1].expand(self.n, -1, -1).to(self.device),
                                       pooled[p : p + 1].expand(self.n, -1).to(self.device), seeds=seeds,
                                       height=self.size, width=self.size, steps=20, guidance_scale=5.0)
            images.append(models.vae.decode(latents))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:06d}.png"
        images_to_grid(torch.cat(images), rows=len(self.prompts)).save(path)
        return path
