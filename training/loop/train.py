"""The training loop: a LoRA on the SDXL UNet (and, with --train_text_encoder, on its two CLIP text encoders), by
denoising score matching (training/loop/loss.py).

One optimizer step, written out in `train`:
  1. its micro-batches (`gradient_accumulation_steps` of them; an epoch's last step may have fewer):
     images -> VAE latents x0 (fp32; cached or not), captions -> CLIP embeddings;
  2. noise and timesteps from a generator seeded by (seed, micro-step), so a resumed run draws the same;
  3. the UNet's loss under autocast over the frozen bf16/fp16 base weights, LoRA weights in fp32, divided by
     the number of micro-batches in the step, backward;
  4. gradients averaged over the processes (torch DDP, during the last micro-batch's backward; the text encoders'
     LoRA by one all-reduce after it), unscaled (fp16),
     clipped; a non-finite loss or gradient skips the step (weights and optimizer state unchanged); else optimizer step,
     LR schedule, EMA;
  5. log, validate, sample, checkpoint, stop on SIGTERM/SIGINT.
"""

import math
import random
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.errors import Stopped, TrainingError
from common.runtime import DTYPES, close_world, init_world
from diffusion.compile import compile_blocks
from diffusion.ddpm import alphas_cumprod
from lora.layer import LoRAConfig, apply_lora, lora_parameters
from lora.text_encoders import apply_text_encoder_lora, text_encoder_lora_parameters
from sdxl.loading import load_text_encoder, load_unet, load_vae
from training.config import save_resolved_config
from training.data.captions import CaptionStyle
from training.data.datasets import build_dataset
from training.data.masks import MaskSource, latent_mask
from training.loop.caching import LatentCache, TextEmbeddingCache
from training.loop.ema import EMA
from training.loop.loss import diffusion_loss, draw_timesteps_and_noise, time_ids_of
from training.loop.optim import eval_weights, lr_schedule, make_optimizer
from training.loop.side_tasks import SideTasks
from training.loop.signals import StopRequest
from training.loop.timesteps import NoiseRecipe
from training.run.checkpoints import check_resumable, rewind_metrics, start_or_resume
from training.run.loop_state import LoopState, restore, training_state
from training.run.metadata import dataset_metadata
from training.run.metrics import MetricsLog
from training.run.plan import check_not_finished, schedule_note, schedule_total


@dataclass
class Models:
    """What one training step runs: the UNet with its LoRA, the text encoders (frozen, or with a LoRA of their own
    with --train_text_encoder), the frozen VAE, and their caches."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    latents: LatentCache
    texts: TextEmbeddingCache
    lora_config: LoRAConfig

    def fill_caches(self, data, device) -> None:
        """Encode every image and caption of a folder dataset once, before the first step (training/loop/caching.py)."""
        self.latents.fill(data, self.vae, device)
        if hasattr(data, "records"):
            self.texts.fill([r.caption for r in data.records] + [""], self.text_encoder)

    def encode(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A data batch -> (x0 latents fp32, prompt embeds, pooled) on `device`."""
        x0 = self.latents.get(batch, self.vae, device)  # (B, 4, H/8, W/8)
        if self.text_encoder.trains:  # never cached (training/config.py): its LoRA gets gradients
            embeds, pooled = self.text_encoder(batch["captions"])
        else:
            embeds, pooled = self.texts.get(batch["captions"], self.text_encoder)
        return x0, embeds.to(device), pooled.to(device)


def build_models(args, device: torch.device) -> Models:
    """The frozen base UNet in the weight dtype with a fresh LoRA (seeded), the text encoders, the VAE (fp32)."""
    unet = load_unet(args.pretrained_model, dtype=DTYPES[args.precision], device=device)
    torch.manual_seed(args.seed)  # here, so that the LoRA init and dropout do not depend on how the model loaded
    random.seed(args.seed)
    np.random.seed(args.seed)
    lora_config = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_mode,
                             args.conv_rank, args.conv_alpha, args.use_dora)
    apply_lora(unet, lora_config)
    unet.set_gradient_checkpointing(args.gradient_checkpointing)
    unet.train()
    text_dtype = DTYPES[args.precision] if device.type == "cuda" else torch.float32
    text_encoder = load_text_encoder(args.pretrained_model, dtype=text_dtype, device=device)
    if args.train_text_encoder:  # after the UNet's LoRA: its init is the same with and without
        apply_text_encoder_lora(text_encoder, args.lora_rank, args.lora_alpha, args.lora_dropout,
                                args.text_encoder_target_mode, args.gradient_checkpointing)
    model_id = f"{Path(str(args.pretrained_model)).name}:{args.vae_model or ''}"
    return Models(
        unet=unet,
        text_encoder=text_encoder,
        vae=load_vae(args.vae_model or args.pretrained_model, device=device),
        latents=LatentCache(args.cache_latents, Path(args.cache_dir), model_id),
        texts=TextEmbeddingCache("disk" if args.cache_text_embeddings else "none", Path(args.cache_dir), model_id),
        lora_config=lora_config,
    )


