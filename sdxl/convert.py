"""LoRA files out of training checkpoints, and between the kohya and diffusers formats (`extract_lora_weights.py`).

The writer is `sdxl.lora.save_lora`, which takes a UNet holding LoRA layers. Here that UNet is built on
the meta device (shapes, no memory), and only the LoRA tensors are real, so converting a full-SDXL LoRA
costs no more memory than the LoRA itself. Which UNet: for a checkpoint, the run's `pretrained_model`
(`tiny`, a diffusers folder's unet/config.json, otherwise SDXL base); for a bare file, the first of SDXL
base and the tiny model that it fits exactly (every key names a Linear layer of that UNet with the
file's shapes), unless `base` says which.

What round-trips exactly (fp32): down, up and alpha from a checkpoint to kohya and back, kohya to kohya,
diffusers to diffusers and diffusers to kohya. To diffusers, alpha / rank is folded into lora_B (see
sdxl/lora.py), one fp32 multiplication: the update alpha / rank * up @ down is kept to within rounding.
"""

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sdxl.lora import LoRAConfig, LoRALinear, lora_target_names, read_lora_file, save_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig

BASES = {"sdxl": SDXL_CONFIG, "tiny": TINY_UNET_CONFIG}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("attention", "attention_out", "all")
# Metadata that describes a file's format: save_lora writes it afresh for the output, so it is not copied.
FORMAT_KEYS = {"sdxl_lora.format_version", "sdxl_lora.rank", "sdxl_lora.alpha", "sdxl_lora.target_mode",
               "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
               "modelspec.architecture", "modelspec.sai_model_spec", "modelspec.implementation", "format",
               "lora_adapter_metadata"}


@dataclass
class LoRAWeights:
    """A UNet LoRA in memory, whatever it came from."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # diffusers module path -> (down, up, alpha)
    metadata: dict[str, str]  # carried into the output file (format keys excluded when written)
    base: str  # "sdxl", "tiny" or a model path
    unet_config: UNetConfig
    source: str  # "kohya file", "diffusers file", "checkpoint LoRA", "checkpoint EMA"

    @property
    def ranks(self) -> Counter:
        return Counter(down.shape[0] for down, _, _ in self.modules.values())

    @property
    def alphas(self) -> Counter:
        return Counter(alpha for _, _, alpha in self.modules.values())

    @property
    def target_mode(self) -> str:
        """As recorded by our trainer; else the smallest mode covering every module (metadata only)."""
        if self.metadata.get("sdxl_lora.target_mode") in MODES:
            return self.metadata["sdxl_lora.target_mode"]
        return next((m for m in MODES if set(self.modules) <= target_names(self.unet_config, m)), "all")

    def lora_config(self) -> LoRAConfig:
        """Rank and alpha for the file's metadata: the most common ones (our files have one of each)."""
        dropout = float(self.metadata.get("sdxl_lora.dropout", 0.0))
        return LoRAConfig(self.ranks.most_common(1)[0][0], self.alphas.most_common(1)[0][0], dropout,
                          self.target_mode)


def meta_unet(config: UNetConfig) -> SDXLUNet:
    """The UNet's module tree with no memory behind its weights."""
    with torch.device("meta"):
        return SDXLUNet(config)


@functools.cache
def linear_layers(config: UNetConfig) -> dict[str, tuple[int, int]]:
    """Every Linear layer of the UNet: diffusers module path -> (in_features, out_features)."""
    return {n: (m.in_features, m.out_features) for n, m in meta_unet(config).named_modules()
            if isinstance(m, nn.Linear)}


@functools.cache
def target_names(config: UNetConfig, mode: str) -> frozenset[str]:
    return frozenset(lora_target_names(meta_unet(config), mode))


def check_fits(weights: "LoRAWeights") -> None:
    """Every module of `weights` is a Linear layer of its UNet, with matching shapes; else a ValueError naming it."""
    layers = linear_layers(weights.unet_config)
    for name, (down, up, _) in weights.modules.items():
        if name not in layers:
            raise ValueError(f"LoRA layer {name} ({weights.source}) is not a Linear layer of the {weights.base} UNet; "
                             "the LoRA was made for another base model (e.g. SD 1.5) or UNet config")
        n_in, n_out = layers[name]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != n_in or tuple(up.shape) != (n_out, down.shape[0]):
            raise ValueError(f"LoRA layer {name} ({weights.source}) has shapes down {tuple(down.shape)}, up "
                             f"{tuple(up.shape)} but the {weights.base} UNet's layer is Linear({n_in}, {n_out}); "
                             "the LoRA was made for another base model or UNet config")


def unet_config_of(model) -> tuple[str, UNetConfig]:
    """(name, config) of a run's `pretrained_model`: `tiny`, `sdxl`, or a diffusers folder that is still there
    (its unet/config.json); anything else (a single-file checkpoint, a moved folder) is SDXL base."""
    from sdxl.loading import read_unet_config, unet_folder

    name = str(model)
    if name in BASES:
        return name, BASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return name, read_unet_config(unet_folder(path))
    return "sdxl", SDXL_CONFIG


