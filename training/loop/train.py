"""The training loop: a LoRA on a family's denoiser (SDXL's UNet, SD 3.5's MMDiT, FLUX.1's transformer) and, with
--train_text_encoder, on its CLIP text encoders, by the family's objective (training/loop/loss.py). Nothing here
names a family: the model is reached through families.py.

One optimizer step, written out in `train`:
  1. its micro-batches (`gradient_accumulation_steps` of them; an epoch's last step may have fewer):
     images -> VAE latents x0 (fp32; cached or not), captions -> text embeddings;
  2. noise and times from a generator seeded by (seed, micro-step), so a resumed run draws the same;
  3. the denoiser's loss under autocast over the frozen bf16/fp16 base weights (or fp8 ones cast up per layer,
     --base_dtype, lora/base_weights.py), LoRA weights in fp32, divided by the number of micro-batches in the step,
     backward;
  4. gradients averaged over the processes (torch DDP, during the last micro-batch's backward; the text encoders'
     LoRA, and the whole LoRA when FSDP2 shards the base (--shard_base, training/loop/shard.py), by all-reduces
     after it), unscaled (fp16),
     clipped; a non-finite loss or gradient skips the step (weights and optimizer state unchanged); else optimizer step,
     LR schedule, EMA;
  5. log, validate, sample, checkpoint, stop on SIGTERM/SIGINT/SIGHUP.
"""

import math
import resource
import signal
import time
from contextlib import nullcontext
from itertools import islice
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import families
from common.errors import Stopped, TrainingError
from common.lock import lock_run_folder
from common.runtime import DTYPES, close_world, init_world
from diffusion.compile import compile_blocks
from diffusion.prompt_limits import cut_note
from lora.layer import lora_parameters
from lora.text_encoders import text_encoder_lora_parameters
from training.config import save_resolved_config
from training.data.captions import CaptionStyle
from training.data.datasets import TrainingData, build_dataset
from training.data.masks import MaskSource, latent_mask
from training.flags import Settings
from training.loop.caching import clear_cache_temporaries
from training.loop.ema import EMA
from training.loop.loss import diffusion_loss, draw_times_and_noise, noise_keys, weighted
from training.loop.models import Models, build_models, data_parallel, trained_parameters
from training.loop.optim import eval_weights, lr_schedule, make_optimizer
from training.loop.shard import average_gradients
from training.loop.side_tasks import SideTasks
from training.loop.signals import StopRequest
from training.run.checkpoints import check_resumable, rewind_metrics, start_or_resume
from training.run.folder import effective_batch
from training.run.loop_state import LoopState, restore, training_state
from training.run.metadata import dataset_metadata
from training.run.metrics import MetricsLog
from training.run.plan import (
    check_not_finished,
    finish_files,
    is_finished,
    missing_final_files,
    schedule_note,
    schedule_total,
)


def load_data(settings: Settings, world, sharded: bool = False) -> tuple[TrainingData, TrainingData | None]:
    """The training data of this rank (and the validation data, on rank 0, or on every rank of a sharded base,
    whose forwards need them all); a bad dataset is an error here, before any model loads."""
    data, batch_size, accumulation = settings.data, settings.optimizer.batch_size, \
        settings.optimizer.gradient_accumulation_steps
    kwargs = dict(resolution=data.image_size, batch_size=batch_size, bucketing=data.bucketing,
                  seed=settings.runtime.seed, captions=CaptionStyle(data.caption_extension, data.caption_prefix,
                                                                    data.caption_suffix, data.keep_tokens_separator))
    masks = MaskSource(data.mask_dir and Path(data.mask_dir), data.alpha_mask) if data.masked_loss else None
    train = build_dataset(data.data_dir, center_crop=data.center_crop, random_flip=data.random_flip,
                          caption_dropout=data.caption_dropout, shuffle_tags=data.shuffle_tags,
                          keep_tokens=data.keep_tokens, max_bad_fraction=data.max_bad_fraction, rank=world.rank,
                          world_size=world.size, dataset_config=data.dataset_config, masks=masks,
                          accumulation=accumulation, **kwargs)
    if not (data.val_data_dir and (world.main or sharded)):
        return train, None
    return train, build_dataset(data.val_data_dir, center_crop=True, whole_steps=False, **kwargs)


