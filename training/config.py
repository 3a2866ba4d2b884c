"""Command line and YAML config of `train_sdxl.py`: parse, resolve, validate, save (STYLE.md habit 6).

    python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./data/dogs --output_dir ./out/dogs
    python train_sdxl.py --config configs/tiny_demo.yaml --learning_rate 3e-4     # flags override the file

Precedence: defaults < keys of `--config FILE.yaml` (the flag names, underscores) < command-line flags.
An unknown key is an error naming the closest valid one; YAML values go through their flag's type function,
so `learning_rate: abc` fails early and `learning_rate: 1e-4` (a string to YAML 1.1) becomes a float.
`parse_config` resolves derived values (lora_alpha = rank, cache_dir = OUTPUT_DIR/cache, device auto ->
cuda/cpu, a `.txt` of validation prompts -> its prompts, local paths -> absolute); `validate` checks every
value with a one-line message naming the flag; `save_resolved_config` writes OUTPUT_DIR/config.yaml, which
given back to `--config` yields the same Namespace.

Decisions: image_size is a multiple of 64 in every mode (the VAE divides by 8, the UNet halves twice more,
buckets step by 64). bf16 is allowed on CPU (CPU autocast supports it), fp16 is refused there. Cached latents
mean center crops (a random crop would never hit the cache; both flips are cached, as the cache is keyed by
the exact pixels); shuffled tags exclude cached text embeddings (a cache would freeze one variant).
"""

import argparse
import difflib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import yaml

PATH_FLAGS = ("data_dir", "val_data_dir", "pretrained_model", "vae_model", "cache_dir", "output_dir")
DATA_HINT = "give a folder of images with .txt captions, a .tar shard, or a pattern like shards/{000000..000099}.tar"


class ConfigError(ValueError):
    """A bad flag, config file or value; its message is one line a user can act on."""


