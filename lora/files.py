"""LoRA files: the kohya and diffusers formats, and writing them (reading them: lora/reading.py).

Files are safetensors in two formats (docs/ARCHITECTURE.md, "LoRA files"):
- kohya: `lora_unet_<SGM module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha` (+ `.dora_scale`
  [out, 1(, 1, 1)], LyCORIS' DoRA magnitude) with kohya's `ss_*` and `modelspec.*` metadata; what ComfyUI,
  A1111/Forge and kohya read (diffusers reads it too, except DoRA: its SDXL loader drops `dora_scale`).
- diffusers: peft names `unet.<diffusers module path>.lora_A.weight / .lora_B.weight` (+ `.lora_magnitude_vector`,
  DoRA), for diffusers' `load_lora_weights`; ComfyUI, A1111/Forge and kohya do NOT read this format. Its
  readers take no alpha from the tensors and apply lora_B @ lora_A at scale 1, so the writer folds alpha / rank
  into lora_B and records lora_alpha = r (rank_pattern/alpha_pattern for LoCon's other rank, use_dora) in
  diffusers' `lora_adapter_metadata`; every reader then applies the same update.
Training checkpoints store the LoRA unfolded (`peft_tensors`: lora_B as trained, lora_alpha = alpha in the
metadata), which is lossless for exact resume and still a diffusers file.

In memory a LoRA is `LoRAWeights`: module path -> (down [rank, in(, k, k)], up [out, rank(, 1, 1)], alpha), DoRA
magnitudes [out], plus the UNet config its module paths refer to. A file is written from those tensors and that
config (the kohya names come from the SGM key map, sdxl/sgm.py); reading checks every key and shape against the
UNet, so a LoRA for another base model is an error naming the key, never a silent partial load. What round-trips
exactly (fp32): kohya to kohya, diffusers to diffusers, diffusers to kohya; to diffusers, one multiplication by
alpha / rank.
"""

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save, save_file
from torch import nn