def run_length(opt, data: TrainingData, data_dir) -> tuple[int, int | None]:
    """(optimizer steps of the run, steps per epoch or None for streamed shards, whose epochs end when they do);
    `opt`: the OptimizerSettings. A folder's epoch is whole steps of `gradient_accumulation_steps` micro-batches."""
    batches = data.batches_per_epoch()
    if batches is None and not opt.max_train_steps:
        raise ValueError(f"{data_dir} is streamed from .tar shards: give --max_train_steps")
    steps = None if batches is None else math.ceil(batches / opt.gradient_accumulation_steps)
    return opt.max_train_steps or opt.num_epochs * steps, steps


def optimizer_steps(batches, accumulation: int):
    """An epoch's micro-batches grouped into optimizer steps of `accumulation`; its last step may have fewer."""
    batches = iter(batches)
    while group := list(islice(batches, accumulation)):
        yield group


def optimization(settings: Settings, models: Models, lr_total: int, device):
    """(optimizer, LR multiplier, its scheduler, grad scaler, EMA or None) of a run. The optimizer has a group for
    the denoiser's LoRA and, with --train_text_encoder, one for the text encoder's at --text_encoder_lr."""
    opt = settings.optimizer
    groups = [{"params": lora_parameters(models.denoiser)}]
    text_params = text_encoder_lora_parameters(models.text_encoder)
    if text_params:
        groups.append({"params": list(text_params.values()),
                       "lr": settings.lora.text_encoder_lr or opt.learning_rate})
    optimizer = make_optimizer(groups, opt)
    schedule = lr_schedule(opt, lr_total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.runtime.precision == "fp16")
    ema = EMA({n: p for n, p in models.denoiser.named_parameters() if p.requires_grad} | text_params,
              opt.ema_decay) if opt.use_ema else None
    return optimizer, schedule, scheduler, scaler, ema


def skip_step(loop: LoopState, optimizer, scaler, nonfinite_run: int, max_nonfinite_steps: int) -> None:
    """A step with a non-finite loss or gradient (the `nonfinite_run`-th in a row): no update (weights and optimizer
    state unchanged), counted; `max_nonfinite_steps` in a row stop the run."""
    optimizer.zero_grad(set_to_none=True)
    scaler.update()  # fp16: lowers the loss scale; otherwise a no-op
    loop.nonfinite_steps += 1
    tqdm.write(f"step {loop.step + 1}: non-finite loss or gradient, step skipped ({nonfinite_run} in a row)")
    if nonfinite_run >= max_nonfinite_steps:
        raise TrainingError(f"{nonfinite_run} non-finite steps in a row at step {loop.step + 1}: lower "
                            "--learning_rate, use --precision bf16/fp32, or check the data")


def resumed_loop(resume, settings: Settings, world, models: Models, parts, schedule, lr_total: int,
                 steps_per_epoch) -> LoopState:
    """A checkpoint put back into this run's models and optimizer `parts` (optimizer, scheduler, scaler, EMA):
    where its loop stood. metrics.jsonl loses the records after the checkpoint's step."""
    optimizer, scheduler, scaler, ema = parts
    loop = restore(resume, models.denoiser, optimizer, scheduler, scaler, ema, schedule, steps_per_epoch,
                   models.text_encoder if models.train_text_encoder else None)
    if world.main:
        rewind_metrics(Path(settings.checkpoints.output_dir), loop.step)
        print(f"resuming from {resume.path} at step {loop.step} (epoch {loop.epoch}, step {loop.position} of it)")
        if note := schedule_note(resume, settings.optimizer, lr_total, steps_per_epoch):
            print(note)
    return loop


def train(settings: Settings, family: str = "sdxl") -> dict:
    """Run a whole training job of a family's model from validated settings (training/config.py). Returns a summary.

    Raises `Stopped` after saving a checkpoint when SIGTERM/SIGINT/SIGHUP arrive (training/loop/signals.py), and
    `FolderInUse` when another run holds the output folder (common/lock.py)."""
    t_start = time.time()
    world = init_world(settings.runtime.device)  # one process, or one rank of torchrun
    # Before the folder is read, cleared or written: a second run on it stops here (rank 0 holds the lock).
    lock = lock_run_folder(settings.checkpoints.output_dir, "output_dir", world)
    try:
        return run(settings, family, world, t_start)
    finally:  # any exit; a killed process's lock goes with it
        if lock is not None:
            lock.release()


