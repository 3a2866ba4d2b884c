"""Command line and YAML config of `train_sdxl.py`: parse, resolve, validate, save.

    python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./data/dogs --output_dir ./out/dogs
    python train_sdxl.py --config configs/tiny_demo.yaml --learning_rate 3e-4     # flags override the file

Precedence: defaults < keys of `--config FILE.yaml` (the flag names, underscores) < command-line flags.
An unknown key is an error naming the closest valid one; YAML values go through their flag's type function,
so `learning_rate: abc` fails early and `learning_rate: 1e-4` (a string to YAML 1.1) becomes a float.
`parse_config` resolves derived values (lora_alpha = rank, cache_dir = OUTPUT_DIR/cache, a `.txt` of
validation prompts -> its prompts, local paths -> absolute); `validate` checks every value with a one-line
message naming the flag and resolves the device and precision (common/runtime.py); `save_resolved_config`
writes OUTPUT_DIR/config.yaml, which given back to `--config` yields the same Namespace.

Decisions: image_size is a multiple of 32 in every mode (the VAE divides by 8, the UNet halves twice more;
bucket sides step by 64 within its area). bf16 is allowed on CPU (CPU autocast supports it), fp16 is refused
there. Cached latents mean center crops (a random crop would never hit the cache; both flips are cached, as
the cache is keyed by the exact pixels); shuffled tags exclude cached text embeddings (a cache would freeze one
variant).
"""

import argparse
import difflib
import importlib.util
import math
import os
import sys
from pathlib import Path

import yaml

from common.cli import fail, print_error
from common.errors import ConfigError
from common.files import check_writable, write_text
from common.runtime import resolve_device
from training.data.buckets import SIZE_MULTIPLE
from training.data.captions import CaptionStyle
from training.flags import DATA_HINT, build_parser
from training.loop.optim import OPTIMIZERS

__all__ = ["ConfigError", "build_parser", "parse_config", "parse_or_exit", "resolved_config_yaml",
           "save_resolved_config", "validate"]
PATH_FLAGS = ("data_dir", "dataset_config", "mask_dir", "val_data_dir", "pretrained_model", "vae_model", "cache_dir",
              "output_dir", "eval_real_dir",
              "inception_weights", "clip_model")


# --- Parsing: YAML values become the parser's defaults, so command-line flags override them. ---

def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _yaml_value(action: argparse.Action, key: str, value, where: str):
    """`value` read from YAML, checked and converted exactly like the command-line string would be."""
    if value is None:
        if action.default is None and not action.required:
            return None
        raise ConfigError(f"{where}: {key} is empty (null); give a value or remove the key")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: {value!r} is not a boolean; write {key}: true or {key}: false")
        return value
    if action.nargs == "*":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{where}: {key}: {value!r} is not a list; write a YAML list of strings")
        return [_yaml_scalar(action, key, v, where) for v in items]
    return _yaml_scalar(action, key, value, where)


def _yaml_scalar(action: argparse.Action, key: str, value, where: str):
    kind = getattr(action.type, "__name__", "string")
    bad = ConfigError(f"{where}: {key}: {value!r} is not a valid {kind} (as --{key} expects)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad
    try:
        converted = (action.type or str)(str(value))
    except (TypeError, ValueError):
        raise bad from None
    if action.choices and converted not in action.choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(action.choices)}")
    return converted


def load_yaml_config(path) -> dict:
    """The mapping in a YAML config file, or a one-line ConfigError."""
    where = f"--config {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e}); give a readable YAML "
                          "file of flag: value pairs") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError(f"{where}: not valid YAML ({problem}{at})") from None
    if not isinstance(data, (dict, type(None))):  # an empty file is an empty mapping
        raise ConfigError(f"{where}: must be a mapping of flag names to values (e.g. `learning_rate: 1.0e-4`), "
                          f"not a {type(data).__name__}")
    return data or {}


