"""Training checkpoints: one folder per save, written whole or not at all, and exact resume from them.

    output_dir/checkpoints/step_000500/
        lora.safetensors          the LoRA as trained (peft names, alpha unfolded: a diffusers LoRA file too)
        ema.safetensors           EMA of the LoRA weights, when --use_ema (same format)
        training_state.pt         optimizer, LR scheduler, grad scaler, step/epoch/position, RNG states
        config.yaml               the resolved run config (`train_sdxl.py --config` it to resume)
        COMPLETE                  written last: a folder without it is never used; it records the SHA-256 of
                                  every other file, checked whenever the checkpoint is read

A checkpoint is written into a temporary folder beside its final name, every file fsync'd, then
renamed into place, so a crash (or a second signal) mid-save never leaves a folder that looks
complete; older checkpoints are removed (marker first) only after the new one is committed. The
state file holds only tensors and plain Python values and loads with `torch.load(weights_only=True)`:
a pickle that would run code is refused. `latest` is the newest complete checkpoint that loads.

A file changed after it was written (a flipped bit on disk, a bad copy) no longer matches the SHA-256 in COMPLETE:
the checkpoint is damaged, and `latest` skips it with a warning naming the file, as it skips a truncated one.
Checkpoints written before the checksums (a COMPLETE without them) load unchecked.
"""

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import families
from common.errors import CheckpointError, WriteError
from common.files import atomic_write, reason_of, remove_stale_temporaries, write_text
from lora.files import LoRANames, LoRAWeights, check_fits, nonfinite, peft_tensors, state_dict_from_peft, write_lora
from lora.layer import LoRAConfig
from training.flags import later_defaults, must_match
from training.run.metadata import is_run_key

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 1: LoRA under our own key names, RNG states partly saved; 2: batches planned per process
RESUMABLE_FROM = 3  # older checkpoints still give their LoRA (extract_lora_weights.py), but cannot continue exactly
MARKER = "COMPLETE"
FILES = {"lora": "lora.safetensors", "ema": "ema.safetensors", "state": "training_state.pt", "config": "config.yaml"}
# Settings that change what a resumed run computes must equal the checkpoint's: the flags marked `must_match` in
# training/flags.py. May differ: max_train_steps / num_epochs (the LR schedule's length), saving, validation,
# logging, caching, device.
MUST_MATCH = must_match()
RUN_OUTPUTS = ("checkpoints", "samples", "metrics.jsonl", "lora_final.safetensors", "lora_best.safetensors")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its marker first, so a half-deleted folder never counts as complete."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(output_dir, step: int, lora: dict, state: dict, config_yaml: str, lora_config: LoRAConfig,
                    ema: dict | None = None, keep_last: int = 0, name: str | None = None,
                    metadata: dict[str, str] | None = None, names: LoRANames | None = None) -> Path:
    """Write checkpoints/step_{step:06d}/ (or checkpoints/NAME/, e.g. `best`) atomically and return its path;
    then keep only the newest `keep_last` step_* folders (0 = all). `metadata`: extra entries of its LoRA files;
    `names`: the base model's LoRA names (their peft prefix and family; default SDXL's `unet`).
    Refuses non-finite tensors; a disk error (WriteError) leaves earlier checkpoints intact (`what_is_intact`)."""
    prefix, family = (names.peft_prefix, names.family) if names is not None else ("unet", "sdxl")
    bad = [k for k, v in {**lora, **(ema or {})}.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"not saving a checkpoint at step {step}: non-finite values in {bad[0]}")
    root = Path(output_dir) / "checkpoints"
    final = root / (name or checkpoint_name(step))

    def write(folder: Path) -> None:
        tensors, lora_metadata = peft_tensors(lora, lora_config, prefix, family)
        metadata_ = {**lora_metadata, **(metadata or {})}
        save_file(tensors, folder / FILES["lora"], metadata=metadata_)
        if ema is not None:
            save_file(peft_tensors(ema, lora_config, prefix, family)[0], folder / FILES["ema"], metadata=metadata_)
        torch.save({"schema_version": SCHEMA_VERSION, **state}, folder / FILES["state"])
        (folder / FILES["config"]).write_text(config_yaml, encoding="utf-8")
        sums = "".join(f'  {f.name}: "{sha256(f)}"\n' for f in sorted(folder.iterdir()))  # as they are on disk
        (folder / MARKER).write_text(f"schema_version: {SCHEMA_VERSION}\nstep: {step}\nsha256:\n{sums}")  # last

    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root, final.name if name else "step_*")  # left by a process killed mid-save
        atomic_write(final, write, folder=True)
    except OSError as e:  # WriteError (a full disk, no permission) included; the temporary folder is gone
        raise WriteError(f"cannot write checkpoint {final}: {reason_of(e)}") from e
    if keep_last > 0:
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            _remove(old)
    return final


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_checksums(path: Path) -> dict[str, str]:
    """File name -> SHA-256 that a checkpoint's COMPLETE marker records ({} for one written before checksums)."""
    try:
        marker = yaml.safe_load((path / MARKER).read_text(encoding="utf-8"))
        sums = marker.get("sha256") or {}
        if not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
            raise ValueError("its sha256 entries are not file: checksum")
        return sums
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path / MARKER} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              "; use an earlier checkpoint") from e


