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
from safetensors.torch import load_file

from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig

DOWNLOAD_HINT = "download SDXL with ./download_weights.sh, or use --pretrained_model tiny"


def resolve_model_path(path) -> Path:
    """`tiny` -> the cached tiny model (built on first use); anything else must exist."""
    if str(path) == "tiny":
        from sdxl.tiny import tiny_model_path

        return tiny_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; {DOWNLOAD_HINT}")
    return p


def find_weights(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one component: `stem.safetensors`, its fp16 variant, or their shards."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    hint = f" (found {', '.join(pickles)}: pickle files are not loaded; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"no {stem}.safetensors in {folder}{hint}")


def read_safetensors(files, dtype=None) -> dict[str, torch.Tensor]:
    sd = {}
    for f in files:
        try:
            part = load_file(f)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"cannot read {f}: {e}; the file is corrupt or truncated, download it again") from e
        sd.update(part if dtype is None else {k: v.to(dtype) for k, v in part.items()})
    return sd


def load_state_dict_checked(model: torch.nn.Module, sd: dict, source, device="cpu", dtype=None) -> None:
    """Strict load with an error that names the offending keys; assigns tensors (model may be on meta)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            detail = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}" for k in keys[:3]] if label == "mis-shaped" else keys[:3]
            problems.append(f"{len(keys)} {label} keys: {', '.join(detail)}{more}")
    if problems:
        raise ValueError(f"{source} does not match the model: {'; '.join(problems)}")
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)


def unet_folder(path: Path) -> Path:
    """`path/unet` for a diffusers SDXL folder, or `path` itself when it is a UNet folder."""
    for folder in (path / "unet", path):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{path} is not a diffusers SDXL folder (no unet/config.json); {DOWNLOAD_HINT}")


def load_unet(path, dtype=torch.float32, device="cpu") -> SDXLUNet:
    """Our UNet from a diffusers SDXL folder, a single-file SGM `.safetensors`, or "tiny"."""
    path = resolve_model_path(path)
    if path.is_file():
        sd, config = read_single_file_unet(path), SDXL_CONFIG
        source = path
    else:
        folder = unet_folder(path)
        try:
            config = UNetConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from e
        files = find_weights(folder, "diffusion_pytorch_model")
        sd, source = read_safetensors(files), files[0]
    with torch.device("meta"):
        unet = SDXLUNet(config)
    load_state_dict_checked(unet, sd, source, device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


def read_single_file_unet(path: Path) -> dict[str, torch.Tensor]:
    """The UNet part of a single-file SDXL checkpoint (SGM names), renamed to diffusers' names."""
    from sdxl.sgm import split_single_file, unet_sgm_to_diffusers

    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled checkpoints (.ckpt, .bin) are not loaded")
    try:
        with safe_open(path, framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith("model.diffusion_model.")]
            parts = split_single_file({k: f.get_tensor(k) for k in keys})
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}; the file is corrupt or truncated") from e
    try:
        return unet_sgm_to_diffusers(parts["unet"], SDXL_CONFIG.to_diffusers())
    except KeyError as e:
        raise ValueError(f"{path} is not an SDXL base checkpoint: unknown UNet key {e}") from e
