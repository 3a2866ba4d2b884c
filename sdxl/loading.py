"""Loading SDXL weights: a diffusers folder, a single-file SGM checkpoint, or the word `tiny`.

Every tensor comes from safetensors (memory-mapped); pickled `.bin`/`.ckpt` files are refused.
Our UNet is built on the meta device and takes the loaded tensors by assignment, so loading never
holds two copies of the weights. A missing path, a folder that is not SDXL, and missing, unexpected
or mis-shaped keys are one-line errors that name the path or the keys.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.weights import find_weights, load_state_dict_checked, read_safetensors
from diffusion.vae import LatentVAE
from sdxl import sgm
from sdxl.configs import (
    CLIP_L_CONFIG,
    HUB_TOKENIZERS,
    OPENCLIP_BIGG_CONFIG,
    SDXL_VAE_CONFIG,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.tiny import tiny_model_path
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig

DOWNLOAD_HINT = "download SDXL with ./download_weights.sh, or use --pretrained_model tiny"
TINY_NAMES = ("tiny", "tiny-sdxl")  # the embedded tiny SDXL


def resolve_model_path(path) -> Path:
    """`tiny` -> the cached tiny model (built on first use); anything else must exist."""
    if str(path) in TINY_NAMES:
        return tiny_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; {DOWNLOAD_HINT}")
    return p


def model_path_problem(path) -> str | None:
    """Why `path` cannot be a `--pretrained_model` (what the flag's error says), or None if it can.
    Checked by both command lines before anything loads."""
    if str(path) in TINY_NAMES:
        return None
    model = Path(path).expanduser()
    if not model.exists():
        return f"does not exist; {DOWNLOAD_HINT}"
    if model.is_file() and model.suffix != ".safetensors":
        return ("only .safetensors single files are loaded (never pickled .ckpt/.bin); convert it to .safetensors "
                "or give a diffusers folder")
    if model.is_dir() and not (model / "unet" / "config.json").is_file():
        return f"is not a diffusers SDXL folder (no unet/config.json); {DOWNLOAD_HINT}"
    return None


def vae_path_problem(path) -> str | None:
    """Why `path` cannot be a `--vae_model` (a diffusers VAE folder), or None if it can."""
    vae = Path(path).expanduser()
    if (vae / "config.json").is_file() or (vae / "vae" / "config.json").is_file():
        return None
    return ("is not an existing diffusers VAE folder (no config.json); give one such as ./weights/sdxl-vae-fp16-fix "
            "(./download_weights.sh --vae-fp16-fix), or leave the flag out")








def unet_folder(path: Path) -> Path:
    """`path/unet` for a diffusers SDXL folder, or `path` itself when it is a UNet folder."""
    for folder in (path / "unet", path):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{path} is not a diffusers SDXL folder (no unet/config.json); {DOWNLOAD_HINT}")


def read_unet_config(folder: Path) -> UNetConfig:
    try:
        return unet_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    except (ValueError, KeyError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e


def load_unet(path, dtype=torch.float32, device="cpu", config_path=None) -> SDXLUNet:
    """Our UNet from a diffusers SDXL folder, a single-file SGM `.safetensors`, or "tiny".

    `config_path`: for a single file only, a diffusers folder whose unet/config.json describes it
    (default: SDXL base)."""
    path = resolve_model_path(path)
    if path.is_file():
        config = read_unet_config(unet_folder(resolve_model_path(config_path))) if config_path else SDXL_CONFIG
        sd = convert(sgm.unet_sgm_to_diffusers, read_single_file(path, "unet"), unet_config_to_diffusers(config),
                     path=path)
        source = path
    else:
        folder = unet_folder(path)
        config = read_unet_config(folder)
        files = find_weights(folder, "diffusion_pytorch_model")
        sd, source = read_safetensors(files), files[0]
    with torch.device("meta"):
        unet = SDXLUNet(config)
    load_state_dict_checked(unet, sd, source, device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Single-file SGM checkpoints (sd_xl_base_1.0.safetensors, CivitAI models): they carry no configs, so
# these are SDXL base's (sdxl/configs.py) unless `config_path` names a diffusers folder to take them from.


def read_single_file(path: Path, part: str) -> dict[str, torch.Tensor]:
    """One model's tensors ("unet", "vae", "text_encoder", "text_encoder_2") of a single-file
    checkpoint, prefix stripped, still in SGM names. Only that part is read (memory-mapped)."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled checkpoints (.ckpt, .bin) are not loaded")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            sd = {k: f.get_tensor(k) for k in keys if k.startswith(sgm.PREFIXES[part])}
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}; the file is corrupt or truncated") from e
    try:
        sgm.split_single_file(dict.fromkeys(keys))  # checks the layout from the key names
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if not sd:
        raise ValueError(f"{path} has no {part} weights ('{sgm.PREFIXES[part]}*' keys)")
    return {k[len(sgm.PREFIXES[part]) :]: v for k, v in sd.items()}