def _add(group, name: str, help: str, **kwargs) -> argparse.Action:
    """`--name` plus its dash spelling `--na-me` as an alias; dest is always the underscore name."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    action = group.add_argument(*names, help=help, **kwargs)
    action.help = help  # BooleanOptionalAction on Python 3.10 appends its own "(default: ...)"; ours says it
    return action


def build_parser() -> argparse.ArgumentParser:
    """The flat, grouped parser of train_sdxl.py. Required flags may come from --config instead."""
    p = argparse.ArgumentParser(
        prog="train_sdxl.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an SDXL LoRA from a folder of captioned images (or .tar shards).",
        epilog="examples:\n"
        "  python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./data/dogs \\\n"
        "      --output_dir ./outputs/dogs --lora_rank 16 --cache_latents disk\n"
        "  python train_sdxl.py --config configs/tiny_demo.yaml --device cpu    # tiny CPU run",
    )
    flag, req = argparse.BooleanOptionalAction, "(required, here or in --config)"
    g = p.add_argument_group("data")
    _add(g, "data_dir", f"training images: a folder of images with same-named .txt captions, a .tar shard, or a "
         f"pattern shards/{{000000..000099}}.tar {req}", required=True, metavar="DIR")
    _add(g, "val_data_dir", "held-out images for a validation loss, as --data_dir (default: none)", metavar="DIR")
    _add(g, "image_size", "training size in pixels, a multiple of 64; buckets hold about image_size^2 pixels "
         "(default: 1024)", type=int, default=1024, metavar="PX")
    _add(g, "bucketing", "aspect-ratio buckets instead of square crops (default: on)", action=flag, default=True)
    _add(g, "center_crop", "center crops instead of random crops; always on with --cache_latents (default: off)",
         action=flag, default=False)
    _add(g, "random_flip", "horizontal flips; with cached latents both flips are cached (default: off)", action=flag,
         default=False)
    _add(g, "caption_dropout", "chance of an empty caption (CFG) (default: 0.0)", type=float, default=0.0, metavar="P")
    _add(g, "shuffle_tags", "shuffle the comma-separated tags of a caption each time it is used; not with "
         "--cache_text_embeddings (default: off)", action=flag, default=False)
    _add(g, "keep_tokens", "--shuffle_tags keeps the first N tags (default: 0)", type=int, default=0, metavar="N")
    _add(g, "max_bad_fraction", "unreadable images are skipped; stop when more than this fraction are bad "
         "(default: 0.05)", type=float, default=0.05, metavar="F")
    _add(g, "num_workers", "data loader processes; 0 = the main process (default: 2)", type=int, default=2, metavar="N")

    g = p.add_argument_group("model")
    _add(g, "pretrained_model", f"SDXL base: a diffusers folder, a single-file .safetensors, or `tiny` (the tiny "
         f"CPU test model) {req}", required=True, metavar="PATH")
    _add(g, "vae_model", "diffusers VAE folder to use, e.g. sdxl-vae-fp16-fix (default: the model's)", metavar="DIR")

    g = p.add_argument_group("LoRA")
    _add(g, "lora_rank", "rank of each LoRA (default: 16)", type=int, default=16, metavar="R")
    _add(g, "lora_alpha", "updates are scaled by alpha/rank (default: --lora_rank)", type=float, metavar="A")
    _add(g, "lora_dropout", "dropout on the LoRA input (default: 0.0)", type=float, default=0.0, metavar="P")
    _add(g, "lora_target_mode", "attention = to_q/k/v; attention_out = + to_out.0; all = every Linear of the "
         "transformer blocks, as kohya (default: attention_out)", choices=["attention", "attention_out", "all"],
         default="attention_out")

    g = p.add_argument_group("optimization")
    _add(g, "batch_size", "images per step and device (default: 1)", type=int, default=1, metavar="N")
    _add(g, "gradient_accumulation_steps", "micro-batches per step (default: 1)", type=int, default=1, metavar="N")
    _add(g, "num_epochs", "passes over the data (default: 1)", type=int, default=1, metavar="N")
    _add(g, "max_train_steps", "optimizer steps; overrides --num_epochs (default: none)", type=int, metavar="N")
    _add(g, "learning_rate", "peak learning rate (default: 1e-4)", type=float, default=1e-4, metavar="LR")
    _add(g, "optimizer", "adamw = torch.optim.AdamW; adamw8bit = bitsandbytes AdamW8bit, less memory "
         "(default: adamw)", choices=["adamw", "adamw8bit"], default="adamw")
    _add(g, "weight_decay", "AdamW weight decay (default: 1e-2)", type=float, default=1e-2, metavar="WD")
    _add(g, "adam_beta1", "Adam beta1 (default: 0.9)", type=float, default=0.9, metavar="B")
    _add(g, "adam_beta2", "Adam beta2 (default: 0.999)", type=float, default=0.999, metavar="B")
    _add(g, "adam_epsilon", "Adam epsilon (default: 1e-8)", type=float, default=1e-8, metavar="EPS")
    _add(g, "lr_scheduler", "learning-rate schedule after the warmup (default: constant)",
         choices=["constant", "linear", "cosine"], default="constant")
    _add(g, "warmup_steps", "optimizer steps of linear warmup (default: 0)", type=int, default=0, metavar="N")
    _add(g, "max_grad_norm", "clip the gradient norm; 0 = off (default: 1.0)", type=float, default=1.0, metavar="N")
    _add(g, "min_timestep", "lowest timestep trained, 0..999 (default: 0)", type=int, default=0, metavar="T")
    _add(g, "max_timestep", "highest timestep trained, 0..999 (default: 999)", type=int, default=999, metavar="T")
    _add(g, "prediction_type", "epsilon (SDXL base) or v_prediction (v-models) (default: epsilon)",
         choices=["epsilon", "v_prediction"], default="epsilon")
    _add(g, "min_snr_gamma", "Min-SNR loss weighting gamma (Hang et al. 2023), 5 is typical; 0 = off (default: 0)",
         type=float, default=0.0, metavar="G")
    _add(g, "noise_offset", "offset noise strength, e.g. 0.0357 (default: 0.0)", type=float, default=0.0, metavar="X")
    _add(g, "max_nonfinite_steps", "steps with a NaN/inf loss are skipped; stop after this many in a row "
         "(default: 5)", type=int, default=5, metavar="N")
    _add(g, "seed", "seed of data order, noise, timesteps and LoRA init (default: 0)", type=int, default=0)
    _add(g, "use_ema", "keep and save an EMA of the LoRA weights (default: off)", action=flag, default=False)
    _add(g, "ema_decay", "EMA decay per optimizer step (default: 0.999)", type=float, default=0.999, metavar="D")

    g = p.add_argument_group("precision & memory")
    _add(g, "precision", "UNet autocast dtype; LoRA weights and the VAE stay fp32; fp16 needs a GPU "
         "(default: bf16)", choices=["bf16", "fp16", "fp32"], default="bf16")
    _add(g, "gradient_checkpointing", "recompute activations in backward: far less memory, ~30%% slower "
         "(default: off)", action=flag, default=False)
    _add(g, "device", "cpu, cuda or cuda:N; auto = cuda if available, else cpu (default: auto)", default="auto")

    g = p.add_argument_group("caching")
    _add(g, "cache_latents", "VAE-encode each image once, kept in memory or on disk (default: none)",
         choices=["none", "memory", "disk"], default="none")
    _add(g, "cache_text_embeddings", "encode each caption once, then free the text encoders (default: off)",
         action=flag, default=False)
    _add(g, "cache_dir", "folder of the disk caches (default: OUTPUT_DIR/cache)", metavar="DIR")

    g = p.add_argument_group("output & checkpoints")
    _add(g, "output_dir", f"LoRA, checkpoints/, config.yaml, logs {req}", required=True, metavar="DIR")
    _add(g, "save_interval", "resumable checkpoint every N optimizer steps; 0 = only the final LoRA (default: 500)",
         type=int, default=500, metavar="N")
    _add(g, "save_every_n_epochs", "also a checkpoint after every N epochs; 0 = off (default: 0)", type=int,
         default=0, metavar="N")
    _add(g, "keep_last", "keep only the newest N checkpoints; 0 = keep all (default: 0)", type=int, default=0,
         metavar="N")
    _add(g, "resume_from", "continue a run exactly from a checkpoints/step_XXXXXX folder, or 'latest' (the newest "
         "complete one in OUTPUT_DIR; starts fresh if there is none) (default: none)", metavar="PATH|latest")
    _add(g, "overwrite_output_dir", "start afresh in an OUTPUT_DIR that holds a previous run, deleting its "
         "checkpoints, samples, metrics and LoRA (default: off: such a folder is an error)", action=flag,
         default=False)
    _add(g, "save_format", "kohya keys (ComfyUI, A1111, kohya, diffusers) or diffusers/peft keys (default: kohya)",
         choices=["kohya", "diffusers"], default="kohya")
    _add(g, "config", "YAML of flag: value defaults; flags given here win (default: none)", metavar="FILE.yaml")

    g = p.add_argument_group("validation & logging")
    _add(g, "validation_prompts", "prompts to sample, or one .txt file with a prompt per line (default: none)",
         nargs="*", default=[], metavar="PROMPT")
    _add(g, "validation_interval", "sample them every N optimizer steps; 0 = only at the end (default: 100)",
         type=int, default=100, metavar="N")
    _add(g, "num_validation_images", "images per validation prompt (default: 4)", type=int, default=4, metavar="N")
    _add(g, "wandb_project", "log to this Weights & Biases project; needs wandb (default: off)", metavar="NAME")
    _add(g, "wandb_run_name", "W&B run name (default: chosen by wandb)", metavar="NAME")
    _add(g, "log_interval", "log every N optimizer steps (default: 1)", type=int, default=1, metavar="N")
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


def parse_config(argv=None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) over the defaults of `--config FILE.yaml`; return resolved values."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    parser = build_parser()
    if config_path:
        actions, where = _actions(parser), f"--config {config_path}"
        for key, value in load_yaml_config(config_path).items():
            key = str(key)
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
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output_dir, "cache")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
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
      "log_interval"), lambda v: v >= 1, ">= 1"),
    (("keep_tokens", "num_workers", "save_every_n_epochs", "keep_last", "warmup_steps", "max_nonfinite_steps",
      "save_interval", "validation_interval",
      "weight_decay", "max_grad_norm", "min_snr_gamma", "noise_offset"), lambda v: v >= 0, ">= 0"),
    (("learning_rate", "lora_alpha", "adam_epsilon"), lambda v: v > 0, "> 0"),
    (("caption_dropout", "lora_dropout", "adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("max_bad_fraction",), lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.05"),
    (("ema_decay",), lambda v: 0 < v < 1, "in (0, 1), e.g. 0.999"),
    (("min_timestep", "max_timestep"), lambda v: 0 <= v <= 999, "in [0, 999]"),
    (("image_size",), lambda v: v > 0 and v % 64 == 0, "a positive multiple of 64, e.g. 512 or 1024"),
    (("seed",), lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    (("max_train_steps",), lambda v: v is None or v >= 1, ">= 1, or left out to train --num_epochs epochs"),
]


def _fail(flag: str, value, what: str):
    raise ConfigError(f"--{flag}{'' if value is None else f' {value}'}: {what}")


def _check_data(flag: str, value: str) -> None:
    if _is_url(value):
        return  # remote shards: only the data loader can check them
    path = Path(value)
    if "{" in value and "}" in value:  # webdataset brace pattern
        if not path.parent.is_dir():
            _fail(flag, value, f"the folder {path.parent} of this shard pattern does not exist; {DATA_HINT}")
    elif path.is_file() and not value.endswith(".tar"):
        _fail(flag, value, f"is a file, not a folder or .tar shard; {DATA_HINT}")
    elif not path.exists():
        _fail(flag, value, f"does not exist; {DATA_HINT}")


def _check_models(args: argparse.Namespace) -> None:
    from sdxl.loading import DOWNLOAD_HINT

    model = Path(args.pretrained_model)
    if args.pretrained_model != "tiny":
        if not model.exists():
            _fail("pretrained_model", model, f"does not exist; {DOWNLOAD_HINT}")
        if model.is_file() and model.suffix != ".safetensors":
            _fail("pretrained_model", model, "only .safetensors single files are loaded (never pickled .ckpt/.bin); "
                  "convert it to .safetensors or give a diffusers folder")
        if model.is_dir() and not ((model / "unet" / "config.json").is_file() or (model / "config.json").is_file()):
            _fail("pretrained_model", model, f"is not a diffusers SDXL folder (no unet/config.json); {DOWNLOAD_HINT}")
    vae = Path(args.vae_model or ".")
    if args.vae_model and not ((vae / "config.json").is_file() or (vae / "vae" / "config.json").is_file()):
        _fail("vae_model", vae, "is not an existing diffusers VAE folder (no config.json); give one such as "
              "./weights/sdxl-vae-fp16-fix (./download_weights.sh --vae-fp16-fix), or leave the flag out")


def _check_device(args: argparse.Namespace) -> None:
    import torch

    device = args.device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        _fail("device", device, "must be auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            _fail("device", device, "no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            _fail("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible; use a lower index")
        if args.precision == "bf16" and not torch.cuda.is_bf16_supported():
            _fail("precision", "bf16", f"{device} does not support bf16; use --precision fp16 (with a fp16-fix VAE "
                  "if the VAE overflows) or fp32")
    elif args.precision == "fp16":
        _fail("precision", "fp16", "fp16 needs a CUDA GPU; on CPU use --precision bf16 or fp32")


def validate(args: argparse.Namespace) -> None:
    """Check every resolved value; raise ConfigError naming the flag, the value and what to do."""
    for name in ("data_dir", "pretrained_model", "output_dir"):
        if getattr(args, name) is None:
            _fail(name, None, "is required (on the command line or in the --config file)")
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            _fail(name, value, "must be a finite number")
    for names, accepts, what in RULES:
        for name in names:
            if not accepts(getattr(args, name)):
                _fail(name, getattr(args, name), f"must be {what}")
    if args.min_timestep > args.max_timestep:
        _fail("min_timestep", args.min_timestep, f"must be <= --max_timestep {args.max_timestep}")
    if args.resume_from is not None and args.resume_from != "latest" and not Path(args.resume_from).is_dir():
        _fail("resume_from", args.resume_from, "is not a checkpoint folder; give OUTPUT_DIR/checkpoints/step_XXXXXX "
              "or 'latest'")
    if args.resume_from is not None and args.overwrite_output_dir:
        _fail("overwrite_output_dir", None, "cannot be combined with --resume_from (it would delete the checkpoints)")
    if args.shuffle_tags and args.cache_text_embeddings:
        _fail("shuffle_tags", None, "cannot be combined with --cache_text_embeddings (a cached embedding cannot be "
              "reshuffled); drop one of them")
    _check_data("data_dir", args.data_dir)
    if args.val_data_dir is not None:
        _check_data("val_data_dir", args.val_data_dir)
    for name in ("output_dir", "cache_dir"):
        if Path(getattr(args, name)).exists() and not Path(getattr(args, name)).is_dir():
            _fail(name, getattr(args, name), "is an existing file; give a folder (it is created if missing)")
    _check_models(args)
    _check_device(args)
    if args.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        _fail("optimizer", "adamw8bit", "needs bitsandbytes, which is not installed; run `pip install bitsandbytes` "
              "or use --optimizer adamw")
    prompts_file = _prompts_file(args.validation_prompts)
    if prompts_file is not None and not Path(prompts_file).is_file():
        _fail("validation_prompts", prompts_file, "this prompts file does not exist; give an existing .txt file "
              "with one prompt per line, or the prompts themselves")
    if args.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        _fail("wandb_project", args.wandb_project, "needs wandb, which is not installed; run `pip install wandb` "
              "or leave --wandb_project out")
    if args.wandb_run_name is not None and args.wandb_project is None:
        _fail("wandb_run_name", args.wandb_run_name, "needs --wandb_project; give the project or drop the run name")


def parse_or_exit(argv=None) -> argparse.Namespace:
    """parse_config + validate for scripts: a bad value prints `error: <message>` on stderr and exits 2."""
    try:
        args = parse_config(argv)
        validate(args)
    except ConfigError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(resolved_config_yaml(args), encoding="utf-8")
    os.replace(tmp, path)  # never leave a half-written config.yaml
    return path