def parse_config(argv=None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) over the defaults of `--config FILE.yaml`; return resolved values."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    parser = build_parser()
    if config_path:
        actions, where = _actions(parser), f"--config {config_path}"
        spellings = {o[2:].replace("-", "_"): dest for dest, a in actions.items() for o in a.option_strings}
        for key, value in load_yaml_config(config_path).items():
            key = spellings.get(str(key), str(key))  # `resolution:` is `image_size:`
            if key == "config":
                raise ConfigError(f"{where}: key 'config' is not allowed; a config file cannot include another one")
            if key not in actions:
                close = difflib.get_close_matches(key, list(actions), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "; see train_sdxl.py --help for valid names"
                raise ConfigError(f"{where}: unknown key {key!r}{hint}")
            actions[key].default = _yaml_value(actions[key], key, value, where)
            actions[key].required = False
    return _resolve(parser.parse_args(argv))


def _is_url(value: str) -> bool:
    return "://" in value or value.startswith("pipe:")


def _prompts_file(prompts) -> str | None:
    """The file named when --validation_prompts is a single `.txt` path, else None."""
    return prompts[0] if len(prompts) == 1 and prompts[0].lower().endswith(".txt") else None


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the derived defaults in place, so the saved config states what the run really used."""
    if vars(args).pop("use_lora") and os.environ.get("RANK", "0") == "0":  # the original scripts' flag
        print("note: --use_lora does nothing: this trainer always trains a LoRA", file=sys.stderr)
    for name in PATH_FLAGS:
        value = getattr(args, name)
        if value == "":  # an empty value switches an option off (e.g. a YAML's val_data_dir)
            setattr(args, name, value := None)
        if value is not None and value != "tiny" and not _is_url(value):
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))
    if args.resume_from not in (None, "", "latest"):
        args.resume_from = os.path.abspath(os.path.expanduser(args.resume_from))
    args.resume_from = args.resume_from or None
    if args.cache_latents != "none":  # a random crop would make every epoch's latents new: crop the center
        args.center_crop = True
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.conv_alpha is None:
        args.conv_alpha = float(args.conv_rank)
    if args.learning_rate is None:  # Prodigy estimates the step size itself: its lr is a multiplier, 1.0
        args.learning_rate = 1.0 if args.optimizer == "prodigy" else 1e-4
    if args.loss_weighting == "none" and args.min_snr_gamma > 0:  # the older spelling of min_snr
        args.loss_weighting = "min_snr"
    if args.loss_weighting == "min_snr" and args.min_snr_gamma == 0:
        args.min_snr_gamma = 5.0
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output_dir, "cache")
    args.validation_prompts = list(args.validation_prompts)
    prompts_file = _prompts_file(args.validation_prompts)
    if prompts_file is not None and Path(prompts_file).is_file():  # a missing file is reported by validate()
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--validation_prompts {prompts_file}: cannot read it ({e}); give a UTF-8 .txt file "
                              "with one prompt per line") from None
        args.validation_prompts = [line.strip() for line in lines if line.strip()]
        if not args.validation_prompts:
            raise ConfigError(f"--validation_prompts {prompts_file}: the file holds no prompts; write one per line")
    return args


# --- Validation: every value, before any model is loaded. ---

# (flags, accepts(value), what they must be)
RULES = [
    (("lora_rank", "batch_size", "gradient_accumulation_steps", "num_epochs", "num_validation_images",
      "log_interval", "eval_num_images"), lambda v: v >= 1, ">= 1"),
    (("keep_tokens", "num_workers", "save_every_n_epochs", "keep_last", "warmup_steps", "max_nonfinite_steps",
      "save_interval", "validation_interval", "eval_interval",
      "weight_decay", "max_grad_norm", "min_snr_gamma", "noise_offset", "conv_rank", "conv_alpha",
      "multires_noise_iterations", "input_perturbation"), lambda v: v >= 0, ">= 0"),
    (("learning_rate", "lora_alpha", "adam_epsilon", "logit_std", "prodigy_d_coef"), lambda v: v > 0, "> 0"),
    (("multires_noise_discount",), lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.3"),
    (("caption_dropout", "lora_dropout", "adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("max_bad_fraction",), lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.05"),
    (("ema_decay",), lambda v: 0 < v < 1, "in (0, 1), e.g. 0.999"),
    (("min_timestep", "max_timestep"), lambda v: 0 <= v <= 999, "in [0, 999]"),
    (("image_size",), lambda v: v >= 2 * SIZE_MULTIPLE and v % SIZE_MULTIPLE == 0,
     f"a multiple of {SIZE_MULTIPLE}, at least {2 * SIZE_MULTIPLE}, e.g. 512 or 1024"),
    (("seed",), lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    (("max_train_steps",), lambda v: v is None or v >= 1, ">= 1, or left out to train --num_epochs epochs"),
    (("lr_schedule_total",), lambda v: v is None or v >= 1, ">= 1, or left out to decay over the run's length"),
]


def _check_data(flag: str, value: str) -> None:
    if _is_url(value):
        return  # remote shards: only the data loader can check them
    path = Path(value)
    if "{" in value and "}" in value:  # webdataset brace pattern
        if not path.parent.is_dir():
            fail(flag, value, f"the folder {path.parent} of this shard pattern does not exist; {DATA_HINT}")
    elif path.is_file() and not value.endswith(".tar"):
        fail(flag, value, f"is a file, not a folder or .tar shard; {DATA_HINT}")
    elif not path.exists():
        fail(flag, value, f"does not exist; {DATA_HINT}")


def _check_streamed_length(args: argparse.Namespace) -> None:
    """Streamed .tar shards have no length before they are read: the run's length must be given in steps."""
    from training.data.scan import find_shards  # here: --help needs no PIL

    value = args.data_dir  # a URL, a .tar or brace pattern of them, or a folder of .tar files
    if args.max_train_steps is None and (_is_url(value) or value.endswith(".tar") or find_shards(value)):
        fail("data_dir", args.data_dir, "is streamed from .tar shards, whose number of samples is unknown before "
             "they are read, so --num_epochs cannot set the run's length: give --max_train_steps N")


def _check_models(args: argparse.Namespace) -> None:
    from sdxl.loading import model_path_problem, vae_path_problem  # here: --help needs no diffusers

    problem = model_path_problem(args.pretrained_model)
    if problem:
        fail("pretrained_model", args.pretrained_model, problem)
    if args.vae_model and (problem := vae_path_problem(args.vae_model)):
        fail("vae_model", args.vae_model, problem)


def _check_evaluation(args: argparse.Namespace) -> None:
    """--eval_interval and --keep_best: what they need must be there before any model loads."""
    if args.keep_best == "kid" and not args.eval_interval:
        fail("keep_best", "kid", "needs --eval_interval N (KID is computed at each evaluation)")
    if args.keep_best == "val_loss" and args.val_data_dir is None:
        fail("keep_best", "val_loss", "needs --val_data_dir (the validation loss is computed on it)")
    if not args.eval_interval:
        return
    if importlib.util.find_spec("torchmetrics") is None:
        fail("eval_interval", args.eval_interval, "needs torchmetrics; run `pip install -e .[eval]` or leave the flag "
             "out")
    if not args.validation_prompts:
        fail("eval_interval", args.eval_interval, "needs --validation_prompts (the images it scores are made of "
             "them)")
    real = args.eval_real_dir or args.data_dir
    if not Path(real).is_dir():
        fail("eval_real_dir" if args.eval_real_dir else "eval_interval", real, "KID needs a folder of real images; "
             "give --eval_real_dir DIR (shards cannot be scored)")
    from evaluation.inception import default_inception_path, download_hint  # here: --help needs no torchmetrics

    weights = Path(args.inception_weights or default_inception_path())
    if not weights.is_file():
        fail("inception_weights", weights, f"does not exist (--eval_interval needs it); {download_hint(weights)}")
    if args.clip_model is not None and not (Path(args.clip_model) / "config.json").is_file():
        fail("clip_model", args.clip_model, "is not a transformers CLIP folder (no config.json); give a local "
             "download of e.g. openai/clip-vit-large-patch14, or leave the flag out")


def _check_captions(args: argparse.Namespace) -> None:
    """Where the images come from (one of --data_dir, --dataset_config) and how captions are read."""
    if (args.data_dir is None) == (args.dataset_config is None):
        fail("data_dir", args.data_dir, "is required (on the command line or in the --config file), or else "
             "--dataset_config FILE.yaml; give exactly one of the two")
    if args.dataset_config is not None:
        from training.data.dataset_config import read_dataset_config  # its one-line errors, before any model loads

        read_dataset_config(args.dataset_config, CaptionStyle(args.caption_extension))
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        fail("caption_extension", args.caption_extension, "must start with a dot, e.g. .txt or .caption")
    for name in ("mask_dir", "alpha_mask"):
        if getattr(args, name) and not args.masked_loss:
            fail(name, getattr(args, name) if name == "mask_dir" else None, "needs --masked_loss")
    if args.mask_dir and args.alpha_mask:
        fail("alpha_mask", None, "cannot be combined with --mask_dir; the mask comes from one of them")
    if args.mask_dir and not Path(args.mask_dir).is_dir():
        fail("mask_dir", args.mask_dir, "is not a folder; give the folder of IMAGE_STEM.png masks")


def _check_optimizer(args: argparse.Namespace) -> None:
    """The optimizer's package is installed and it fits the device and LR schedule (after the device resolved)."""
    module, install = OPTIMIZERS[args.optimizer] or (None, None)
    if module is not None and importlib.util.find_spec(module) is None:
        fail("optimizer", args.optimizer, f"needs {module}, which is not installed; run `{install}` or use "
             "--optimizer adamw")
    if args.optimizer == "adamw8bit" and not str(args.device).startswith("cuda"):
        fail("optimizer", "adamw8bit", f"needs a CUDA GPU (bitsandbytes), not {args.device}; use --optimizer adamw")
    if args.optimizer == "adamw_schedulefree" and args.lr_scheduler != "constant":
        fail("lr_scheduler", args.lr_scheduler, "schedule-free AdamW needs no learning-rate schedule; use "
             "--lr_scheduler constant (--warmup_steps still warms up)")


def validate(args: argparse.Namespace) -> None:
    """Check every resolved value; raise ConfigError naming the flag, the value and what to do."""
    for name in ("pretrained_model", "output_dir"):
        if getattr(args, name) is None:
            fail(name, None, "is required (on the command line or in the --config file)")
    _check_captions(args)
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            fail(name, value, "must be a finite number")
    for names, accepts, what in RULES:
        for name in names:
            if not accepts(getattr(args, name)):
                fail(name, getattr(args, name), f"must be {what}")
    if args.min_timestep > args.max_timestep:
        fail("min_timestep", args.min_timestep, f"must be <= --max_timestep {args.max_timestep}")
    if args.resume_from is not None and args.resume_from != "latest" and not Path(args.resume_from).is_dir():
        fail("resume_from", args.resume_from, "is not a checkpoint folder; give OUTPUT_DIR/checkpoints/step_XXXXXX "
              "or 'latest'")
    if args.resume_from is not None and args.overwrite_output_dir:
        fail("overwrite_output_dir", None, "cannot be combined with --resume_from (it would delete the checkpoints)")
    if args.train_text_encoder and args.cache_text_embeddings:
        fail("cache_text_embeddings", None, "cannot be combined with --train_text_encoder (the embeddings change as "
             "the text encoders train); drop one of them")
    if args.text_encoder_lr is not None and not (math.isfinite(args.text_encoder_lr) and args.text_encoder_lr > 0):
        fail("text_encoder_lr", args.text_encoder_lr, "must be > 0")
    if args.shuffle_tags and args.cache_text_embeddings:
        fail("shuffle_tags", None, "cannot be combined with --cache_text_embeddings (a cached embedding cannot be "
              "reshuffled); drop one of them")
    if args.data_dir is not None:
        _check_data("data_dir", args.data_dir)
        _check_streamed_length(args)
    if args.val_data_dir is not None:
        _check_data("val_data_dir", args.val_data_dir)
    for name in ("output_dir", "cache_dir"):
        if Path(getattr(args, name)).exists() and not Path(getattr(args, name)).is_dir():
            fail(name, getattr(args, name), "is an existing file; give a folder (it is created if missing)")
    _check_models(args)
    args.device, args.precision = resolve_device(args.device, args.precision)
    _check_optimizer(args)
    prompts_file = _prompts_file(args.validation_prompts)
    if prompts_file is not None and not Path(prompts_file).is_file():
        fail("validation_prompts", prompts_file, "this prompts file does not exist; give an existing .txt file "
              "with one prompt per line, or the prompts themselves")
    _check_evaluation(args)
    if args.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        fail("wandb_project", args.wandb_project, "needs wandb, which is not installed; run `pip install wandb` "
              "or leave --wandb_project out")
    if args.wandb_run_name is not None and args.wandb_project is None:
        fail("wandb_run_name", args.wandb_run_name, "needs --wandb_project; give the project or drop the run name")
    check_writable("output_dir", args.output_dir)  # now, not after minutes of loading models
    if args.cache_latents == "disk" or args.cache_text_embeddings:
        check_writable("cache_dir", args.cache_dir)


def parse_or_exit(argv=None) -> argparse.Namespace:
    """parse_config + validate for scripts: a bad value prints `error: <message>` on stderr and exits 2."""
    try:
        args = parse_config(argv)
        validate(args)
    except ConfigError as e:
        sys.exit(print_error(str(e)))
    return args


def resolved_config_yaml(args: argparse.Namespace) -> str:
    """Every flag's resolved value as YAML (sorted), minus the one-off actions resume_from/overwrite_output_dir."""
    keys = set(_actions(build_parser())) - {"resume_from", "overwrite_output_dir"}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in keys}
    return ("# Resolved config of train_sdxl.py; reproduce the run with --config this_file\n"
            + yaml.safe_dump(values, sort_keys=True, default_flow_style=False, allow_unicode=True))


def save_resolved_config(args: argparse.Namespace, output_dir) -> Path:
    """Write `resolved_config_yaml` to OUTPUT_DIR/config.yaml (`--config` that file to reproduce the run)."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, resolved_config_yaml(args))  # never a half-written config.yaml
