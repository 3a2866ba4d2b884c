"""A resumed run against its plan: a run that is already finished, and the LR schedule of an extended one.

A run's length is --max_train_steps, or --num_epochs x the optimizer steps of an epoch. Resuming a checkpoint
at (or past) that length has nothing to train: `check_not_finished` says so before anything is written, so a
re-queued `--resume_from latest` of a finished run changes no file. Unless the run's final files are missing (the
disk filled up while lora_final.safetensors was written, and the error said to resume): `finish_files` then
writes them from that checkpoint, as the run would have (its EMA weights with --use_ema, lora_best.safetensors
from checkpoints/best with --keep_best), and says so.

The LR schedule (training/loop/optim.py `lr_multiplier`) runs over `--lr_schedule_total` steps, by default the
run's length. Extending a finished run (resuming it with a larger --max_train_steps) therefore recomputes a
linear or cosine schedule over the new length, from the first step: at the resumed step the learning rate
jumps from the old schedule's end (0) to the new schedule's value there. `schedule_note` prints both values.
To keep one curve across extensions, give `--lr_schedule_total` the longest length you may train to, from
the first run on: every stop and extension up to it then follows the same schedule.
"""

from pathlib import Path

from common.errors import AlreadyFinished
from lora.files import write_lora
from training.loop.optim import lr_multiplier
from training.run.checkpoints import MARKER, checkpoint_lora, write_best_lora

FINAL = "lora_final.safetensors"
BEST = "lora_best.safetensors"


def is_finished(checkpoint, total_steps: int) -> bool:
    return checkpoint.state["step"] >= total_steps


def check_not_finished(checkpoint, total_steps: int) -> None:
    """Raise AlreadyFinished when the checkpoint's step is at or past this run's length."""
    step = checkpoint.state["step"]
    if step >= total_steps:
        raise AlreadyFinished(f"the run is already finished: {checkpoint.path} is at step {step} of {total_steps}; "
                              "nothing to do (to train on, resume with a larger --max_train_steps, e.g. "
                              f"--max_train_steps {2 * step})")


def missing_final_files(output_dir, keep_best: str) -> list[str]:
    """The final files a finished run writes (lora_final, and lora_best with --keep_best and a checkpoints/best)
    that its folder lacks."""
    output_dir = Path(output_dir)
    wanted = [FINAL] + ([BEST] if keep_best != "none" and (output_dir / "checkpoints/best" / MARKER).is_file() else [])
    return [name for name in wanted if not (output_dir / name).is_file()]


def finish_files(checkpoint, total_steps: int, output_dir, save_format: str, keep_best: str) -> list[Path]:
    """A resumed run at (or past) its length whose final files are missing: write them from `checkpoint` (its EMA
    weights when the run kept them, as lora_final is) and say so; with every one there, AlreadyFinished."""
    missing = missing_final_files(output_dir, keep_best)
    if not missing:
        check_not_finished(checkpoint, total_steps)
    output_dir, written = Path(output_dir), []
    if FINAL in missing:
        ema = checkpoint.ema is not None
        weights = checkpoint_lora(checkpoint, ema=ema)
        written.append(write_lora(weights, output_dir / FINAL, format=save_format))
        print(f"the run is already finished ({checkpoint.path} is at step {checkpoint.state['step']} of "
              f"{total_steps}) but {FINAL} was missing (its write failed?): wrote {written[-1]} from that checkpoint"
              + ("'s EMA weights (the run used --use_ema)" if ema else ""))
    if BEST in missing and (best := write_best_lora(output_dir, save_format)) is not None:
        written.append(best)
        print(f"{BEST} was missing: wrote {best} from {output_dir / 'checkpoints/best'}")
    return written


def schedule_total(opt, total_steps: int) -> int:
    """The number of steps the LR schedule runs over (`opt`: the OptimizerSettings): --lr_schedule_total, else the
    run's length."""
    return opt.lr_schedule_total or total_steps


def checkpoint_schedule_total(config: dict, steps_per_epoch: int | None) -> int | None:
    """The schedule length of the run that wrote a checkpoint (its config.yaml); None if it cannot be told."""
    if config.get("lr_schedule_total") or config.get("max_train_steps"):
        return config.get("lr_schedule_total") or config["max_train_steps"]
    if steps_per_epoch is None or not config.get("num_epochs"):
        return None
    return config["num_epochs"] * steps_per_epoch


def schedule_note(checkpoint, opt, total: int, steps_per_epoch: int | None) -> str | None:
    """What resuming does to a decaying LR schedule whose length differs from the checkpoint's, or None (`opt`:
    the run's OptimizerSettings)."""
    old = checkpoint_schedule_total(checkpoint.config, steps_per_epoch)
    if opt.lr_scheduler == "constant" or old is None or old == total:
        return None
    step, lr = checkpoint.state["step"], opt.learning_rate
    was = lr * lr_multiplier(step, opt.warmup_steps, old, opt.lr_scheduler)
    now = lr * lr_multiplier(step, opt.warmup_steps, total, opt.lr_scheduler)
    return (f"note: the {opt.lr_scheduler} LR schedule is recomputed over {total} steps (the checkpoint's ran over "
            f"{old}): the learning rate of step {step + 1} is {now:.4g}, where the old schedule had {was:.4g}; "
            f"--lr_schedule_total {old} keeps the old schedule (docs/training.md: 'A finished run, and extending one')")
