"""What the training loop does besides training (`SideTasks`), on rank 0 while the other ranks wait: the
validation loss at fixed timesteps, labelled sample grids, scores (--eval_interval) and the best checkpoint
(--keep_best), checkpoints, and the final LoRA files with their metadata. A base sharded across the processes
(--shard_base) needs every process in each of its forwards: then every rank validates, samples and generates the
images it scores, and rank 0 alone logs and writes.
"""

import math
import time
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from common.errors import CheckpointError, TrainingError
from common.files import atomic_write
from lora.files import save_lora
from lora.layer import lora_state_dict
from lora.text_encoders import text_encoder_lora_state_dict
from sampling.grid_labels import label_grid
from sampling.inference import sample_grid
from training.config import resolved_config_yaml
from training.flags import Settings
from training.loop.ema import EMA
from training.loop.loss import validation_loss
from training.loop.scoring import TrainingScores
from training.run.checkpoints import checkpoint_name, save_checkpoint, write_best_lora
from training.run.loop_state import LoopState
from training.run.metadata import run_metadata
from training.run.metrics import MetricsLog


class SideTasks:
    """What the loop does besides training, on rank 0 (other ranks wait at a barrier): the validation loss,
    sample grids and scores (--eval_interval), checkpoints, the best checkpoint, the final LoRA files."""

    def __init__(self, settings: Settings, world, models, val_data, log: MetricsLog | None, ema: EMA | None,
                 autocast_dtype, state_of, run_info: tuple[dict, float]):
        self.settings, self.evaluation = settings, settings.evaluation
        self.world, self.models, self.val_data, self.log, self.ema = world, models, val_data, log, ema
        self.autocast_dtype, self.state_of = autocast_dtype, state_of
        self.output_dir = Path(settings.checkpoints.output_dir)
        self.dataset_info, self.started_at = run_info  # for the LoRA files' ss_* / modelspec.* metadata
        self.computes = world.main or models.sharded  # who runs the validation's forwards
        self.scores = TrainingScores(settings, models, world.device, world.main) \
            if self.evaluation.eval_interval and self.computes else None

    def due(self, step: int) -> bool:
        """Whether an optimizer step is followed by a validation (loss, grid) or an evaluation (scores)."""
        return any(interval and step % interval == 0
                   for interval in (self.evaluation.validation_interval, self.evaluation.eval_interval))

    def validate(self, loop: LoopState, last: bool = False) -> None:
        """Validation loss (fixed timesteps and noise) and a sample grid of the validation prompts, at validation
        steps; KID (+ CLIP score) at evaluation steps; the first and last step have both. EMA weights are used."""
        args, models, step = self.evaluation, self.models, loop.step
        if not self.computes:
            return  # the other ranks wait in the next gradient all-reduce
        validating = last or step == 0 or (args.validation_interval and step % args.validation_interval == 0)
        evaluating = self.scores is not None and (last or step % args.eval_interval == 0)
        models.set_training(False)
        with self.ema.applied() if self.ema else nullcontext():
            if validating and self.val_data is not None:
                if self.world.main:
                    tqdm.write(f"step {step}: validation loss ...")
                loss = validation_loss(lambda b: models.encode(b, self.world.device), models.predictor(),
                                       models.objective, self.val_data, seed=self.settings.runtime.seed,
                                       autocast_dtype=self.autocast_dtype)
                if self.world.main:
                    self.log.log({"step": step, "val_loss": loss})
                    tqdm.write(f"step {step}: validation loss {loss:.6g}")
                self.keep_if_best(loop, "val_loss", loss)
            if validating and args.validation_prompts:
                self.sample_grid(step)
            if evaluating:
                if self.world.main:
                    tqdm.write(f"step {step}: scoring {args.eval_num_images} generated images ...")
                scores = self.scores()
                if self.models.sharded:  # rank 0 scored the images every rank generated: its scores, everywhere
                    scores = self.world.broadcast(scores)
                if self.world.main:
                    self.log.log({"step": step, **scores})
                self.keep_if_best(loop, "kid", scores.get("kid_mean", math.inf))
        models.set_training(True)

    def sample_grid(self, step: int) -> None:
        """samples/step_XXXXXX.png: a row per validation prompt, its images seeded 0, 1, ..., labelled."""
        args, models, device = self.evaluation, self.models, self.world.device
        prompts, seeds = args.validation_prompts, list(range(args.num_validation_images))
        if self.world.main:
            tqdm.write(f"step {step}: sampling {len(prompts)} prompts x {len(seeds)} images ...")
        embeds, pooled = models.texts.get(prompts, models.text_encoder)
        size = self.settings.data.image_size
        grid = sample_grid(models.family, models.denoiser, models.vae, models.text_encoder, embeds.to(device),
                           pooled.to(device), images_per_prompt=len(seeds), height=size, width=size,
                           scheduler_config=models.scheduler_config)
        if not self.world.main:
            return
        grid = label_grid(grid, prompts, seeds)
        path = self.output_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        tqdm.write(f"step {step}: sample grid {path}")
        self.log.log_image(step, "samples", path)

    def keep_if_best(self, loop: LoopState, metric: str, score: float) -> None:
        """--keep_best: a score lower than every earlier one replaces checkpoints/best/ (rank 0 writes)."""
        if self.evaluation.keep_best != metric or not score < loop.best_score:
            return
        loop.best_score, loop.best_step = score, loop.step
        if not self.world.main:
            return
        self._write(loop, name="best", metadata={"sdxl_lora.best_metric": metric, "sdxl_lora.best_score": repr(score),
                                                 "sdxl_lora.best_step": str(loop.step)})
        tqdm.write(f"step {loop.step}: best {metric} so far ({score:.6g}), saved checkpoints/best")

    def run_info(self, step: int) -> dict[str, str]:
        return self.dataset_info | run_metadata(self.settings.flat(), step, self.started_at, time.time())

    def _write(self, loop: LoopState, metadata: dict | None = None, **kwargs) -> Path:
        models = self.models
        try:
            lora = lora_state_dict(models.denoiser) | text_encoder_lora_state_dict(models.text_encoder)
            return save_checkpoint(self.output_dir, loop.step, lora, self.state_of(loop),
                                   resolved_config_yaml(self.settings.flat()), models.lora_config,
                                   ema=self.ema.state_dict() if self.ema else None,
                                   metadata=self.run_info(loop.step) | (metadata or {}),
                                   names=models.family.lora_names(self.settings.model.pretrained_model), **kwargs)
        except CheckpointError as e:  # non-finite weights; a disk error (WriteError) goes to the caller
            raise TrainingError(str(e)) from e

    def save(self, loop: LoopState) -> Path:
        """checkpoints/step_XXXXXX (rank 0 writes, every rank waits for it)."""
        path = self.output_dir / "checkpoints" / checkpoint_name(loop.step)
        if self.world.main:
            path = self._write(loop, keep_last=self.settings.checkpoints.keep_last)
            tqdm.write(f"saved checkpoint {path}")
        self.world.barrier()
        return path

    def save_final(self, loop: LoopState) -> Path:
        """lora_final.safetensors (the EMA weights with --use_ema) in --save_format, and lora_best.safetensors
        from checkpoints/best with --keep_best."""
        final, models, settings = self.output_dir / "lora_final.safetensors", self.models, self.settings
        save_format = settings.checkpoints.save_format
        metadata = {"sdxl_lora.training": resolved_config_yaml(settings.flat()), **self.run_info(loop.step)}
        if self.world.main:
            with self.ema.applied() if self.ema else nullcontext():
                save_lora(models.denoiser, final, models.lora_config,
                          models.family.lora_names(settings.model.pretrained_model), format=save_format,
                          metadata=metadata, text_encoder=models.text_encoder)
            if self.evaluation.keep_best != "none":
                write_best_lora(self.output_dir, save_format)
        self.world.barrier()
        return final

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