def file_format(path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return "kohya" if any(k.startswith("lora_unet_") for k in f.keys()) else "diffusers"


def read_lora(path, base: str | None = None) -> LoRAWeights:
    """A LoRA file of any format `load_lora` reads, checked against the UNet it belongs to (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        source = f"{file_format(path)} file"
    except Exception as e:  # safetensors raises its own types for files that are not safetensors
        raise ValueError(f"cannot read LoRA file {path}: {e}; it is not a complete .safetensors file") from e
    candidates = [unet_config_of(base)] if base else list(BASES.items())
    errors = {}
    for name, config in candidates:
        try:
            modules, metadata = read_lora_file(path, config.to_diffusers())  # key names (kohya) checked here
            if not modules:
                raise ValueError(f"{path} holds no LoRA weights (no lora_unet_* or *.lora_A/B.weight keys)")
            weights = LoRAWeights(modules, metadata, name, config, source)
            check_fits(weights)  # and every module and shape here
            return weights
        except ValueError as e:
            errors[name] = str(e)
    if len(set(errors.values())) == 1:  # e.g. a module neither has: say it once
        raise ValueError(next(iter(errors.values())) + ("" if base else " (tried SDXL base and the tiny model)"))
    raise ValueError(f"{path} fits no known base model: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
                     + " (give --base if it was made for another SDXL-shaped model)")


def read_checkpoint(checkpoint, ema: bool = False, base: str | None = None) -> LoRAWeights:
    """The LoRA (or EMA) weights of a training checkpoint (`training.checkpoints.Checkpoint`), with the
    metadata lora_final.safetensors gets (training settings, steps, seed)."""
    sd = checkpoint.ema if ema else checkpoint.lora
    if sd is None:
        raise ValueError(f"checkpoint {checkpoint.path} has no EMA weights (the run did not use --use_ema); "
                         "leave out --ema")
    lora = checkpoint.lora_config
    name, config = unet_config_of(base or checkpoint.config.get("pretrained_model", "sdxl"))
    names = sorted({k.rpartition(".lora_")[0] for k in sd})
    modules = {n: (sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], lora.alpha) for n in names}
    cfg = checkpoint.config
    config_text = (checkpoint.path / "config.yaml").read_text(encoding="utf-8")
    metadata = {
        "sdxl_lora.training": config_text, "sdxl_lora.target_mode": lora.target_mode,
        "sdxl_lora.dropout": str(float(lora.dropout)), "sdxl_lora.checkpoint": checkpoint.path.name,
        "sdxl_lora.weights": "ema" if ema else "lora", "ss_steps": str(checkpoint.state["step"]),
        "ss_seed": str(cfg.get("seed")), "ss_learning_rate": str(cfg.get("learning_rate")),
        "ss_resolution": str(cfg.get("image_size")),
    }
    weights = LoRAWeights(modules, metadata, name, config, f"checkpoint {'EMA' if ema else 'LoRA'}")
    check_fits(weights)  # shapes against the base: a clear error now rather than a broken file later
    return weights


def lora_unet(weights: LoRAWeights) -> SDXLUNet:
    """A meta UNet whose adapted Linear layers are LoRALinear holding `weights`' real tensors."""
    check_fits(weights)
    unet = meta_unet(weights.unet_config)
    for name, (down, up, alpha) in weights.modules.items():
        linear = unet.get_submodule(name)
        wrapped = LoRALinear(linear, down.shape[0], alpha)
        wrapped.lora_down.weight = nn.Parameter(down.float(), requires_grad=False)  # fp32 as trained; exact
        wrapped.lora_up.weight = nn.Parameter(up.float(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, wrapped)
    return unet


def write_lora(weights: LoRAWeights, path, format: str = "kohya", dtype: torch.dtype = torch.float32) -> Path:
    """Write `weights` as a kohya or diffusers LoRA file (atomically, by save_lora)."""
    config = weights.lora_config()
    if format == "diffusers" and len(weights.ranks) > 1:
        raise ValueError(f"this LoRA has several ranks {sorted(weights.ranks)}; the diffusers format written here "
                         "takes one rank: use --format kohya")
    metadata = {k: v for k, v in weights.metadata.items() if k not in FORMAT_KEYS}
    return save_lora(lora_unet(weights), path, config, format=format, metadata=metadata, dtype=dtype)


def summary(weights: LoRAWeights, max_value: int = 100) -> str:
    """What --info prints: rank, alpha, targets, module count, base, dtype, metadata."""
    def counted(c: Counter) -> str:
        return ", ".join(f"{v:g}" + (f" ({n} layers)" if len(c) > 1 else "") for v, n in sorted(c.items()))

    alpha = counted(weights.alphas)
    trained = weights.metadata.get("sdxl_lora.alpha")
    if weights.source == "diffusers file" and trained and {float(trained)} != set(weights.alphas):
        alpha += f" (alpha / rank folded into lora_B; trained with alpha {float(trained):g})"
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for d, u, _ in weights.modules.values() for t in (d, u)})
    rows = [
        ("weights", weights.source),
        ("base", weights.base),
        ("rank", counted(weights.ranks)),
        ("alpha", alpha),
        ("targets", weights.target_mode),
        ("modules", str(len(weights.modules))),
        ("dtype", ", ".join(dtypes)),
        ("metadata", f"{len(weights.metadata)} keys"),
    ]
    lines = [f"{label:<10}{value}" for label, value in rows]
    for key in sorted(weights.metadata):
        value = weights.metadata[key]
        if len(value) > max_value or "\n" in value:
            first = value.splitlines()[0] if value.strip() else ""
            value = f"{first[:max_value]}... ({len(value)} characters, {len(value.splitlines())} lines)"
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