def verify_checksums(path: Path, names=None) -> dict[str, str]:
    """Check the files of a checkpoint folder (those in `names`, default all) against the SHA-256 its COMPLETE
    marker recorded when they were written; a CheckpointError naming the first that differs. Returns the
    checksums checked ({} for a checkpoint written before them)."""
    sums = recorded_checksums(path)
    checked = {name: digest for name, digest in sums.items() if names is None or name in names}
    for name, digest in checked.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name} (its {MARKER} marker lists it); use an earlier "
                                  "checkpoint")
        if sha256(file) != digest:
            raise CheckpointError(f"{file} is not the file that was written (its SHA-256 differs from the one recorded "
                                  f"in {MARKER}): it was damaged on disk or in a copy; use an earlier checkpoint")
    return checked


def what_is_intact(output_dir) -> str:
    """What a run that failed to write something still has, and how to go on: for one-line errors."""
    done = complete_checkpoints(output_dir)
    if not done:
        return (f"no checkpoint of this run was saved yet ({output_dir}/checkpoints); free disk space or fix the "
                "folder's permissions, then start again")
    return (f"the latest complete checkpoint {done[-1]} is intact; free disk space or fix the folder's permissions, "
            "then continue with --resume_from latest")


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders under output_dir/checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MARKER).is_file())


@dataclass
class Checkpoint:
    path: Path
    lora: dict[str, torch.Tensor]  # lora_state_dict keys
    ema: dict[str, torch.Tensor] | None
    state: dict  # training_state.pt
    config: dict  # the resolved config.yaml
    metadata: dict[str, str]  # of lora.safetensors (rank, alpha, target mode)
    checksums: dict[str, str] = field(default_factory=dict)  # verified SHA-256 by file name ({}: none recorded)

    @property
    def lora_config(self) -> LoRAConfig:
        m = self.metadata
        return LoRAConfig(int(m["sdxl_lora.rank"]), float(m["sdxl_lora.alpha"]), float(m["sdxl_lora.dropout"]),
                          m["sdxl_lora.target_mode"], int(m.get("sdxl_lora.conv_rank", 0)),
                          float(m.get("sdxl_lora.conv_alpha", 0.0)), m.get("sdxl_lora.use_dora") == "true")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise CheckpointError(f"{path} does not load ({e}); the file is damaged: use an earlier checkpoint") from e


