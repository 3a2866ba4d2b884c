"""Command line and YAML config of the trainers (`train_sdxl.py`, `train_sd3.py`, `train_flux.py`): parse,
resolve, validate, save. The flags themselves are the table of training/flags.py.

    python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./data/dogs --output_dir ./out/dogs
    python train_sdxl.py --config configs/tiny_demo.yaml --learning_rate 3e-4     # flags override the file

Precedence: defaults < keys of `--config FILE.yaml` (the flag names, underscores) < command-line flags.
An unknown key is an error naming the closest valid one; YAML values go through their flag's type function,
so `learning_rate: abc` fails early and `learning_rate: 1e-4` (a string to YAML 1.1) becomes a float.
`parse_config` resolves derived values (lora_alpha = rank, cache_dir = OUTPUT_DIR/cache, a `.txt` of
validation prompts -> its prompts, local paths -> absolute); `validate` checks every value with a one-line
message naming the flag (each flag's rule in the table, then what depends on several flags or on the model's
family) and resolves the device and precision (common/runtime.py); `save_resolved_config` writes
OUTPUT_DIR/config.yaml, which given back to `--config` yields the same Namespace. `Settings.of` (training/flags.py)
makes the typed sections the rest of the trainer takes.

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

from common.cli import add_flag, fail, print_error
from common.errors import ConfigError
from common.files import check_writable, write_text
from training.flags import table

__all__ = ["ConfigError", "build_parser", "parse_config", "parse_or_exit", "resolved_config_yaml",
           "save_resolved_config", "validate"]
CONFIG_HEADER = "# Resolved config of a LoRA training run"  # the first line of OUTPUT_DIR/config.yaml
DATA_HINT = "give a folder of images with .txt captions, a .tar shard, or a pattern like shards/{000000..000099}.tar"
SCRIPTS = {"sdxl": ("train_sdxl.py", "SDXL", "./weights/sdxl-base-1.0"),
           "sd3": ("train_sd3.py", "Stable Diffusion 3.5", "./weights/sd3.5-medium"),
           "flux": ("train_flux.py", "FLUX.1", "./weights/flux1-dev")}


def build_parser(family: str = "sdxl") -> argparse.ArgumentParser:
    """The trainer's parser: the flag table, plus --config and the original scripts' --use_lora."""
    from training.flags import build_parser as from_table

    script, title, example = SCRIPTS[family]
    p = from_table(prog=script, description=f"Train a {title} LoRA from a folder of captioned images (or .tar "
                   "shards).", epilog="examples:\n"
                   f"  python {script} --pretrained_model {example} --data_dir ./data/dogs \\\n"
                   "      --output_dir ./outputs/dogs --lora_rank 16 --cache_latents disk\n"
                   f"  python {script} --pretrained_model tiny{'' if family == 'sdxl' else '-' + family} "
                   "--data_dir data/demo/train --output_dir /tmp/tiny --image_size 64 --max_train_steps 20 \\\n"
                   "      --device cpu                # the tiny model, a CPU run")
    g = next(group for group in p._action_groups if group.title == "output & checkpoints")
    add_flag(g, "config", "YAML of flag: value defaults; flags given here win (default: none)", metavar="FILE.yaml")
    g = next(group for group in p._action_groups if group.title == "LoRA")
    add_flag(g, "use_lora", "accepted so that commands of the original scripts run; does nothing: LoRA is always on "
             "(default: off)", action="store_true")
    return p


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


def parse_config(argv=None, family: str = "sdxl") -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) over the defaults of `--config FILE.yaml`; return resolved values."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    parser = build_parser(family)
    if config_path:
        actions, where = _actions(parser), f"--config {config_path}"
        spellings = {o[2:].replace("-", "_"): dest for dest, a in actions.items() for o in a.option_strings}
        for key, value in load_yaml_config(config_path).items():
            key = spellings.get(str(key), str(key))  # `resolution:` is `image_size:`
            if key == "config":
                raise ConfigError(f"{where}: key 'config' is not allowed; a config file cannot include another one")
            if key not in actions:
                close = difflib.get_close_matches(key, list(actions), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; see {parser.prog} --help for valid names"
                raise ConfigError(f"{where}: unknown key {key!r}{hint}")
            actions[key].default = _yaml_value(actions[key], key, value, where)
            actions[key].required = False
    return _resolve(parser.parse_args(argv), family)


def _is_url(value: str) -> bool:
    return "://" in value or value.startswith("pipe:")


def _prompts_file(prompts) -> str | None:
    """The file named when --validation_prompts is a single `.txt` path, else None."""
    return prompts[0] if len(prompts) == 1 and prompts[0].lower().endswith(".txt") else None


def _resolve(args: argparse.Namespace, family: str = "sdxl") -> argparse.Namespace:
    """Fill the derived defaults in place, so the saved config states what the run really used (flags whose
    default is the model's: the family's `flag_defaults`)."""
    if vars(args).pop("use_lora") and os.environ.get("RANK", "0") == "0":  # the original scripts' flag
        print("note: --use_lora does nothing: this trainer always trains a LoRA", file=sys.stderr)
    for name in (name for name, f in table().items() if f.metadata["path"]):
        value = getattr(args, name)
        if value == "":  # an empty value switches an option off (e.g. a YAML's val_data_dir)
            setattr(args, name, value := None)
        if value is not None and not value.startswith("tiny") and not _is_url(value):
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
    if args.cache_dir is None and args.output_dir is not None:
        args.cache_dir = os.path.join(args.output_dir, "cache")
    left_out = [name for name, f in table().items() if f.default is None and getattr(args, name) is None]
    if left_out and args.pretrained_model is not None and not _is_url(args.pretrained_model):
        import families  # here: --help needs no torch

        defaults = families.get(family).flag_defaults(args.pretrained_model)
        for name in left_out:
            if getattr(args, name) is None and name in defaults:
                setattr(args, name, defaults[name])
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


def _check_models(args: argparse.Namespace, family: str) -> None:
    """The model is there, loadable, and of this trainer's family; the settings are ones that family has."""
    import families  # here: --help needs no torch

    found = families.name_of(args.pretrained_model)
    if found is not None and found != family:
        other = families.get(found)
        fail("pretrained_model", args.pretrained_model, f"is a {other.TITLE} model; train it with {other.SCRIPT}")
    model = families.get(family)
    if problem := model.model_problem(args.pretrained_model):
        fail("pretrained_model", args.pretrained_model, problem)
    if args.vae_model and (problem := model.vae_problem(args.vae_model)):
        fail("vae_model", args.vae_model, problem)
    for name, allowed in (("lora_target_mode", model.LORA_MODES), ("prediction_type", model.PREDICTION_TYPES),
                          ("timestep_sampling", model.TIMESTEP_SAMPLING), ("loss_weighting", model.LOSS_WEIGHTING)):
        if getattr(args, name) not in allowed:
            fail(name, getattr(args, name), f"is not one of {model.TITLE}'s: {', '.join(allowed)}")
    if args.use_dora and args.save_format == "kohya":  # a fused kohya layer needs DoRA on all of its parts
        from lora.files import kohya_dora_problem

        if problem := kohya_dora_problem(model.lora_names(args.pretrained_model), args.lora_target_mode):
            fail("use_dora", None, f"in kohya format (--save_format kohya): {problem}; use --save_format diffusers "
                 "or a target mode that adapts the whole layer (e.g. all)")


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
    from evaluation.settings import default_inception_path, download_hint

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
        from training.data.captions import CaptionStyle
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
    from training.loop.optim import OPTIMIZERS  # here: --help needs no torch
    module, install = OPTIMIZERS[args.optimizer] or (None, None)
    if module is not None and importlib.util.find_spec(module) is None:
        fail("optimizer", args.optimizer, f"needs {module}, which is not installed; run `{install}` or use "
             "--optimizer adamw")
    if args.optimizer == "adamw8bit" and not str(args.device).startswith("cuda"):
        fail("optimizer", "adamw8bit", f"needs a CUDA GPU (bitsandbytes), not {args.device}; use --optimizer adamw")
    if args.optimizer == "adamw_schedulefree" and args.lr_scheduler != "constant":
        fail("lr_scheduler", args.lr_scheduler, "schedule-free AdamW needs no learning-rate schedule; use "
             "--lr_scheduler constant (--warmup_steps still warms up)")