def load_data(args, world):
    """The training data of this rank (and the validation data, on rank 0); a bad dataset is an error here,
    before any model loads."""
    kwargs = dict(resolution=args.image_size, batch_size=args.batch_size, bucketing=args.bucketing, seed=args.seed)
    kwargs["captions"] = CaptionStyle(args.caption_extension, args.caption_prefix, args.caption_suffix,
                                      args.keep_tokens_separator)
    data = build_dataset(args.data_dir, center_crop=args.center_crop, random_flip=args.random_flip,
                         caption_dropout=args.caption_dropout, shuffle_tags=args.shuffle_tags,
                         keep_tokens=args.keep_tokens, max_bad_fraction=args.max_bad_fraction,
                         rank=world.rank, world_size=world.size, dataset_config=args.dataset_config,
                         masks=MaskSource(args.mask_dir and Path(args.mask_dir), args.alpha_mask)
                         if args.masked_loss else None, **kwargs)
    if not (args.val_data_dir and world.main):
        return data, None
    return data, build_dataset(args.val_data_dir, center_crop=True, **kwargs)


def data_parallel(module: torch.nn.Module, world) -> torch.nn.Module:
    """Under torchrun, the module in torch DDP: its trainable (LoRA) gradients are averaged over the processes in
    buckets that overlap the backward pass. The frozen base weights are loaded by every rank from the same
    files, so DDP neither broadcasts nor watches them."""
    if world.size == 1:
        return module
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(module, device_ids=[world.device] if world.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def run_length(args, data) -> tuple[int, int | None]:
    """(optimizer steps of the run, batches per epoch or None for streamed shards, whose epochs end when they do)."""
    batches = len(data) if hasattr(data, "__len__") else None
    if batches is None and not args.max_train_steps:
        raise ValueError(f"{args.data_dir} is streamed from .tar shards: give --max_train_steps")
    return args.max_train_steps or args.num_epochs * math.ceil(batches / args.gradient_accumulation_steps), batches


def optimizer_steps(batches, accumulation: int):
    """An epoch's micro-batches grouped into optimizer steps of `accumulation`; its last step may have fewer."""
    batches = iter(batches)
    while group := list(islice(batches, accumulation)):
        yield group


def trained_parameters(models: Models) -> tuple[list, list]:
    """(every trained tensor, those of the text encoders' LoRA) of a run."""
    text_params = list(text_encoder_lora_parameters(models.text_encoder).values())
    return lora_parameters(models.unet) + text_params, text_params


def optimization(args, models: Models, lr_total: int, device):
    """(optimizer, LR multiplier, its scheduler, grad scaler, EMA or None) of a run. The optimizer has a group for
    the UNet's LoRA and, with --train_text_encoder, one for the text encoders' at --text_encoder_lr."""
    groups = [{"params": lora_parameters(models.unet)}]
    text_params = text_encoder_lora_parameters(models.text_encoder)
    if text_params:
        groups.append({"params": list(text_params.values()), "lr": args.text_encoder_lr or args.learning_rate})
    optimizer = make_optimizer(groups, args)
    schedule = lr_schedule(args, lr_total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    ema = EMA({n: p for n, p in models.unet.named_parameters() if p.requires_grad} | text_params,
              args.ema_decay) if args.use_ema else None
    return optimizer, schedule, scheduler, scaler, ema


def skip_step(loop: LoopState, optimizer, scaler, nonfinite_run: int, max_nonfinite_steps: int) -> int:
    """A step with a non-finite loss or gradient: no update (weights and optimizer state unchanged), counted;
    `max_nonfinite_steps` in a row stop the run. Returns the new count of skipped steps in a row."""
    optimizer.zero_grad(set_to_none=True)
    scaler.update()  # fp16: lowers the loss scale; otherwise a no-op
    loop.nonfinite_steps += 1
    tqdm.write(f"step {loop.step + 1}: non-finite loss or gradient, step skipped ({nonfinite_run} in a row)")
    if nonfinite_run >= max_nonfinite_steps:
        raise TrainingError(f"{nonfinite_run} non-finite steps in a row at step {loop.step + 1}: lower "
                            "--learning_rate, use --precision bf16/fp32, or check the data")
    return nonfinite_run


def resumed_loop(resume, args, world, models: Models, parts, schedule, lr_total: int, batches_per_epoch) -> LoopState:
    """A checkpoint put back into this run's models and optimizer `parts` (optimizer, scheduler, scaler, EMA):
    where its loop stood. metrics.jsonl loses the records after the checkpoint's step."""
    optimizer, scheduler, scaler, ema = parts
    loop = restore(resume, models.unet, optimizer, scheduler, scaler, ema, schedule, batches_per_epoch,
                   models.text_encoder)
    if world.main:
        rewind_metrics(Path(args.output_dir), loop.step)
        print(f"resuming from {resume.path} at step {loop.step} (epoch {loop.epoch}, batch {loop.position})")
        if note := schedule_note(resume, args, lr_total, batches_per_epoch):
            print(note)
    return loop


def train(args) -> dict:
    """Run a whole training job from a validated config (see training/config.py). Returns a summary.

    Raises `Stopped` after saving a checkpoint when SIGTERM/SIGINT arrive (training/loop/signals.py)."""
    t_start = time.time()
    world = init_world(args.device)  # one process, or one rank of torchrun
    device, output_dir = world.device, Path(args.output_dir)
    resume = start_or_resume(args, clear=world.main)  # before anything is written: never clobbers a previous run
    data, val_data = load_data(args, world)
    fingerprint = data.summary().get("fingerprint", "")
    total_steps, batches_per_epoch = run_length(args, data)
    if resume is not None:
        check_resumable(resume, args, fingerprint)
        check_not_finished(resume, total_steps)  # a finished run: say so, write nothing
    if world.main:
        save_resolved_config(args, output_dir)
    models = build_models(args, device)
    models.fill_caches(data, device)
    unet, (params, text_params) = models.unet, trained_parameters(models)
    if args.compile:
        compile_blocks(unet)
    trained = data_parallel(unet, world)  # what the step runs; validation and saving use `unet` itself
    lr_total = schedule_total(args, total_steps)
    optimizer, schedule, scheduler, scaler, ema = optimization(args, models, lr_total, device)
    loop = resumed_loop(resume, args, world, models, (optimizer, scheduler, scaler, ema), schedule, lr_total,
                        batches_per_epoch) if resume is not None else LoopState()
    log = MetricsLog(output_dir, args.wandb_project, args.wandb_run_name, config=vars(args)) if world.main else None
    loss_kwargs = dict(alphas_cumprod=alphas_cumprod().to(device), prediction_type=args.prediction_type,
                       loss_weighting=args.loss_weighting, min_snr_gamma=args.min_snr_gamma,
                       autocast_dtype=DTYPES[args.precision])
    started_at = float(resume.metadata.get("ss_training_started_at", t_start)) if resume else t_start
    side = SideTasks(args, world, models, val_data, log, ema, loss_kwargs,
                     state_of=lambda loop: {**training_state(loop, optimizer, scheduler, scaler, fingerprint),
                                            "world_size": world.size},  # for the effective batch in --inspect
                     run_info=(dataset_metadata(data, args.data_dir), started_at))
    if world.main:
        print(banner(args, world, data, params, total_steps))

    if resume is None:
        with eval_weights(optimizer):
            side.validate(loop)
    recipe = NoiseRecipe.of(args)
    accumulation, max_norm = args.gradient_accumulation_steps, args.max_grad_norm or math.inf
    saved_at, nonfinite_run = (loop.step if resume else None), 0
    bar = tqdm(total=total_steps, initial=loop.step, desc="training", unit="step", dynamic_ncols=True,
               disable=not world.main)
    t_step, samples = time.perf_counter(), 0
    epoch_batches = data.epochs(args.num_workers, pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with StopRequest() as stop:
            while loop.step < total_steps:
                batches = epoch_batches(loop.epoch, loop.position)
                for micro_batches in islice(optimizer_steps(batches, accumulation), total_steps - loop.step):
                    # --- one optimizer step ---------------------------------------------------------------
                    step_loss = torch.zeros(2, device=device)  # [mean loss, stop requested]: one all-reduce
                    for i, batch in enumerate(micro_batches):
                        x0, embeds, pooled = models.encode(batch, device)
                        t, noise, input_noise = draw_timesteps_and_noise(args.seed, loop.micro_step, x0.shape,
                                                                         world, recipe)
                        mask = latent_mask(batch["masks"]).to(device) if "masks" in batch else None  # (B, 1, h, w)
                        last = i == len(micro_batches) - 1  # DDP all-reduces the gradients in its backward
                        with nullcontext() if last or world.size == 1 else trained.no_sync():
                            loss = diffusion_loss(trained, x0, embeds, pooled, time_ids_of(batch).to(device),
                                                  t.to(device), noise.to(device), input_noise=input_noise.to(device),
                                                  mask=mask, **loss_kwargs).mean()
                            scaler.scale(loss / len(micro_batches)).backward()  # the mean over this step's batches
                        step_loss[0] += loss.detach() / len(micro_batches)
                        loop.micro_step, samples = loop.micro_step + 1, samples + x0.shape[0]
                    # the text encoders' LoRA is not in DDP's buckets (CLIP-L's last layer gets no gradient: unused)
                    world.mean([p.grad for p in text_params if p.grad is not None])
                    step_loss[1] = float(stop.signum is not None)
                    world.mean([step_loss])  # the loss over processes; any rank's stop request stops all
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                    step_loss, stopping, grad_norm = torch.cat([step_loss, grad_norm.reshape(1)]).tolist()  # one sync
                    loop.position += len(micro_batches)
                    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                        nonfinite_run = skip_step(loop, optimizer, scaler, nonfinite_run + 1, args.max_nonfinite_steps)
                        continue
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update()
                    loop.step, loop.last_loss, nonfinite_run = loop.step + 1, step_loss, 0

                    # --- report, validate, save, stop -----------------------------------------------------
                    elapsed, t_step = time.perf_counter() - t_step, time.perf_counter()
                    if world.main and (loop.step % args.log_interval == 0 or loop.step == total_steps):
                        log.log({"step": loop.step, "epoch": loop.epoch, "loss": step_loss,
                                 "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                 "samples_per_s": samples / max(elapsed, 1e-9),
                                 "peak_mem_mib": peak_memory_mib(device)})
                    samples = 0
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                    bar.update(1)
                    if side.due(loop.step) and loop.step < total_steps:  # the last step validates after the loop
                        with eval_weights(optimizer):  # schedule-free: validate and save its eval weights
                            side.validate(loop)
                    epoch_end = loop.position == batches_per_epoch
                    due = (args.save_interval and loop.step % args.save_interval == 0) or (
                        epoch_end and args.save_every_n_epochs and (loop.epoch + 1) % args.save_every_n_epochs == 0)
                    if due or stopping:
                        saved_at = loop.step
                        with eval_weights(optimizer):
                            path = side.save(loop)
                    if stopping:
                        raise Stopped(stop.signum or signal.SIGTERM, path)
                if loop.step < total_steps:  # the epoch ran out
                    loop.epoch, loop.position = loop.epoch + 1, 0
            bar.close()
            with eval_weights(optimizer):
                side.validate(loop, last=True)
                if saved_at != loop.step and (args.save_interval or args.save_every_n_epochs):  # so a longer run
                    side.save(loop)  # can continue it
                final = side.save_final(loop)
    finally:  # every exit, a stop or an error included
        bar.close()
        side.close()
        close_world(world)
    return {"steps": loop.step, "time_s": round(time.time() - t_start, 1), "final_loss": loop.last_loss,
            "nonfinite_steps": loop.nonfinite_steps, **data_problems(data), "lora": str(final),
            "metrics": str(output_dir / "metrics.jsonl"), "output_dir": str(output_dir)}


def banner(args, world, data, params, total_steps: int) -> str:
    summary = data.summary()
    source = (f"{summary['num_images']} images" if summary.get("num_images") is not None
              else f"{summary['shards']} .tar shards (samples unknown until streamed)")
    return (f"training {sum(p.numel() for p in params):,} LoRA parameters ({args.lora_target_mode}, rank "
            f"{args.lora_rank}) on {source}, {total_steps} steps of {effective_batch(args, world.size)}, device "
            f"{world.device}, {args.precision}")


def effective_batch(args, processes: int) -> str:
    """`N images (batch_size B x accumulation A x P processes)`: the images of one optimizer step."""
    b, a = args.batch_size, args.gradient_accumulation_steps
    plural = "es" * (processes != 1)
    return f"{b * a * processes} images (batch_size {b} x accumulation {a} x {processes} process{plural})"


def data_problems(data) -> dict:
    summary = data.summary()
    return {"bad_files": len(summary.get("bad_files", [])),
            "missing_captions": len(summary.get("missing_captions", []))}


def peak_memory_mib(device) -> float:
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
