"""Loading SD3 / SD 3.5 weights: a diffusers folder, an SAI single file, or the name `tiny-sd3`.

A diffusers folder (model_index.json of a `StableDiffusion3Pipeline`) holds every part; its files may be plain,
the `.fp16` variant, or shards with an index json. An SAI single file (`sd3.5_medium.safetensors`,
`sd3.5_large.safetensors`, `sd3_medium_incl_clips_t5xxlfp8.safetensors`) holds the MMDiT, usually the VAE, and
sometimes the text encoders (sd3/sai.py), but never tokenizers or configs: the transformer's config is read from
its tensor shapes (sd3/configs.py), the VAE's is SD3's, and the tokenizers, text-encoder configs and any part the
file lacks come from a diffusers SD3 folder given as `config_path`.

Every tensor comes from safetensors (memory-mapped); pickles are refused. Models are built on the meta device
and take the loaded tensors by assignment, so loading never holds two copies of the weights. A missing path,
a folder that is not SD3, a missing component, and missing, unexpected or mis-shaped keys are one-line errors
naming the path, component or keys.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from common.weights import find_weights, load_state_dict_checked, read_safetensors
from diffusion.vae import LatentVAE
from sd3 import sai
from sd3.configs import SD3_SCHEDULER_CONFIG, SD3_VAE_CONFIG, config_from_diffusers, config_from_sai
from sd3.mmdit import SD3Transformer
from sd3.text_encoders import MAX_SEQUENCE_LENGTH, SD3TextEncoder, load_pretrained, read_joint_attention_dim
from sd3.tiny import tiny_sd3_path

TINY = "tiny-sd3"
PIPELINE = "StableDiffusion3Pipeline"
DOWNLOAD_HINT = ("give a diffusers SD3 / SD 3.5 folder (e.g. stabilityai/stable-diffusion-3.5-medium) or an SAI "
                 "sd3.5_*.safetensors, or use tiny-sd3")
CONFIG_HINT = "give a diffusers SD3 folder (or tiny-sd3 for the tiny model) as the config path (--config_path)"


def resolve_model_path(path) -> Path:
    """`tiny-sd3` -> the cached tiny model (built on first use); anything else must exist."""
    if str(path) == TINY:
        return tiny_sd3_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; {DOWNLOAD_HINT}")
    return p


def model_path_problem(path) -> str | None:
    """Why `path` cannot be an SD3 `--pretrained_model` (what the flag's error says), or None if it can.
    Reads only names (model_index.json, the single file's header), so it is cheap to check before loading."""
    if str(path) == TINY:
        return None
    model = Path(path).expanduser()
    if not model.exists():
        return f"does not exist; {DOWNLOAD_HINT}"
    if model.is_file():
        if model.suffix != ".safetensors":
            return ("only .safetensors single files are loaded (never pickled .ckpt/.pt/.bin); convert it to "
                    ".safetensors or give a diffusers folder")
        try:
            with safe_open(model, framework="pt") as f:
                sai.split_single_file(f.keys())
        except ValueError as e:
            return str(e)
        except Exception as e:  # safetensors' own error types for damaged headers
            return f"cannot be read ({e}); the file is corrupt or truncated"
        return None
    index = model / "model_index.json"
    if not index.is_file():
        return f"is not a diffusers SD3 folder (no model_index.json); {DOWNLOAD_HINT}"
    kind = json.loads(index.read_text()).get("_class_name")
    if kind != PIPELINE:
        return f"is a diffusers {kind} folder, not a {PIPELINE} (SD3 / SD 3.5); {DOWNLOAD_HINT}"
    if not (model / "transformer" / "config.json").is_file():
        return "is an incomplete SD3 folder: no transformer/config.json; download it again"
    return None


def component(root: Path, name: str) -> Path:
    """root/name of a diffusers SD3 folder, which must hold a config.json."""
    folder = root / name
    if not (folder / "config.json").is_file():
        raise ValueError(f"{root} is not a diffusers SD3 folder: no {name}/config.json; {DOWNLOAD_HINT}")
    return folder


def read_single_file(path: Path, part: str) -> dict[str, torch.Tensor]:
    """One part's tensors ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3") of an SAI
    single file, prefix stripped, still in SAI names; {} if the file lacks that part. Only that part is read."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled checkpoints (.ckpt, .pt, .bin) are not loaded")
    try:
        with safe_open(path, framework="pt") as f:
            keys = sai.split_single_file(f.keys())[part]
            sd = {k[len(sai.PREFIXES[part]) :]: f.get_tensor(k) for k in keys}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"cannot read {path}: {e}; the file is corrupt or truncated") from e
    return sd


def convert(fn, sd, *args, path):
    try:
        return fn(sd, *args)
    except KeyError as e:
        raise ValueError(f"{path} is not an SD3 checkpoint: {e.args[0]}") from e


def read_transformer_config(folder: Path):
    try:
        return config_from_diffusers(json.loads((folder / "config.json").read_text()))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e


def load_transformer(path, dtype=torch.float32, device="cpu", config_path=None) -> SD3Transformer:
    """Our MMDiT from a diffusers SD3 folder (or its transformer/ folder), an SAI single file, or "tiny-sd3";
    frozen, in eval mode. Call it as `model(latents, text_tokens, pooled, timestep)` (sd3/mmdit.py).

    A single file's config is read from its shapes, or from `config_path`'s transformer/config.json if given (the
    shapes do not tell the head width of a model without qk-norm; every SAI model's is 64)."""
    path = resolve_model_path(path)
    if path.is_file():
        sd = read_single_file(path, "transformer")
        try:
            config = config_from_sai(sd) if config_path is None else \
                read_transformer_config(component(resolve_model_path(config_path), "transformer"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        sd, source = convert(sai.transformer_sai_to_diffusers, sd, path=path), path
    else:
        folder = path if (path / "config.json").is_file() and not (path / "model_index.json").is_file() \
            else component(path, "transformer")
        config = read_transformer_config(folder)
        files = find_weights(folder, "diffusion_pytorch_model")
        sd, source = read_safetensors(files), files[0]
    with torch.device("meta"):
        model = SD3Transformer(config)
    load_state_dict_checked(model, sd, source, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def load_vae(path, device="cpu", config_path=None) -> LatentVAE:
    """The fp32 16-channel VAE from a diffusers SD3 folder, an SAI single file (its `first_stage_model.*`, read with
    SD3's VAE config or `config_path`'s; a file without one takes `config_path`'s VAE), or "tiny-sd3"."""
    path = resolve_model_path(path)
    if path.is_dir():
        return LatentVAE.from_pretrained(path, device=device)
    sd = read_single_file(path, "vae")
    root = resolve_model_path(config_path) if config_path else None
    if not sd:
        if root is None:
            raise ValueError(f"{path} holds no VAE ('first_stage_model.*' keys); {CONFIG_HINT} to take it from")
        return LatentVAE.from_pretrained(root, device=device)
    config = SD3_VAE_CONFIG if root is None else AutoencoderKL.load_config(str(component(root, "vae")))
    sd = convert(sai.vae_sai_to_diffusers, sd, config, path=path)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    load_state_dict_checked(vae, sd, path, device=device, dtype=torch.float32)
    return LatentVAE(vae.eval().requires_grad_(False))


def default_max_sequence_length(path, config_path=None) -> int:
    """The T5 length: SD 3.5's 256, capped by the `model_max_length` of the model's T5 tokenizer (a folder's, or
    `config_path`'s for a single file): the real ones say 512 or more, tiny-sd3's 32."""
    path = resolve_model_path(path)
    folder = path if path.is_dir() else resolve_model_path(config_path) if config_path else None
    config = folder / "tokenizer_3" / "tokenizer_config.json" if folder is not None else None
    if config is not None and config.is_file():
        try:
            cap = json.loads(config.read_text()).get("model_max_length")
        except (OSError, ValueError):
            cap = None
        if isinstance(cap, int) and 0 < cap < MAX_SEQUENCE_LENGTH:
            return cap
    return MAX_SEQUENCE_LENGTH


def load_text_encoder(path, dtype=torch.float32, device="cpu", t5: bool = True,
                      max_sequence_length: int | None = None, config_path=None) -> SD3TextEncoder:
    """CLIP-L, CLIP-G and (unless `t5=False`: zero T5 tokens) T5 with their tokenizers, from a diffusers SD3 folder,
    "tiny-sd3", or an SAI single file plus `config_path` (a diffusers SD3 folder: the tokenizers, the encoders'
    configs, and any encoder the file does not hold). `max_sequence_length`: T5 tokens (default: the model's,
    `default_max_sequence_length`)."""
    max_sequence_length = max_sequence_length or default_max_sequence_length(path, config_path)
    path = resolve_model_path(path)
    if path.is_dir():
        return SD3TextEncoder.from_pretrained(path, dtype=dtype, device=device, t5=t5,
                                              max_sequence_length=max_sequence_length)
    if config_path is None:
        raise ValueError(f"{path} is a single file, which holds no tokenizers (and maybe no text encoders); "
                         f"{CONFIG_HINT}")
    root = resolve_model_path(config_path)
    parts = [("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection)]
    if t5:
        parts.append(("text_encoder_3", T5EncoderModel))
    encoders = []
    for name, cls in parts:
        sd = read_single_file(path, name)
        if not sd:  # not in the file: the config folder's weights
            encoders.append(load_pretrained(cls, component(root, name), dtype))
            continue
        config = cls.config_class.from_pretrained(str(component(root, name)))
        with torch.device("meta"):
            model = cls(config)
        if name == "text_encoder_3":
            sd = convert(sai.t5_sai_to_hf, sd, path=path)
        else:
            sd = convert(sai.clip_sai_to_hf, sd, model.state_dict().keys(), name == "text_encoder", path=path)
        load_state_dict_checked(model, sd, f"{path} ({name})", dtype=dtype)
        encoders.append(rebuild_buffers(model).eval())
    tokenizers = [CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
                  CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True),
                  T5TokenizerFast.from_pretrained(str(root / "tokenizer_3"), local_files_only=True) if t5 else None]
    text_encoder_3 = encoders[2] if t5 else None
    return SD3TextEncoder(*tokenizers, encoders[0], encoders[1], text_encoder_3, max_sequence_length,
                          read_joint_attention_dim(root)).to(device)


def rebuild_buffers(model: torch.nn.Module) -> torch.nn.Module:
    """After a meta-device build and an assigning load: recreate the non-persistent buffers no state dict carries
    (CLIP's position_ids, an arange) and re-tie tied weights (T5's token embedding)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise ValueError(f"cannot rebuild the buffer {name!r} of a {type(model).__name__} built on meta")
            ref = next(p for p in model.parameters() if not p.is_meta)
            ids = torch.arange(buf.shape[-1], device=ref.device).expand(buf.shape)
            module.register_buffer(name, ids, persistent=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def scheduler_config(path, config_path=None) -> dict:
    """The sampling scheduler's config (a diffusers scheduler_config.json dict): the folder's, `config_path`'s for a
    single file, else SD 3.5's (FlowMatchEulerDiscreteScheduler, shift 3.0). diffusion/flow.py's `flow_sigmas`
    turns it into a schedule."""
    path = resolve_model_path(path)
    if path.is_file():
        return scheduler_config(config_path) if config_path else dict(SD3_SCHEDULER_CONFIG)
    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise ValueError(f"{path} is not a diffusers SD3 folder: no scheduler/scheduler_config.json; {DOWNLOAD_HINT}")
    return json.loads(file.read_text())
