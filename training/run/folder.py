"""A run's output folder: finding its latest checkpoint, describing one, and the command that resumes it.

A run's output folder (the trainer's `--output_dir`) holds `config.yaml` (written first) and
`checkpoints/step_XXXXXX/` folders (see training/run/checkpoints.py). Paths given here may be a checkpoint
folder, an output folder (-> its newest complete checkpoint that loads), the `checkpoints/` folder itself or
`checkpoints/latest` (a name, not a folder: the same newest complete checkpoint). Anything else is a
`CheckpointError` with a one-line message; an output folder that has no usable checkpoint (yet) is the
subclass `NoCheckpoint`, so a caller can tell "nothing saved yet" from "not a run folder".
"""

import os
import shlex
import shutil
import sys
from pathlib import Path

import families
from common.errors import CheckpointError, NoCheckpoint
from training.run.checkpoints import FILES, MARKER, Checkpoint, find_latest, load_checkpoint, settings_differences

# the first line of OUTPUT_DIR/config.yaml (training/config.py), now and before the families
CONFIG_HEADERS = ("# Resolved config of a LoRA training run", "# Resolved config of train_sdxl.py")
ROOT = Path(__file__).resolve().parents[2]  # the scripts' folder
TRAIN_SCRIPT = ROOT / "train_sdxl.py"


def _is_checkpoint_folder(path: Path) -> bool:
    """Looks like one of our checkpoint folders (complete or not): load_checkpoint says what is wrong with it."""
    return path.name.startswith("step_") or any((path / name).exists() for name in (MARKER, *FILES.values())
                                                if name != FILES["config"])


def output_dir_of(path) -> Path:
    """The run folder that `path` (the run folder or its checkpoints/ folder) names."""
    path = Path(path)
    if path.name == "latest" and path.parent.name == "checkpoints" and not path.exists():
        path = path.parent  # RUN/checkpoints/latest: the run's newest complete checkpoint (as --resume_from latest)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a training output folder (a trainer's --output_dir) "
                              "or one of its checkpoints/step_XXXXXX folders")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a training output folder or checkpoint folder "
                              "(for a LoRA file use extract_lora_weights.py FILE --info)")
    if path.name == "checkpoints" and not (path / "checkpoints").is_dir():
        return path.parent
    if _is_checkpoint_folder(path):
        raise CheckpointError(f"{path} is a checkpoint folder; give its run folder {path.parent.parent} (the one "
                              "holding checkpoints/)")
    config = path / FILES["config"]
    ours = config.is_file() and config.read_text(encoding="utf-8", errors="replace").startswith(CONFIG_HEADERS)
    if (path / "checkpoints").is_dir() or ours:
        return path
    raise CheckpointError(f"{path} is not a training output folder (it has no checkpoints/ folder and no config.yaml "
                          "written by a trainer); give the --output_dir of a run")


def latest_checkpoint(path) -> Checkpoint:
    """The newest complete checkpoint that loads in the run folder `path` (damaged ones are skipped with a
    logged warning); NoCheckpoint if there is none."""
    output_dir = output_dir_of(path)
    checkpoint = find_latest(output_dir)
    if checkpoint is None:
        raise NoCheckpoint(f"no complete checkpoint in {output_dir / 'checkpoints'}: the run has not saved one yet "
                           "(see --save_interval), or every one is damaged")
    return checkpoint


def open_checkpoint(path) -> Checkpoint:
    """A checkpoint folder, or a run folder -> its latest checkpoint."""
    path = Path(path)
    if path.is_dir() and _is_checkpoint_folder(path):
        return load_checkpoint(path)
    return latest_checkpoint(path)


# ---------------------------------------------------------------------------------------------------
# Describing a checkpoint.


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def effective_batch(batch: int | None, accumulation: int, processes: int | None) -> str:
    """`N images per step (batch_size B x accumulation A x P processes)`: the images of one optimizer step; P is
    unknown in checkpoints written before it was recorded."""
    if batch is None or processes is None:
        return (f"? images per step (batch_size {batch or '?'} x accumulation {accumulation} x ? processes: not "
                "recorded in this checkpoint)")
    return (f"{batch * accumulation * processes} images per step (batch_size {batch} x accumulation {accumulation} "
            f"x {processes} process{'es' * (processes != 1)})")