def convert(fn, sd, *args, path):
    try:
        return fn(sd, *args)
    except KeyError as e:
        raise ValueError(f"{path} is not an SDXL base checkpoint: unknown key {e}") from e


def load_vae(path, device="cpu", config_path=None):
    """The fp32 SDXL VAE from a diffusers SDXL or VAE folder, a single-file checkpoint, or "tiny"."""
    from diffusers import AutoencoderKL

    path = resolve_model_path(path)
    if path.is_dir():
        return LatentVAE.from_pretrained(path, device=device)
    config = SDXL_VAE_CONFIG
    if config_path:
        config = AutoencoderKL.load_config(str(resolve_model_path(config_path) / "vae"))
    sd = convert(sgm.vae_sgm_to_diffusers, read_single_file(path, "vae"), config, path=path)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    load_state_dict_checked(vae, sd, path, device=device, dtype=torch.float32)
    return LatentVAE(vae.eval().requires_grad_(False))


def load_text_encoder(path, dtype=torch.float32, device="cpu", config_path=None):
    """Both CLIP encoders with their tokenizers from a diffusers SDXL folder, "tiny", or a single file.

    A single file holds no tokenizers: they come from `config_path` (a diffusers SDXL folder, whose
    text_encoder*/config.json also describe the encoders), else from the Hugging Face cache."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_model_path(path)
    if path.is_dir():
        return SDXLTextEncoder.from_pretrained(path, dtype=dtype, device=device)
    if config_path:
        root = resolve_model_path(config_path)
        configs = [CLIPTextConfig.from_pretrained(str(root / name)) for name in ("text_encoder", "text_encoder_2")]
        sources = [str(root / "tokenizer"), str(root / "tokenizer_2")]
    else:
        configs = [CLIPTextConfig(**CLIP_L_CONFIG), CLIPTextConfig(**OPENCLIP_BIGG_CONFIG)]
        sources = list(HUB_TOKENIZERS)
    sds = [
        convert(sgm.text_encoder_sgm_to_hf, read_single_file(path, "text_encoder"), path=path),
        convert(sgm.text_encoder_2_openclip_to_hf, read_single_file(path, "text_encoder_2"), path=path),
    ]
    encoders = []
    for cls, config, sd in zip((CLIPTextModel, CLIPTextModelWithProjection), configs, sds, strict=True):
        model = cls(config)
        load_state_dict_checked(model, sd, path, dtype=dtype)
        encoders.append(model.to(dtype))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(sources[0])
        tokenizer_2 = CLIPTokenizer.from_pretrained(sources[1], pad_token="!")
    except OSError as e:
        raise ValueError(f"cannot load the CLIP tokenizers ({sources[0]}): {e}; give a diffusers SDXL folder "
                         "with tokenizer/ and tokenizer_2/ as the config path") from e
    return SDXLTextEncoder(tokenizer, tokenizer_2, *encoders).to(device)