from common.files import atomic_write
from lora.layer import MODES, LoRAConfig, lora_modules, lora_target_names
from lora.text_encoders import is_text_encoder_name, text_encoder_lora_modules
from sdxl.configs import unet_config_to_diffusers
from sdxl.sgm import unet_sgm_names
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
KOHYA_TEXT_ENCODERS = {"lora_te_": "text_encoder.", "lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}
FORMAT_VERSION = "1"  # of the `sdxl_lora.*` metadata we write
BASES = {"sdxl": SDXL_CONFIG, "tiny": TINY_UNET_CONFIG}
# Metadata that describes a file's format: written afresh for each output file, never copied from the input.
FORMAT_KEYS = {"sdxl_lora.format_version", "sdxl_lora.rank", "sdxl_lora.alpha", "sdxl_lora.target_mode",
               "sdxl_lora.conv_rank", "sdxl_lora.conv_alpha", "sdxl_lora.use_dora", "ss_network_args",
               "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
               "modelspec.architecture", "modelspec.sai_model_spec", "modelspec.implementation", "format",
               "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash"}


@dataclass
class LoRAWeights:
    """A UNet LoRA in memory, whatever it came from."""

    # diffusers module path -> (down, up, alpha); a trained text-encoder LoRA's modules are here too, as
    # `text_encoder(_2).text_model.<path>` (lora/text_encoders.py)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    metadata: dict[str, str]  # carried into a file written from it (format keys excluded)
    base: str  # "sdxl", "tiny" or a model path
    unet_config: UNetConfig
    source: str  # "kohya file", "diffusers file", "checkpoint LoRA", "checkpoint EMA", "UNet"
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: module path -> m [out]

    def _counts(self, conv: bool, index: int) -> Counter:
        return Counter(down.shape[0] if index == 0 else alpha for down, _, alpha in self.modules.values()
                       if (down.ndim == 4) == conv)

    @property
    def ranks(self) -> Counter:
        return self._counts(False, 0) or self._counts(True, 0)

    @property
    def alphas(self) -> Counter:
        return self._counts(False, 2) or self._counts(True, 2)

    @property
    def target_mode(self) -> str:
        """As recorded by our trainer; else the smallest mode covering every module (metadata only)."""
        if self.metadata.get("sdxl_lora.target_mode") in MODES:
            return self.metadata["sdxl_lora.target_mode"]
        linear = {name for name, (down, _, _) in self.modules.items()
                  if down.ndim == 2 and not is_text_encoder_name(name)}
        return next((m for m in MODES if linear <= target_names(self.unet_config, m)), "all")

    def lora_config(self) -> LoRAConfig:
        """Rank and alpha for the file's metadata: the most common ones (our files have one of each)."""
        dropout = float(self.metadata.get("sdxl_lora.dropout", 0.0))
        conv_ranks, conv_alphas = self._counts(True, 0), self._counts(True, 2)
        conv = (conv_ranks.most_common(1)[0][0], conv_alphas.most_common(1)[0][0]) if conv_ranks else (0, 0.0)
        return LoRAConfig(self.ranks.most_common(1)[0][0], self.alphas.most_common(1)[0][0], dropout,
                          self.target_mode, *conv, bool(self.magnitudes))


def weights_of(unet: SDXLUNet, metadata: dict[str, str] | None = None, text_encoder: nn.Module | None = None
               ) -> LoRAWeights:
    """The LoRA layers of a UNet (and of its text encoders, when they trained one) (detached) as LoRAWeights."""
    layers = lora_modules(unet) | text_encoder_lora_modules(text_encoder)
    modules = {name: (m.lora_down.weight.detach(), m.lora_up.weight.detach(), m.alpha) for name, m in layers.items()}
    if not modules:
        raise ValueError("this UNet has no LoRA layers to save; call apply_lora first")
    magnitudes = {name: m.magnitude.detach() for name, m in layers.items() if m.magnitude is not None}
    return LoRAWeights(modules, dict(metadata or {}), "unet", unet.config, "UNet", magnitudes)


def meta_unet(config: UNetConfig) -> SDXLUNet:
    """The UNet's module tree with no memory behind its weights (its layer names and shapes)."""
    with torch.device("meta"):
        return SDXLUNet(config)


@functools.cache
def adaptable_layers(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every Linear and Conv2d layer of the UNet: diffusers module path -> its weight's shape."""
    return {n: tuple(m.weight.shape) for n, m in meta_unet(config).named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def lora_shapes(weight_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a rank-1 LoRA on a layer with this weight shape; rank goes in down[0] and up[1]."""
    out, n_in, *kernel = weight_shape
    return (1, n_in, *kernel), (out, 1, *[1] * len(kernel))


def describe(weight_shape) -> str:
    out, n_in, *kernel = weight_shape
    return f"Conv2d({n_in}, {out}, kernel {tuple(kernel)})" if kernel else f"Linear({n_in}, {out})"


def fits(weight_shape, down, up, magnitude=None) -> bool:
    """Do these LoRA (and DoRA magnitude) tensors fit a layer with this weight shape?"""
    want_down, want_up = lora_shapes(weight_shape)
    rank = down.shape[0] if down.ndim else 0
    return (tuple(down.shape) == (rank, *want_down[1:]) and tuple(up.shape) == (want_up[0], rank, *want_up[2:])
            and (magnitude is None or magnitude.numel() == weight_shape[0]))


@functools.cache
def target_names(config: UNetConfig, mode: str) -> frozenset[str]:
    return frozenset(lora_target_names(meta_unet(config), mode))


def check_fits(weights: LoRAWeights) -> None:
    """Every module of `weights` is a Linear or Conv2d layer of its UNet, with matching shapes; else a ValueError
    naming it."""
    layers = adaptable_layers(weights.unet_config)
    for name, (down, up, _) in weights.modules.items():
        if is_text_encoder_name(name):  # trained by us on the encoders; load_lora checks them against the models
            continue
        if name not in layers:
            raise ValueError(f"LoRA layer {name} ({weights.source}) is not a Linear or Conv2d layer of the "
                             f"{weights.base} UNet; the LoRA was made for another base model (e.g. SD 1.5) or "
                             "UNet config")
        magnitude = weights.magnitudes.get(name)
        if not fits(layers[name], down, up, magnitude):
            extra = "" if magnitude is None else f", magnitude {tuple(magnitude.shape)}"
            raise ValueError(f"LoRA layer {name} ({weights.source}) has shapes down {tuple(down.shape)}, up "
                             f"{tuple(up.shape)}{extra} but the {weights.base} UNet's layer is "
                             f"{describe(layers[name])}; the LoRA was made for another base model or UNet config")
    stray = sorted(set(weights.magnitudes) - set(weights.modules))
    if stray:
        raise ValueError(f"DoRA magnitude of {stray[0]} ({weights.source}) has no LoRA weights; the file is incomplete")


# ---------------------------------------------------------------------------------------------------
# Writing


def _check_metadata(metadata: dict | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"LoRA file metadata must map str to str; {bad[0]!r} -> {metadata[bad[0]]!r} does not")
    return metadata


def write_lora(weights: LoRAWeights, path, format: Literal["kohya", "diffusers"] = "kohya",
               dtype: torch.dtype = torch.float32) -> Path:
    """Write `weights` to a `.safetensors` LoRA file in kohya or diffusers (peft) format, atomically."""
    check_fits(weights)
    config = weights.lora_config()
    meta = {k: v for k, v in _check_metadata(weights.metadata).items() if k not in FORMAT_KEYS}
    meta |= format_metadata(config)
    tensors = {}
    if format == "kohya":
        sgm = unet_sgm_names(unet_config_to_diffusers(weights.unet_config))
        for name, (down, up, alpha) in weights.modules.items():
            key = (kohya_text_encoder_key(name) if is_text_encoder_name(name)
                   else "lora_unet_" + sgm[name].replace(".", "_"))
            tensors |= {f"{key}.lora_down.weight": down.to(dtype), f"{key}.lora_up.weight": up.to(dtype),
                        f"{key}.alpha": torch.tensor(float(alpha), dtype=dtype)}
            if name in weights.magnitudes:  # LyCORIS' layout: [out, 1] / [out, 1, 1, 1] (the output axis)
                tensors[f"{key}.dora_scale"] = weights.magnitudes[name].reshape(-1, *[1] * (down.ndim - 1)).to(dtype)
        meta |= {
            # kohya's networks.lora reads plain LoRA and LoCon (conv_dim); DoRA is LyCORIS' (dora_wd)
            "ss_network_module": "lycoris.kohya" if config.use_dora else "networks.lora",
            "ss_network_args": json.dumps(network_args(config)),
            "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(float(config.alpha)),
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }
    elif format == "diffusers":
        for name, (down, up, alpha) in weights.modules.items():
            key = peft_module_key(name)
            tensors[f"{key}.lora_A.weight"] = down.to(dtype)
            tensors[f"{key}.lora_B.weight"] = (up.float() * (alpha / down.shape[0])).to(dtype)  # folded
            if name in weights.magnitudes:  # peft's shapes: [out] for Linear, [1, out, 1, 1] for Conv2d
                m = weights.magnitudes[name].flatten()
                tensors[f"{key}.lora_magnitude_vector"] = (m.view(1, -1, 1, 1) if down.ndim == 4 else m).to(dtype)
        # diffusers builds its peft LoraConfig from this (prefix "unet." stripped) instead of guessing it; alpha
        # is folded, so lora_alpha = r for every layer (the text encoders' parts: diffusers infers r from the
        # shapes and lora_alpha = r)
        unet_modules = [name for name in weights.modules if not is_text_encoder_name(name)]
        peft_config = {"unet.r": config.rank, "unet.lora_alpha": config.rank, "unet.use_dora": config.use_dora,
                       "unet.target_modules": unet_modules} | peft_patterns(weights, config.rank, fold=True)
        peft_config |= text_encoder_peft_config(weights.modules, config.rank, config.rank)
        meta |= {"format": "pt", "lora_adapter_metadata": json.dumps(peft_config, sort_keys=True)}
    else:
        raise ValueError(f"unknown LoRA file format {format!r}; use 'kohya' or 'diffusers'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if format == "kohya":
        meta.setdefault("ss_output_name", path.stem)
        meta.setdefault("modelspec.title", path.stem)
        meta |= kohya_hashes(tensors, meta)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def kohya_text_encoder_key(name: str) -> str:
    """`text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj` -> `lora_te2_text_model_encoder_layers_0_...`."""
    component, _, rest = name.partition(".")
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + rest.replace(".", "_")


def peft_module_key(name: str) -> str:
    """peft's key of a module: `unet.<path>` for the UNet; text-encoder names already start `text_encoder(_2).`."""
    return name if is_text_encoder_name(name) else f"unet.{name}"


def text_encoder_peft_config(names, rank: int, alpha: float) -> dict:
    """diffusers' `lora_adapter_metadata` entries of a text-encoder LoRA (`text_encoder(_2).r`, `.lora_alpha`,
    `.target_modules`: the layer names, e.g. q_proj), from module names or state-dict keys. diffusers builds each
    encoder's peft LoraConfig from these whenever the file has this metadata at all."""
    config = {}
    for component in ("text_encoder", "text_encoder_2"):
        layers = {n.removesuffix(".lora_down.weight").removesuffix(".lora_up.weight").rpartition(".")[2]
                  for n in names if n.startswith(component + ".")}
        if layers:
            config |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                       f"{component}.target_modules": sorted(layers)}
    return config


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash / sshs_legacy_hash as kohya's train_util.precalculate_safetensors_hashes computes them for
    A1111 (modules/hashes.py addnet_hash_safetensors): the SHA-256 of the tensor bytes after the safetensors
    header, and the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000 of the file written with only
    the ss_* metadata (empty for a file under 1 MiB, as kohya's)."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def network_args(config: LoRAConfig) -> dict[str, str]:
    """kohya's `ss_network_args` (strings, as its trainer writes them): LoCon's conv_dim/alpha, LyCORIS' DoRA."""
    args = {"conv_dim": str(config.conv_rank), "conv_alpha": str(float(config.conv_alpha or config.conv_rank))} \
        if config.conv_rank else {}
    return args | ({"algo": "locon", "dora_wd": "True"} if config.use_dora else {})


def format_metadata(config: LoRAConfig) -> dict[str, str]:
    """Our `sdxl_lora.*` description of a LoRA's layout (every format, and training checkpoints)."""
    return {"sdxl_lora.format_version": FORMAT_VERSION, "sdxl_lora.rank": str(config.rank),
            "sdxl_lora.alpha": str(float(config.alpha)), "sdxl_lora.target_mode": config.target_mode,
            "sdxl_lora.conv_rank": str(config.conv_rank), "sdxl_lora.conv_alpha": str(float(config.conv_alpha)),
            "sdxl_lora.use_dora": str(config.use_dora).lower()}


def peft_patterns(weights: LoRAWeights, rank: int, fold: bool) -> dict:
    """peft's rank_pattern / alpha_pattern (`unet.` keys) for the layers whose rank or alpha differ from the
    main ones (LoCon's convs); with `fold`, alpha / rank is in lora_B, so each layer's lora_alpha is its rank."""
    main_alpha = rank if fold else weights.lora_config().alpha
    ranks, alphas = {}, {}
    for name, (down, _, alpha) in weights.modules.items():
        if is_text_encoder_name(name):
            continue
        alpha = down.shape[0] if fold else alpha
        if down.shape[0] != rank:
            ranks[name] = down.shape[0]
        if alpha != main_alpha:
            alphas[name] = alpha
    return ({"unet.rank_pattern": ranks} if ranks else {}) | ({"unet.alpha_pattern": alphas} if alphas else {})


def save_lora(unet, path, config: LoRAConfig, format: Literal["kohya", "diffusers"] = "kohya",
              metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
              text_encoder: nn.Module | None = None) -> Path:
    """Write the UNet's LoRA layers (and the text encoders', if given and trained) to a LoRA file (see
    `write_lora`); `metadata`: extra str -> str entries stored in the file (e.g. the training settings)."""
    weights = weights_of(unet, {**_check_metadata(metadata), "sdxl_lora.target_mode": config.target_mode},
                         text_encoder)
    return write_lora(weights, path, format=format, dtype=dtype)


def peft_tensors(sd: dict[str, torch.Tensor], config: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `lora_state_dict` as a lossless peft file: `unet.<path>.lora_A/B.weight` as trained (alpha not
    folded, DoRA's `lora_magnitude_vector` in peft's shape), lora_alpha (and LoCon's rank/alpha patterns) in
    diffusers' `lora_adapter_metadata`. Returns (tensors, metadata)."""
    tensors, convs = {}, set()
    for key, value in sd.items():
        name, _, part = key.rpartition(".")
        if part == "magnitude":  # peft's shapes: [out] for Linear, [1, out, 1, 1] for Conv2d
            conv = sd[f"{name}.lora_down.weight"].ndim == 4
            tensors[f"unet.{name}.lora_magnitude_vector"] = value.view(1, -1, 1, 1) if conv else value.contiguous()
            continue
        name, _, part = key.rpartition(".lora_")
        tensors[f"{peft_module_key(name)}.lora_{'A' if part == 'down.weight' else 'B'}.weight"] = value.contiguous()
        if value.ndim == 4:
            convs.add(name)
    modules = sorted({k.rpartition(".lora_")[0] for k in sd if ".lora_" in k and not is_text_encoder_name(k)})
    peft_config = {"unet.r": config.rank, "unet.lora_alpha": config.alpha, "unet.use_dora": config.use_dora,
                   "unet.target_modules": modules}
    if convs and config.conv_rank != config.rank:
        peft_config["unet.rank_pattern"] = {name: config.conv_rank for name in sorted(convs)}
    if convs and (config.conv_alpha or config.conv_rank) != config.alpha:
        peft_config["unet.alpha_pattern"] = {name: config.conv_alpha or config.conv_rank for name in sorted(convs)}
    peft_config |= text_encoder_peft_config(sd, config.rank, config.alpha)  # a trained text-encoder LoRA: unfolded
    metadata = format_metadata(config) | {"sdxl_lora.dropout": str(float(config.dropout)), "format": "pt",
                                          "lora_adapter_metadata": json.dumps(peft_config, sort_keys=True)}
    return tensors, metadata


def state_dict_from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `peft_tensors`: back to `lora_state_dict` keys (exact, no arithmetic)."""
    sd = {}
    for key, value in tensors.items():
        stripped = key.removeprefix("unet.")
        suffix = next((s for s in PEFT_SUFFIXES if stripped.endswith(s)), None)
        if suffix is None or (stripped == key and not is_text_encoder_name(key)):
            raise ValueError(f"key {key} is not a unet.*.lora_A/lora_B.weight/lora_magnitude_vector key of a "
                             "training checkpoint")
        part = {"down": "lora_down.weight", "up": "lora_up.weight", "magnitude": "magnitude"}[PEFT_SUFFIXES[suffix]]
        sd[f"{stripped.removesuffix(suffix)}.{part}"] = value.flatten() if part == "magnitude" else value
    return sd