def describe(checkpoint: Checkpoint) -> str:
    """Where the run stands and what it trains: step, epoch, loss, the settings that define it, its files."""
    st, cfg, lora = checkpoint.state, checkpoint.config, checkpoint.lora_config
    max_steps = cfg.get("max_train_steps") or 0
    of = f" of {max_steps}" if max_steps else f" (run length: {cfg.get('num_epochs')} epochs)"
    lr_now = (st.get("lr_scheduler") or {}).get("_last_lr") or [None]
    schedule = f"{cfg.get('lr_scheduler')} schedule, {cfg.get('warmup_steps')} warmup steps"
    accum, batch = cfg.get("gradient_accumulation_steps", 1), cfg.get("batch_size")
    modules = len(checkpoint.lora) // 2
    ema = f"yes (decay {cfg.get('ema_decay')})" if checkpoint.ema is not None else "no"
    files = sorted(p for p in checkpoint.path.iterdir() if p.is_file())
    data_options = "".join(f", {label}" for key, label in (("bucketing", "bucketing"), ("random_flip", "random flip"),
                                                           ("center_crop", "center crop")) if cfg.get(key))
    rows = [
        ("checkpoint", str(checkpoint.path)),
        ("step", f"{st['step']}{of}; epoch {st.get('epoch')}, {st.get('position')} batches into it, "
                 f"micro-step {st.get('micro_step')}"),
        ("last loss", f"{st.get('last_loss', float('nan')):.6g}"),
        ("base model", f"{cfg.get('pretrained_model')}" + (f" (VAE {vae})" if (vae := cfg.get("vae_model")) else "")),
        ("data", f"{cfg.get('data_dir') or cfg.get('dataset_config')} at {cfg.get('image_size')} px{data_options}"),
        ("LoRA", f"rank {lora.rank}, alpha {lora.alpha:g}, targets {lora.target_mode} ({modules} layers), "
                 f"dropout {lora.dropout:g}"),
        ("EMA weights", ema),
        ("optimizer", f"{cfg.get('optimizer')}, lr {cfg.get('learning_rate')} ({schedule}); lr now "
                      + ("?" if lr_now[0] is None else f"{lr_now[0]:.4g}")),
        ("batch", effective_batch(batch, accum, st.get("world_size"))),
        ("precision", str(cfg.get("precision"))),
        ("max steps", str(max_steps) if max_steps else f"none ({cfg.get('num_epochs')} epochs)"),
        ("seed", str(cfg.get("seed"))),
        ("checksums", f"SHA-256 of {len(checkpoint.checksums)} files verified" if checkpoint.checksums else
                      "none recorded (written before checkpoints had them)"),
        ("files", f"{len(files)}, {human_size(sum(p.stat().st_size for p in files))} in all"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    name_width = max(len(p.name) for p in files) + 2
    lines += [f"  {p.name:<{name_width}}{human_size(p.stat().st_size):>10}" for p in files]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The command that resumes a checkpoint.


def python_command() -> str:
    """`python` where that is this very interpreter on PATH (readable), else its full path (exact)."""
    found = shutil.which("python")
    return "python" if found and os.path.abspath(found) == sys.executable else sys.executable


def script_path(script: Path = TRAIN_SCRIPT) -> str:
    """A script (the run's trainer) relative to the current folder when it lies below it, else absolute."""
    rel = os.path.relpath(script)
    return rel if not rel.startswith("..") else str(script)


def resume_command(checkpoint: Checkpoint, python: str | None = None, extra=()) -> list[str]:
    """`python train_<family>.py --config CKPT/config.yaml --resume_from CKPT [--output_dir DIR] [extra...]`.

    The checkpoint's config.yaml is the run's full resolved config; `--output_dir` is added only when the
    run folder was moved since (so new checkpoints go next to the old ones). `extra`: flags that may
    change on resume, e.g. `--max_train_steps 2000` to continue a finished run."""
    script = ROOT / families.get(checkpoint.metadata.get("sdxl_lora.family", "sdxl")).SCRIPT  # the run's trainer
    cmd = [python or python_command(), script_path(script), "--config", str(checkpoint.path / FILES["config"]),
           "--resume_from", str(checkpoint.path)]
    here = checkpoint.path.parent.parent
    saved = checkpoint.config.get("output_dir")
    if not saved or Path(saved).resolve() != here.resolve():
        cmd += ["--output_dir", str(here)]
    return cmd + list(extra)


def check_extra(checkpoint: Checkpoint, command: list[str]) -> None:
    """Refuse a resume command whose added flags would change what the run computes (the check the trainer makes
    on resume), before it is printed or run; a flag the trainer does not know exits 2 (argparse)."""
    from training.config import parse_config  # here: --inspect needs no parser

    family = checkpoint.metadata.get("sdxl_lora.family", "sdxl")
    diffs = settings_differences(checkpoint.config, vars(parse_config(command[2:], family)))
    if diffs:
        raise CheckpointError("the flags after -- would change what the resumed run computes (" + "; ".join(diffs)
                              + "); only --max_train_steps/--num_epochs, saving, validation, logging, caching, "
                              "workers and device may change on resume")


def finished(checkpoint: Checkpoint, extra=()) -> bool:
    """Resuming would stop at once: the checkpoint is at --max_train_steps and `extra` does not raise it."""
    max_steps = checkpoint.config.get("max_train_steps") or 0
    length_flags = ("--max_train_steps", "--max-train-steps", "--num_epochs", "--num-epochs")
    return bool(max_steps) and checkpoint.state["step"] >= max_steps and not any(
        e.startswith(length_flags) for e in extra)


def shell(cmd: list[str]) -> str:
    return shlex.join(cmd)