def _check_base_dtype(args: argparse.Namespace) -> None:
    """--base_dtype after --precision resolved: auto is the precision's dtype; a stored dtype narrower than the
    compute dtype, or fp8 under any precision (lora/base_weights.py)."""
    if args.base_dtype == "auto":
        args.base_dtype = args.precision
    narrower = {"fp32": ("fp32", "bf16", "fp16", "fp8"), "bf16": ("bf16", "fp8"), "fp16": ("fp16", "fp8")}
    if args.base_dtype not in narrower[args.precision]:
        fail("base_dtype", args.base_dtype, f"is not narrower than --precision {args.precision}, which the base "
             f"computes in; use auto or one of {', '.join(narrower[args.precision])}")


def validate(args: argparse.Namespace, family: str = "sdxl") -> None:
    """Check every resolved value; raise ConfigError naming the flag, the value and what to do."""
    for name in ("pretrained_model", "output_dir"):
        if getattr(args, name) is None:
            fail(name, None, "is required (on the command line or in the --config file)")
    _check_captions(args)
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            fail(name, value, "must be a finite number")
    for name, f in table().items():
        rule, value = f.metadata["rule"], getattr(args, name)
        if rule is not None and not rule.accepts(value):
            fail(name, value, f"must be {rule.what}")
        if f.metadata["families"] and family not in f.metadata["families"] and value != f.default:
            flag_name, shown = (name, value) if not isinstance(value, bool) else (name if value else f"no-{name}", None)
            fail(flag_name, shown, f"is for {', '.join(SCRIPTS[n][1] for n in f.metadata['families'])} only; "
                 f"{SCRIPTS[family][0]} trains {SCRIPTS[family][1]}")
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
    _check_models(args, family)
    from common.runtime import resolve_device  # here: --help and flag errors need no torch

    args.device, args.precision = resolve_device(args.device, args.precision)
    _check_base_dtype(args)
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


def parse_or_exit(argv=None, family: str = "sdxl") -> argparse.Namespace:
    """parse_config + validate for scripts: a bad value prints `error: <message>` on stderr and exits 2."""
    try:
        args = parse_config(argv, family)
        validate(args, family)
    except ConfigError as e:
        sys.exit(print_error(str(e)))
    return args


def resolved_config_yaml(values) -> str:
    """Every flag's resolved value (a Namespace or `Settings.flat()`) as YAML (sorted), minus the one-off actions
    resume_from/overwrite_output_dir."""
    values = vars(values) if isinstance(values, argparse.Namespace) else dict(values)
    keys = set(table()) - {"resume_from", "overwrite_output_dir"}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if k in keys}
    return (f"{CONFIG_HEADER}; reproduce the run with --config this_file\n"
            + yaml.safe_dump(values, sort_keys=True, default_flow_style=False, allow_unicode=True))


def save_resolved_config(values, output_dir) -> Path:
    """Write `resolved_config_yaml` to OUTPUT_DIR/config.yaml (`--config` that file to reproduce the run)."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, resolved_config_yaml(values))  # never a half-written config.yaml
