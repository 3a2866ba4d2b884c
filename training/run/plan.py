"""A resumed run against its plan: a run that is already finished, and the LR schedule of an extended one.

A run's length is --max_train_steps, or --num_epochs x the optimizer steps of an epoch. Resuming a checkpoint
at (or past) that length has nothing to train: `check_not_finished` says so before anything is written, so a
re-queued `--resume_from latest` of a finished run changes no file.

The LR schedule (training/loop/optim.py `lr_multiplier`) runs over `--lr_schedule_total` steps, by default the
run's length. Extending a finished run (resuming it with a larger --max_train_steps) therefore recomputes a
linear or cosine schedule over the new length, from the first step: at the resumed step the learning rate
jumps from the old schedule's end (0) to the new schedule's value there. `schedule_note` prints both values.
To keep one curve across extensions, give `--lr_schedule_total` the longest length you may train to, from
the first run on: every stop and extension up to it then follows the same schedule.
"""


from common.errors import AlreadyFinished
from training.loop.optim import lr_multiplier


def check_not_finished(checkpoint, total_steps: int) -> None:
    """Raise AlreadyFinished when the checkpoint's step is at or past this run's length."""
    step = checkpoint.state["step"]
    if step >= total_steps:
        raise AlreadyFinished(f"the run is already finished: {checkpoint.path} is at step {step} of {total_steps}; "
                              "nothing to do (to train on, resume with a larger --max_train_steps, e.g. "
                              f"--max_train_steps {2 * step})")


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
            f"--lr_schedule_total {old} keeps the old schedule (README: 'Extending a finished run')")