def run(settings: Settings, family: str, world, t_start: float) -> dict:
    """`train` in `world`, with the output folder locked."""
    data_s, opt, runtime, ckpt = settings.data, settings.optimizer, settings.runtime, settings.checkpoints
    device, output_dir = world.device, Path(ckpt.output_dir)
    resume = start_or_resume(ckpt, clear=world.main)  # before anything is written: never clobbers a previous run
    sharded = runtime.shard_base and world.size > 1
    if runtime.shard_base and not sharded:
        print("note: --shard_base with one process: nothing to shard, the base stays whole")
    data, val_data = load_data(settings, world, sharded)
    fingerprint = data.summary().get("fingerprint", "")
    total_steps, steps_per_epoch = run_length(opt, data, data_s.data_dir)
    if resume is not None:
        check_resumable(resume, settings.flat(), fingerprint, data_s.data_dir, world.size)
        if is_finished(resume, total_steps):  # say so and write nothing, unless its final files are missing
            return finished_run(resume, total_steps, settings, world)
    if world.main:
        save_resolved_config(settings.flat(), output_dir)
        clear_cache_temporaries(Path(runtime.cache_dir))  # a cache fill killed mid-write (kill -9) left them
    world.barrier()  # no rank writes to the caches before they are clear
    models = build_models(settings, families.get(family), device, sharded)
    records = {r.path: r.caption for r in data.records or []}  # once each (dataset_config repeats some)
    if world.main and (note := cut_note(models.text_encoder, list(records.values()), list(records), "captions")):
        print(note)  # once: captions longer than the text encoder reads
    if (note := models.fill_caches(data, device, val_data, settings.evaluation.validation_prompts)) and world.main:
        print(note)
    denoiser, (params, text_params) = models.denoiser, trained_parameters(models)
    if runtime.compile:
        compile_blocks(models.family.blocks(denoiser))
    # what the step runs; validation and saving use `denoiser` itself
    trained = data_parallel(denoiser, world, models.family.blocks(denoiser) if sharded else None)
    predictor = models.predictor(trained)
    lr_total = schedule_total(opt, total_steps)
    optimizer, schedule, scheduler, scaler, ema = optimization(settings, models, lr_total, device)
    loop = resumed_loop(resume, settings, world, models, (optimizer, scheduler, scaler, ema), schedule, lr_total,
                        steps_per_epoch) if resume is not None else LoopState()
    evaluation = settings.evaluation
    log = MetricsLog(output_dir, evaluation.wandb_project, evaluation.wandb_run_name,
                     config=settings.flat()) if world.main else None
    autocast_dtype = DTYPES[runtime.precision]
    started_at = float(resume.metadata.get("ss_training_started_at", t_start)) if resume else t_start
    side = SideTasks(settings, world, models, val_data, log, ema, autocast_dtype,
                     state_of=lambda loop: {**training_state(loop, optimizer, scheduler, scaler, fingerprint),
                                            "world_size": world.size},  # for the effective batch in --inspect
                     run_info=(dataset_metadata(data, data_s.data_dir), started_at))
    if world.main:
        print(banner(settings, world, data, params, total_steps))

    if resume is None:
        with eval_weights(optimizer):
            side.validate(loop)
    accumulation, max_norm = opt.gradient_accumulation_steps, opt.max_grad_norm or math.inf
    saved_at, nonfinite_run = (loop.step if resume else None), 0
    bar = tqdm(total=total_steps, initial=loop.step, desc="training", unit="step", dynamic_ncols=True,
               disable=not world.main)
    t_step, samples = time.perf_counter(), 0
    epoch_batches = data.epochs(data_s.num_workers, pin_memory=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with StopRequest() as stop:
            while loop.step < total_steps:
                batches = epoch_batches(loop.epoch, loop.position * accumulation)  # position: steps of the epoch
                for micro_batches in islice(optimizer_steps(batches, accumulation), total_steps - loop.step):
                    # --- one optimizer step ---------------------------------------------------------------
                    step_loss = torch.zeros(2, device=device)  # [mean loss, stop requested]: one all-reduce
                    for i, batch in enumerate(micro_batches):
                        x0, embeds, pooled = models.encode(batch, device)
                        keys = noise_keys(batch, loop.micro_step, world)  # each image's own (epoch, step, position)
                        t, noise, input_noise = draw_times_and_noise(runtime.seed, keys, x0.shape, models.objective,
                                                                     settings.noise)
                        t = t.to(device)
                        mask = latent_mask(batch["masks"]).to(device) if "masks" in batch else None  # (B, 1, h, w)
                        last = i == len(micro_batches) - 1  # DDP all-reduces the gradients in its backward
                        with trained.no_sync() if not last and isinstance(trained, DistributedDataParallel) \
                                else nullcontext():
                            loss = diffusion_loss(predictor(batch, embeds, pooled), models.objective, x0, t,
                                                  noise.to(device), input_noise=input_noise.to(device), mask=mask,
                                                  autocast_dtype=autocast_dtype)
                            loss = weighted(loss, models.objective, t).mean()
                            scaler.scale(loss / len(micro_batches)).backward()  # the mean over this step's batches
                        step_loss[0] += loss.detach() / len(micro_batches)
                        loop.micro_step, samples = loop.micro_step + 1, samples + x0.shape[0]
                    # the text encoder's LoRA is not in DDP's buckets (CLIP-L's last layer gets no gradient: unused);
                    # with a sharded base no LoRA is (FSDP2 ignores it)
                    average_gradients(params if sharded else text_params, world)
                    step_loss[1] = float(stop.signum is not None)
                    world.mean([step_loss])  # the loss over processes; any rank's stop request stops all
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                    step_loss, stopping, grad_norm = torch.cat([step_loss, grad_norm.reshape(1)]).tolist()  # one sync
                    loop.position += 1
                    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                        nonfinite_run += 1
                        skip_step(loop, optimizer, scaler, nonfinite_run, opt.max_nonfinite_steps)
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
                    if world.main and (loop.step % evaluation.log_interval == 0 or loop.step == total_steps):
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
                    epoch_end = loop.position == steps_per_epoch
                    due = (ckpt.save_interval and loop.step % ckpt.save_interval == 0) or (
                        epoch_end and ckpt.save_every_n_epochs and (loop.epoch + 1) % ckpt.save_every_n_epochs == 0)
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
                if saved_at != loop.step and (ckpt.save_interval or ckpt.save_every_n_epochs):  # so a longer run
                    side.save(loop)  # can continue it
                final = side.save_final(loop)
    finally:  # every exit, a stop or an error included
        epoch_batches.close()  # the data workers leave now, not at the interpreter's exit (training/data/workers.py)
        bar.close()
        side.close()
        close_world(world)
    return {"steps": loop.step, "time_s": round(time.time() - t_start, 1), "final_loss": loop.last_loss,
            "nonfinite_steps": loop.nonfinite_steps, **data_problems(data), "lora": str(final),
            "metrics": str(output_dir / "metrics.jsonl"), "output_dir": str(output_dir)}


def finished_run(resume, total_steps: int, settings: Settings, world) -> dict:
    """A resumed run at its length: AlreadyFinished (nothing written), or, where its final files are missing (a full
    disk while it wrote them), those files written from its last checkpoint by rank 0 (training/run/plan.py)."""
    ckpt, keep_best = settings.checkpoints, settings.evaluation.keep_best
    missing = world.broadcast(missing_final_files(ckpt.output_dir, keep_best) if world.main else None)  # one answer
    if not missing:
        check_not_finished(resume, total_steps)  # raises AlreadyFinished
    try:
        written = finish_files(resume, total_steps, ckpt.output_dir, ckpt.save_format, keep_best) if world.main else []
        world.barrier()
    finally:
        close_world(world)
    return {"steps": resume.state["step"], "wrote": ", ".join(map(str, written)), "output_dir": str(ckpt.output_dir)}


def banner(settings: Settings, world, data: TrainingData, params, total_steps: int) -> str:
    summary, opt, lora = data.summary(), settings.optimizer, settings.lora
    source = (f"{summary['num_images']} images" if summary.get("num_images") is not None
              else f"{summary['shards']} .tar shards (samples unknown until streamed)")
    text_encoders = ", text encoders too" if lora.train_text_encoder else ""
    return (f"training {sum(p.numel() for p in params):,} LoRA parameters ({lora.lora_target_mode}, rank "
            f"{lora.lora_rank}{text_encoders}) on {source}, {total_steps} steps of "
            f"{effective_batch(opt.batch_size, opt.gradient_accumulation_steps, world.size)}, device "
            f"{world.device}, {settings.runtime.precision}"
            + (f" (base weights {settings.runtime.base_dtype})" if settings.runtime.base_dtype !=
               settings.runtime.precision else ""))


def data_problems(data: TrainingData) -> dict:
    summary = data.summary()
    return {"bad_files": len(summary.get("bad_files", [])),
            "missing_captions": len(summary.get("missing_captions", [])),
            "links_outside": len(summary.get("links_outside", []))}


def peak_memory_mib(device) -> float:
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
