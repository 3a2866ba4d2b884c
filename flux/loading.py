"""Loading FLUX.1 weights: a diffusers folder, a Black Forest Labs single file (bf16, fp16 or fp8), or `tiny-flux`.

Every tensor comes from safetensors; pickled `.bin`/`.ckpt`/`.pt` files are refused. Our transformer is built on
the meta device and takes the loaded tensors by assignment, so loading never holds two copies of the weights.

A single file (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, ComfyUI's `model.diffusion_model.` layout,
Kijai's / ComfyUI's fp8 files) holds the transformer only; its config is inferred from its shapes
(flux/configs.py) and its names converted by flux/bfl.py. It is read tensor by tensor, each upcast (fp8) or cast
to the load dtype as it is read, so a 12 GB fp8 file never exists as one 48 GB fp32 dict. fp8 layouts read:
plain `float8_e4m3fn` / `float8_e5m2` weights; ComfyUI's scaled fp8 (a `scaled_fp8` marker and a scalar
`<layer>.scale_weight`, weight = fp8 * scale) and its newer `comfy_quant` fp8 (`<layer>.weight_scale`); the
`scale_input` / `input_scale` activation scales are for fp8 matmuls and are dropped. Other quantisations (NF4,
NVFP4, int8) are a one-line error. The text encoders, VAE and scheduler of a single file come from a diffusers
FLUX.1 folder given as `config_path`.

A missing path, a folder that is not FLUX.1, and missing, unexpected or mis-shaped keys are one-line errors that
name the path or the keys.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from common.weights import find_weights, load_state_dict_checked, read_safetensors
from diffusion.vae import LatentVAE
from flux.bfl import PREFIX, convert_tensor, diffusers_to_bfl, param_names
from flux.configs import (
    FLUX_DEV_SCHEDULER,
    FLUX_SCHNELL_SCHEDULER,
    MAX_SEQUENCE_LENGTH,
    config_from_bfl_shapes,
    config_from_diffusers,
)
from flux.text_encoders import FluxTextEncoder
from flux.tiny import tiny_flux_path
from flux.transformer import FluxConfig, FluxTransformer

TINY = "tiny-flux"
HINT = "download FLUX.1 (huggingface-cli download black-forest-labs/FLUX.1-dev), or use tiny-flux"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALES = ("scale_weight", "weight_scale")  # ComfyUI's per-layer fp8 weight scale: legacy scaled_fp8, comfy_quant
DROPPED = ("scale_input", "input_scale", "comfy_quant")  # activation scales and per-layer quant config
UNSUPPORTED = ("weight_scale_2", "absmax", "quant_map", "quant_state", "SCB", "nested_absmax")  # NVFP4, bnb


def resolve_model_path(path) -> Path:
    """`tiny-flux` -> the cached tiny model (built on first use); anything else must exist."""
    if str(path) == TINY:
        return tiny_flux_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist; {HINT}")
    return p


def model_path_problem(path) -> str | None:
    """Why `path` cannot be a FLUX.1 `--pretrained_model`, or None if it can. Checked before anything loads."""
    if str(path) == TINY:
        return None
    model = Path(path).expanduser()
    if not model.exists():
        return f"does not exist; {HINT}"
    if model.is_file():
        try:
            keys, _ = single_file_index(model)
        except ValueError as e:
            return str(e).removeprefix(f"{model} ")
        if "img_in.weight" not in keys and "x_embedder.weight" not in keys:
            return "is not a FLUX.1 transformer single file (no img_in.weight or x_embedder.weight)"
        return None
    index = model / "model_index.json"
    kind = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if index.is_file() and not kind.startswith("Flux"):
        return f"is a {kind} folder (model_index.json), not FLUX.1; {HINT}"
    config = model / "transformer" / "config.json"
    if not config.is_file():
        return f"is not a diffusers FLUX.1 folder (no transformer/config.json); {HINT}"
    kind = json.loads(config.read_text()).get("_class_name")
    if kind != "FluxTransformer2DModel":
        return f"transformer/config.json describes a {kind}, not a FLUX.1 FluxTransformer2DModel"
    return None


def transformer_folder(path: Path) -> Path:
    """`path/transformer` for a diffusers FLUX.1 folder, or `path` itself when it is a transformer folder."""
    for folder in (path / "transformer", path):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{path} is not a diffusers FLUX.1 folder (no transformer/config.json); {HINT}")


def read_transformer_config(folder: Path) -> FluxConfig:
    try:
        return config_from_diffusers(json.loads((folder / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from e


def load_transformer(path, dtype=torch.float32, device="cpu", config_path=None) -> FluxTransformer:
    """Our FLUX transformer, frozen, from a diffusers FLUX.1 folder, a single `.safetensors` (BFL or ComfyUI names,
    bf16/fp16/fp8), or "tiny-flux". `config_path`: for a single file only, a diffusers folder whose
    transformer/config.json describes it (needed when its heads are not FLUX.1's 128 wide)."""
    path = resolve_model_path(path)
    if path.is_file():
        config, sd = read_single_file(path, dtype, device, config_path)
    else:
        folder = transformer_folder(path)
        config = read_transformer_config(folder)
        sd = read_safetensors(find_weights(folder, "diffusion_pytorch_model"), dtype=dtype)
    with torch.device("meta"):
        model = FluxTransformer(config)
    load_state_dict_checked(model, sd, path, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Single files


def single_file_index(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The transformer's tensors of a single file (ComfyUI prefix stripped; other parts of a ComfyUI checkpoint left
    out): name -> key in the file, and every key's shape. Only the header is read."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; pickled checkpoints (.ckpt, .pt, .bin) are not loaded")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} cannot be read: {e}; the file is corrupt or truncated, download it again") from e
    prefix = PREFIX if any(k.startswith(PREFIX) for k in shapes) else ""
    keys = {k[len(prefix) :]: k for k in shapes if k.startswith(prefix)}
    bad = [k for k in keys if k.rsplit(".", 1)[-1] in UNSUPPORTED or ".quant_state." in k]
    if bad:
        raise ValueError(f"{path} is quantised in a layout this loader does not read (key {bad[0]}: NF4, NVFP4 or "
                         "int8); use a bf16, fp16 or fp8 (float8_e4m3fn) FLUX.1 file")
    return keys, shapes


def _weights(keys: dict[str, str]) -> list[str]:
    """The model's own tensors among `keys`: without fp8 scales, activation scales and the scaled_fp8 marker."""
    return [k for k in keys if k != "scaled_fp8" and k.rsplit(".", 1)[-1] not in SCALES + DROPPED]


def single_file_config(path: Path, keys, shapes, config_path=None) -> FluxConfig:
    """The config of a single file from its shapes, checked against `config_path`'s transformer/config.json if given."""
    names = _weights(keys)
    if "x_embedder.weight" in names:  # diffusers names in one file: their BFL shapes, through the meta device
        meta = {k: torch.empty(shapes[keys[k]], device="meta") for k in names}
        bfl_shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(meta).items()}
    else:
        bfl_shapes = {k: shapes[keys[k]] for k in names}
    given = read_transformer_config(transformer_folder(resolve_model_path(config_path))) if config_path else None
    try:
        config = config_from_bfl_shapes(bfl_shapes, given.axes_dims_rope if given else None)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from e
    if given is not None and given != config:
        diff = [f"{f} {getattr(config, f)} != {getattr(given, f)}" for f in config.__dataclass_fields__
                if getattr(config, f) != getattr(given, f)]
        raise ValueError(f"{path} does not match the transformer config of {config_path}: {', '.join(diff)}")
    return config


def read_single_file(path: Path, dtype=torch.float32, device="cpu", config_path=None) -> tuple[FluxConfig, dict]:
    """(config, state dict in diffusers names at `dtype` on `device`) of a single file, read, converted and moved
    tensor by tensor (loading onto a GPU, host memory holds one converted tensor at a time)."""
    keys, shapes = single_file_index(path)
    config = single_file_config(path, keys, shapes, config_path)
    names = _weights(keys)
    try:
        targets = {k: (k,) for k in names} if "x_embedder.weight" in names else param_names(names)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    sd = {}
    with safe_open(path, framework="pt") as f:
        for name in names:
            t = _read_tensor(f, path, name, keys, dtype).to(device)
            parts = convert_tensor(name, t, targets[name], config.inner_dim)
            # split parts are views of the fused tensor: copies, so that it is freed now
            sd |= {k: v.clone() if len(parts) > 1 else v for k, v in parts.items()}
    return config, sd


def _read_tensor(f, path: Path, name: str, keys: dict[str, str], dtype) -> torch.Tensor:
    """One tensor at `dtype`; fp8 weights upcast through fp32 and multiplied by their ComfyUI scale if they have one."""
    t = f.get_tensor(keys[name])
    if t.dtype in FP8:
        t = t.float()
        module = name.rsplit(".", 1)[0]
        scales = [keys[f"{module}.{s}"] for s in SCALES if f"{module}.{s}" in keys and name.endswith(".weight")]
        if scales:
            scale = f.get_tensor(scales[0])
            if scale.numel() != 1:
                raise ValueError(f"{path}: {scales[0]} has shape {tuple(scale.shape)}; only one fp8 scale per "
                                 "tensor is supported")
            t = t * scale.float()
    elif not t.is_floating_point():
        raise ValueError(f"{path}: {keys[name]} is {t.dtype}, a quantised layout this loader does not read; use a "
                         "bf16, fp16 or fp8 (float8_e4m3fn) FLUX.1 file")
    return t.to(dtype)


def is_schnell(path) -> bool:
    """True for a FLUX.1-schnell-shaped model: its transformer has no guidance embedding."""
    path = resolve_model_path(path)
    if path.is_file():
        keys, _ = single_file_index(path)
        return not ({"guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"} & set(keys))
    return not read_transformer_config(transformer_folder(path)).guidance_embeds


def default_max_sequence_length(path, config_path=None) -> int:
    """The T5 length the model was trained with: 256 for schnell, 512 for dev, capped by the `model_max_length`
    of its T5 tokenizer (a folder's, or `config_path`'s for a single file): FLUX.1's say 512, tiny-flux's 32."""
    length = MAX_SEQUENCE_LENGTH["schnell" if is_schnell(path) else "dev"]
    path = resolve_model_path(path)
    folder = path if path.is_dir() else resolve_model_path(config_path) if config_path else None
    config = folder / "tokenizer_2" / "tokenizer_config.json" if folder is not None else None
    if config is not None and config.is_file():
        try:
            cap = json.loads(config.read_text()).get("model_max_length")
        except (OSError, ValueError):
            cap = None
        if isinstance(cap, int) and 0 < cap < length:
            return cap
    return length


def _parts_folder(path: Path, config_path, part: str) -> Path:
    """Where a part other than the transformer comes from: the model folder, or a single file's config folder."""
    if path.is_dir():
        return path
    if not config_path:
        raise ValueError(f"{path} is a single file holding only the transformer; give a diffusers FLUX.1 folder "
                         f"(e.g. black-forest-labs/FLUX.1-dev) as the config path, for the {part}")
    folder = resolve_model_path(config_path)
    if not folder.is_dir():
        raise ValueError(f"config path {folder} is not a folder: give a diffusers FLUX.1 folder for the {part}")
    return folder


def load_text_encoder(path, dtype=torch.float32, device="cpu", max_sequence_length=None,
                      config_path=None) -> FluxTextEncoder:
    """CLIP-L and T5 with their tokenizers from a diffusers FLUX.1 folder or "tiny-flux" (a single file: from
    `config_path`). max_sequence_length: the T5 length, by default the model's (512 dev, 256 schnell)."""
    path = resolve_model_path(path)
    folder = _parts_folder(path, config_path, "text encoders")
    length = max_sequence_length or default_max_sequence_length(path, config_path)
    return FluxTextEncoder.from_pretrained(folder, dtype=dtype, device=device, max_sequence_length=length)


def load_vae(path, device="cpu", config_path=None) -> LatentVAE:
    """The fp32 16-channel VAE from a diffusers FLUX.1 folder or "tiny-flux" (a single file: from `config_path`)."""
    path = resolve_model_path(path)
    vae = LatentVAE.from_pretrained(_parts_folder(path, config_path, "VAE"), device=device)
    if vae.config.latent_channels != 16:
        raise ValueError(f"the VAE of {path} has {vae.config.latent_channels} latent channels; FLUX.1's has 16")
    return vae


def scheduler_config(path, config_path=None) -> dict:
    """The FlowMatchEulerDiscreteScheduler config: the folder's scheduler/scheduler_config.json; for a single file
    that of `config_path`, else FLUX.1-dev's or schnell's (flux/configs.py)."""
    path = resolve_model_path(path)
    if path.is_file() and not config_path:
        return dict(FLUX_SCHNELL_SCHEDULER if is_schnell(path) else FLUX_DEV_SCHEDULER)
    file = _parts_folder(path, config_path, "scheduler") / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise ValueError(f"no scheduler/scheduler_config.json in {file.parent.parent}; a diffusers FLUX.1 folder "
                         "has one")
    cfg = json.loads(file.read_text())
    if cfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{file} describes a {cfg.get('_class_name')}, not FLUX.1's FlowMatchEulerDiscreteScheduler")
    return cfg