def upgrade(state: dict, config: dict, tensors: dict, metadata: dict, path: Path) -> tuple[dict, dict, dict]:
    """(state, lora file tensors, metadata) of an older schema -> the current one, in this one place.

    Version 1 stored the LoRA under `lora_state_dict` names without metadata (rank/alpha are in config.yaml)
    and only the key arrays of numpy's and python's RNGs, which the loop never draws from (its own noise,
    data and dropout RNGs were saved whole). Version 2 planned batches per process and drew noise per micro-batch:
    its LoRA and state load, but `check_resumable` refuses to continue it (the new plan would change the run)."""
    version = state.get("schema_version")
    if version == 1:
        rng = state["rng"]
        rng["numpy"] = ["MT19937", torch.tensor(rng["numpy"], dtype=torch.int64), 624, 0, 0.0]
        rng["python"] = [3, list(rng["python"]), None]
        state.setdefault("nonfinite_steps", 0)
        rank = int(config["lora_rank"])
        config_ = LoRAConfig(rank, float(config.get("lora_alpha") or rank), float(config.get("lora_dropout", 0.0)),
                             config["lora_target_mode"])
        tensors, metadata = peft_tensors(tensors, config_)
        state["schema_version"] = version = 2
    if version not in range(2, SCHEMA_VERSION + 1):
        raise CheckpointError(f"{path} has schema version {version}; this trainer reads versions 1 to "
                              f"{SCHEMA_VERSION}: update sdxl-lora")
    state["written_as"] = version  # version 2: loads (its LoRA, --inspect), but a run cannot continue it exactly
    state["schema_version"] = SCHEMA_VERSION
    return state, tensors, metadata


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint folder; any missing, truncated or unsafe file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder; give a checkpoints/step_XXXXXX folder or 'latest'")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker: not one of ours, or its "
                              "save was interrupted); give another checkpoints/step_XXXXXX folder")
    for name in ("lora", "state", "config"):
        if not (path / FILES[name]).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {FILES[name]}; use an earlier checkpoint")
    checksums = verify_checksums(path)  # before any file is read: a changed byte is never trained on
    lora, metadata = _read_safetensors(path / FILES["lora"])
    ema = _read_safetensors(path / FILES["ema"])[0] if (path / FILES["ema"]).is_file() else None
    for name, tensors in (("lora", lora), ("ema", ema or {})):
        if problem := nonfinite(tensors):  # never saved so (save_checkpoint refuses): damaged on disk
            raise CheckpointError(f"{path / FILES[name]}: {problem}; the file is damaged: use an earlier checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns on stderr before raising for an unsafe pickle
            warnings.simplefilter("ignore")
            state = torch.load(path / FILES["state"], map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (unsafe pickle), EOFError/RuntimeError (truncated)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / FILES['state']} does not load safely ({reason}); it is damaged or was "
                              "not written by this trainer: use an earlier checkpoint") from e
    try:
        config = yaml.safe_load((path / FILES["config"]).read_text(encoding="utf-8")) or {}
        if not isinstance(state, dict) or not isinstance(config, dict):
            raise ValueError("unexpected contents")
        old = state.get("schema_version") == 1
        state, lora, metadata = upgrade(state, config, lora, metadata, path)
        lora_sd = state_dict_from_peft(lora)
        ema_sd = None if ema is None else ema if old else state_dict_from_peft(ema)
    except (yaml.YAMLError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is damaged ({e}); use an earlier checkpoint") from e
    return Checkpoint(path, lora_sd, ema_sd, state, config, metadata, checksums)


def find_latest(output_dir) -> Checkpoint | None:
    """The newest complete checkpoint that loads; damaged newer ones are skipped with a warning."""
    for path in reversed(complete_checkpoints(output_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping %s: %s", path.name, e)
    return None


def settings_differences(saved: dict, current: dict, keys=MUST_MATCH) -> list[str]:
    """`name: checkpoint X, now Y` for each setting in `keys` that differs."""
    def plain(v):
        return str(v) if isinstance(v, Path) else v

    # a checkpoint from before a setting existed ran with its default
    saved, current = with_later_settings(saved), with_later_settings(current)
    return [f"{k}: checkpoint {plain(saved.get(k))!r}, now {plain(current.get(k))!r}" for k in keys
            if plain(saved.get(k)) != plain(current.get(k))]


# ---------------------------------------------------------------------------------------------------
# Resuming.


def start_or_resume(args, clear: bool = True) -> Checkpoint | None:
    """The checkpoint `--resume_from` names (None: a fresh run; `args`: the CheckpointSettings). A fresh run never
    silently replaces a previous run's outputs: it needs --overwrite_output_dir, which deletes them (only where
    `clear`: rank 0)."""
    output_dir = Path(args.output_dir)
    if args.resume_from == "latest":
        checkpoint = find_latest(output_dir)
        if checkpoint is None and complete_checkpoints(output_dir):
            raise CheckpointError(f"--resume_from latest: every checkpoint in {output_dir / 'checkpoints'} is damaged "
                                  "(see the warnings above); start over with --overwrite_output_dir (it deletes "
                                  "them) or give another --output_dir")
        if checkpoint is None and clear:
            print(f"--resume_from latest: no complete checkpoint in {output_dir / 'checkpoints'}; starting a new run")
    elif args.resume_from:
        checkpoint = load_checkpoint(args.resume_from)
    else:
        checkpoint = None
    if checkpoint is not None:
        newer = [p.name for p in complete_checkpoints(output_dir) if p.name > checkpoint.path.name]
        if newer:
            logger.warning("resuming from %s: the newer %s will be replaced as the run reaches them",
                           checkpoint.path.name, ", ".join(newer))
        return checkpoint
    # A re-queued `--resume_from latest` of a run killed before its first checkpoint just starts over.
    kept = RUN_OUTPUTS[3:] if args.resume_from == "latest" else RUN_OUTPUTS[2:]
    previous = [name for name in kept if (output_dir / name).exists()]
    previous += ["checkpoints"] if complete_checkpoints(output_dir) else []
    if previous and not args.overwrite_output_dir:
        raise CheckpointError(f"--output_dir {output_dir} holds a previous run ({', '.join(previous)}); continue it "
                              "with --resume_from latest, start over with --overwrite_output_dir, or give another "
                              "--output_dir")
    for name in RUN_OUTPUTS if clear else ():
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


def with_later_settings(config: dict) -> dict:
    """A checkpoint's config.yaml from before a setting existed: the run used the value the flag table records as
    its `since` (training/flags.py; Min-SNR was on when min_snr_gamma > 0)."""
    return {**later_defaults(config), **config}


def check_resumable(checkpoint: Checkpoint, config: dict, data_fingerprint: str, data_dir, processes: int = 1
                    ) -> None:
    """Refuse to resume with settings (`config`: the run's flags, flat) or data that would change the result; the
    message lists every difference. The number of processes may change, with batch_size and accumulation, as long
    as the effective batch (images per optimizer step) stays: the steps, and each image's noise, are the same."""
    if checkpoint.state.get("written_as", SCHEMA_VERSION) < RESUMABLE_FROM:
        raise CheckpointError(f"cannot resume from {checkpoint.path} exactly: it was written by an earlier sdxl-lora "
                              "whose batches and noise depended on the number of processes; start a new run (the "
                              "same settings with --overwrite_output_dir), or keep its LoRA: python "
                              f"extract_lora_weights.py {checkpoint.path} -o lora.safetensors")
    diffs = settings_differences(checkpoint.config, config)
    saved = effective_batch_of(checkpoint.config, checkpoint.state.get("world_size", 1))
    now = effective_batch_of(config, processes)
    if saved != now:
        diffs.append(f"images per optimizer step: checkpoint {saved}, now {now} (batch_size x "
                     f"gradient_accumulation_steps x {processes} process{'es' * (processes != 1)}; keep their "
                     f"product {saved}" + (f", e.g. --batch_size {saved // processes} --gradient_accumulation_steps 1"
                                           if saved % processes == 0 else
                                           f": {saved} images cannot be split over {processes} processes") + ")")
    if checkpoint.state.get("data_fingerprint", "") != data_fingerprint:
        diffs.append(f"the images or captions in {data_dir} changed since the checkpoint")
    if diffs:
        raise CheckpointError(f"cannot resume from {checkpoint.path} exactly: " + "; ".join(diffs) + " (use the "
                              f"checkpoint's settings: --config {checkpoint.path / FILES['config']})")


def effective_batch_of(config: dict, processes: int) -> int:
    """Images per optimizer step of a run's flags: batch_size x gradient_accumulation_steps x processes."""
    return int(config.get("batch_size", 1)) * int(config.get("gradient_accumulation_steps", 1)) * int(processes)


def lora_file_of(path) -> Path:
    """A LoRA file, or a training checkpoint folder -> its EMA weights if the run kept them (as
    `lora_final` does), else its LoRA weights."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / FILES["lora"]).is_file():
        raise FileNotFoundError(f"{path} is a folder but not a training checkpoint (no {FILES['lora']} in it); "
                                "give a .safetensors LoRA file or a checkpoints/step_XXXXXX folder")
    if not (path / MARKER).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {MARKER} marker: its save was interrupted); "
                         "use an earlier checkpoint")
    if "schema_version: 1\n" in (path / MARKER).read_text():
        raise ValueError(f"checkpoint {path} was written by an older version of this trainer; make a LoRA file of "
                         f"it with: python extract_lora_weights.py {path} -o lora.safetensors")
    file = path / (FILES["ema"] if (path / FILES["ema"]).is_file() else FILES["lora"])
    verify_checksums(path, [file.name])
    return file


def checkpoint_lora(checkpoint: Checkpoint, ema: bool = False, base: str | None = None) -> LoRAWeights:
    """The LoRA (or EMA) weights of a checkpoint, for its run's base model (or `base`), with the metadata
    lora_final.safetensors gets (training settings, steps, seed)."""
    sd = checkpoint.ema if ema else checkpoint.lora
    if sd is None:
        raise ValueError(f"checkpoint {checkpoint.path} has no EMA weights (the run did not use --use_ema); "
                         "leave out --ema")
    lora, cfg = checkpoint.lora_config, checkpoint.config
    family = families.get(checkpoint.metadata.get("sdxl_lora.family", "sdxl"))  # before families: SDXL
    base_names = family.lora_names(base or cfg.get("pretrained_model", family.LORA_BASES[0]))
    names = sorted({k.rpartition(".lora_")[0] for k in sd if ".lora_" in k})
    modules = {}
    for n in names:
        down = sd[f"{n}.lora_down.weight"]
        alpha = (lora.conv_alpha or lora.conv_rank) if down.ndim == 4 else lora.alpha  # LoCon's convs: their own
        modules[n] = (down, sd[f"{n}.lora_up.weight"], alpha)
    magnitudes = {n: sd[f"{n}.magnitude"] for n in names if f"{n}.magnitude" in sd}
    metadata = {
        "sdxl_lora.training": (checkpoint.path / FILES["config"]).read_text(encoding="utf-8"),
        "sdxl_lora.target_mode": lora.target_mode, "sdxl_lora.dropout": str(float(lora.dropout)),
        "sdxl_lora.checkpoint": checkpoint.path.name, "sdxl_lora.weights": "ema" if ema else "lora",
        "ss_steps": str(checkpoint.state["step"]), "ss_seed": str(cfg.get("seed")),
        "ss_learning_rate": str(cfg.get("learning_rate")),
    } | {k: v for k, v in checkpoint.metadata.items() if is_run_key(k)}  # the run's ss_* / modelspec.* entries
    weights = LoRAWeights(modules, metadata, base_names, f"checkpoint {'EMA' if ema else 'LoRA'}", magnitudes)
    check_fits(weights)  # shapes against the base: a clear error now rather than a broken file later
    return weights


def write_best_lora(output_dir, save_format: str) -> Path | None:
    """lora_best.safetensors from checkpoints/best (its EMA weights when the run kept them), with the metric that
    chose it; None when there is no complete checkpoints/best."""
    best = Path(output_dir) / "checkpoints" / "best"
    if not (best / MARKER).is_file():
        return None
    checkpoint = load_checkpoint(best)
    weights = checkpoint_lora(checkpoint, ema=checkpoint.ema is not None)
    weights.metadata |= {k: v for k, v in checkpoint.metadata.items() if k.startswith("sdxl_lora.best_")}
    return write_lora(weights, Path(output_dir) / "lora_best.safetensors", format=save_format)


def rewind_metrics(output_dir, step: int) -> None:
    """Drop metrics.jsonl records after `step` (logged by the interrupted run after its last checkpoint)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut off by a crash
            continue
    write_text(path, "".join(kept))
