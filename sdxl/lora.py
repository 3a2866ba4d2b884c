"""LoRA for the SDXL UNet: the trainable wrapper, where it goes, and the files it is saved to.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a Linear layer W and learns a low-rank update: y = W x + (alpha / rank) * up(down(x)),
with `down` [rank, in] initialised like peft's lora_A (kaiming-uniform, a = sqrt(5)) and `up`
[out, rank] zero, so training starts from the base model exactly.

Files are safetensors in two formats (see DESIGN.md, "LoRA files out"):
- kohya: `lora_unet_<SGM module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha` with
  kohya's `ss_*` and `modelspec.*` metadata; loads in ComfyUI, A1111/Forge, kohya and diffusers.
- diffusers: peft names `unet.<diffusers module path>.lora_A.weight / .lora_B.weight`. Tools that
  read this format (ComfyUI, older diffusers) take no alpha from it and apply lora_B @ lora_A at
  scale 1, so the writer folds alpha / rank into lora_B and records lora_alpha = r in diffusers'
  `lora_adapter_metadata`; every reader then applies the same update.
`load_lora` reads both, plus kohya files with diffusers-style names, and merges them into the weights.
Training checkpoints store the LoRA unfolded (`peft_tensors`: lora_B as trained, lora_alpha = alpha in
the metadata), which is lossless for exact resume and still a diffusers file; `load_lora` also takes
a checkpoint folder.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdxl.sgm import unet_sgm_names
from sdxl.unet import SDXL_CONFIG, Transformer2DModel

TargetMode = Literal["attention", "attention_out", "all"]
TARGETS = {  # Linear layers inside each Transformer2DModel, by name relative to it ("all" takes every one)
    "attention": tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v")),
    "attention_out": tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
}
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}
FORMAT_VERSION = "1"  # of the `sdxl_lora.*` metadata we write


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_mode: TargetMode = "attention"

    def __post_init__(self):
        if self.target_mode not in ("attention", "attention_out", "all"):
            raise ValueError(f"LoRA target_mode {self.target_mode!r} is not one of attention, attention_out, all")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1; got {self}")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base`) plus a trainable fp32 low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        kw = dict(bias=False, dtype=torch.float32, device=base.weight.device)  # fp32 even for a bf16 base
        self.lora_down = nn.Linear(base.in_features, rank, **kw)  # (rank, in)
        self.lora_up = nn.Linear(rank, base.out_features, **kw)  # (out, rank)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as peft's lora_A
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha = rank, float(alpha)
        self.scale = 1.0  # inference strength, multiplies alpha / rank
        self.merged_scale = None  # the scale merged into base.weight, None when unmerged

    def delta_weight(self) -> torch.Tensor:
        """scale * alpha / rank * up @ down, fp32, shaped like base.weight."""
        return (self.scale * self.alpha / self.rank) * (self.lora_up.weight @ self.lora_down.weight)

    def forward(self, x):
        y = self.base(x)
        if self.merged_scale is not None:
            return y
        # The branch runs in fp32 even under autocast: the update is small next to W x, and bf16 would
        # round much of it away. It costs ~rank/in of the base layer's FLOPs.
        with torch.autocast(x.device.type, enabled=False):
            h = self.lora_up(self.lora_down(self.dropout(x.float())))
        return y + (self.scale * self.alpha / self.rank * h).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into base.weight (in fp32, cast back); forward then skips the branch."""
        if self.merged_scale is None:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what `merge` added (exact up to one rounding of base.weight's dtype)."""
        if self.merged_scale is not None:
            scale, self.scale = self.scale, self.merged_scale
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.scale, self.merged_scale = scale, None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}, merged={self.merged_scale is not None}"


# ---------------------------------------------------------------------------------------------------
# Putting LoRA into a UNet, and its state dict (training checkpoints use these keys).


def lora_target_names(unet: nn.Module, mode: TargetMode) -> list[str]:
    """Module paths (diffusers names) of the Linear layers `mode` adapts, in module order."""
    names = []
    for prefix, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear) and (mode == "all" or name.endswith(TARGETS[mode])):
                    names.append(f"{prefix}.{name}")
    return names


def lora_modules(unet: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(unet: nn.Module, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Freeze the UNet, wrap every targeted Linear in a LoRALinear; only LoRA params train."""
    if lora_modules(unet):
        raise ValueError("this UNet already has LoRA layers; build a fresh UNet to apply another LoRA")
    unet.requires_grad_(False)
    wrapped = {}
    for name in lora_target_names(unet, config.target_mode):
        parent_name, _, child = name.rpartition(".")
        wrapped[name] = LoRALinear(unet.get_submodule(name), config.rank, config.alpha, config.dropout)
        setattr(unet.get_submodule(parent_name), child, wrapped[name])
    return wrapped


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(unet).values() for p in (m.lora_down.weight, m.lora_up.weight)]


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """`<diffusers module path>.lora_down.weight` / `.lora_up.weight` -> fp32 tensors (detached)."""
    sd = {}
    for name, m in lora_modules(unet).items():
        sd[f"{name}.lora_down.weight"] = m.lora_down.weight.detach()
        sd[f"{name}.lora_up.weight"] = m.lora_up.weight.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(unet: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state_dict` into the UNet's LoRA layers; keys and shapes must match exactly."""
    expected = {k: v.shape for k, v in lora_state_dict(unet).items()}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [k for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or shapes:
        first = (missing + unexpected + shapes)[0]
        raise ValueError(f"LoRA state dict does not match this UNet's LoRA layers: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped keys (first: {first}); "
                         "was it saved with another rank or target_mode?")
    merged = [name for name, m in lora_modules(unet).items() if m.merged_scale is not None]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]} is merged; call unmerge() before loading LoRA weights")
    for name, m in lora_modules(unet).items():
        m.lora_down.weight.copy_(sd[f"{name}.lora_down.weight"])
        m.lora_up.weight.copy_(sd[f"{name}.lora_up.weight"])


# ---------------------------------------------------------------------------------------------------
# Files.


def _check_metadata(metadata: dict | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"LoRA file metadata must map str to str; {bad[0]!r} -> {metadata[bad[0]]!r} does not")
    return metadata


def save_lora(unet, path, config: LoRAConfig, format: Literal["kohya", "diffusers"] = "kohya",
              metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the UNet's LoRA layers to a `.safetensors` file in kohya or diffusers (peft) format.

    `metadata`: extra str -> str entries stored in the file (e.g. the training settings)."""
    modules = lora_modules(unet)
    if not modules:
        raise ValueError("this UNet has no LoRA layers to save; call apply_lora first")
    path = Path(path)
    meta = {"sdxl_lora.format_version": FORMAT_VERSION, "sdxl_lora.rank": str(config.rank),
            "sdxl_lora.alpha": str(float(config.alpha)), "sdxl_lora.target_mode": config.target_mode,
            **_check_metadata(metadata)}
    tensors = {}
    if format == "kohya":
        sgm = unet_sgm_names(unet.config.to_diffusers())
        for name, m in modules.items():
            key = "lora_unet_" + sgm[name].replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = m.lora_down.weight.detach().to(dtype)
            tensors[f"{key}.lora_up.weight"] = m.lora_up.weight.detach().to(dtype)
            tensors[f"{key}.alpha"] = torch.tensor(m.alpha, dtype=dtype)
        meta |= {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(float(config.alpha)),
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }
    elif format == "diffusers":
        ranks = {m.rank for m in modules.values()}
        if ranks != {config.rank}:
            raise ValueError(f"LoRA layers have ranks {sorted(ranks)} but config.rank is {config.rank}")
        for name, m in modules.items():
            up = m.lora_up.weight.detach() * (m.alpha / m.rank)  # folded: readers apply scale 1
            tensors[f"unet.{name}.lora_A.weight"] = m.lora_down.weight.detach().to(dtype)
            tensors[f"unet.{name}.lora_B.weight"] = up.to(dtype)
        # diffusers builds its peft LoraConfig from this (prefix "unet." stripped) instead of guessing it
        peft_config = {"unet.r": config.rank, "unet.lora_alpha": config.rank, "unet.target_modules": list(modules)}
        meta |= {"format": "pt", "lora_adapter_metadata": json.dumps(peft_config, sort_keys=True)}
    else:
        raise ValueError(f"unknown LoRA file format {format!r}; use 'kohya' or 'diffusers'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # renamed into place: a crash never leaves half a file
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def peft_tensors(sd: dict[str, torch.Tensor], config: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `lora_state_dict` as a lossless peft file: `unet.<path>.lora_A/B.weight` as trained (alpha not
    folded), lora_alpha in diffusers' `lora_adapter_metadata`. Returns (tensors, metadata)."""
    tensors = {}
    for key, value in sd.items():
        name, _, part = key.rpartition(".lora_")
        tensors[f"unet.{name}.lora_{'A' if part == 'down.weight' else 'B'}.weight"] = value.contiguous()
    modules = sorted({k.rpartition(".lora_")[0] for k in sd})
    peft_config = {"unet.r": config.rank, "unet.lora_alpha": config.alpha, "unet.target_modules": modules}
    metadata = {"sdxl_lora.format_version": FORMAT_VERSION, "sdxl_lora.rank": str(config.rank),
                "sdxl_lora.alpha": str(float(config.alpha)), "sdxl_lora.target_mode": config.target_mode,
                "sdxl_lora.dropout": str(float(config.dropout)), "format": "pt",
                "lora_adapter_metadata": json.dumps(peft_config, sort_keys=True)}
    return tensors, metadata


def state_dict_from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `peft_tensors`: back to `lora_state_dict` keys (exact, no arithmetic)."""
    sd = {}
    for key, value in tensors.items():
        stripped = key.removeprefix("unet.")
        suffix = next((s for s in PEFT_SUFFIXES if stripped.endswith(s)), None)
        if suffix is None or stripped == key:
            raise ValueError(f"key {key} is not a unet.*.lora_A/lora_B.weight key of a training checkpoint")
        part = "lora_down" if PEFT_SUFFIXES[suffix] == "down" else "lora_up"
        sd[f"{stripped.removesuffix(suffix)}.{part}.weight"] = value
    return sd


def lora_file_of(path) -> Path:
    """A LoRA file, or a training checkpoint folder -> its EMA weights if the run kept them (as
    `lora_final` does), else its LoRA weights."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "lora.safetensors").is_file():
        raise FileNotFoundError(f"{path} is a folder but not a training checkpoint (no lora.safetensors in it); "
                                "give a .safetensors LoRA file or a checkpoints/step_XXXXXX folder")
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no COMPLETE marker: its save was interrupted); "
                         "use an earlier checkpoint")
    if "schema_version: 1\n" in (path / "COMPLETE").read_text():
        raise ValueError(f"checkpoint {path} was written by an older version of this trainer; make a LoRA file of "
                         f"it with: python extract_lora_weights.py {path} -o lora.safetensors")
    return path / ("ema.safetensors" if (path / "ema.safetensors").is_file() else "lora.safetensors")


def _kohya_names(unet_config: dict) -> dict[str, str]:
    """kohya LoRA name (SGM-style and diffusers-style) -> diffusers module path, for one UNet config."""
    names = {}
    for diffusers, sgm in unet_sgm_names(unet_config).items():
        for name in (sgm, diffusers):
            names["lora_unet_" + name.replace(".", "_")] = diffusers
    return names


def _peft_alpha(metadata: dict[str, str], path) -> tuple:
    """(lora_alpha or None, alpha_pattern, use_rslora) from diffusers' `lora_adapter_metadata`, UNet part."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: lora_adapter_metadata is not valid JSON ({e})") from e
    if any(k.startswith("unet.") for k in config):
        config = {k.removeprefix("unet."): v for k, v in config.items() if k.startswith("unet.")}
    return config.get("lora_alpha"), config.get("alpha_pattern") or {}, bool(config.get("use_rslora"))


def _parse(path, unet_config: dict) -> tuple[dict[str, dict], dict[str, str]]:
    """Module path -> {"down", "up", "alpha", "key"} and the file's metadata; see read_lora_file."""
    path = lora_file_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read LoRA file {path}: {e}; it is not a complete .safetensors file "
                         "(pickled .pt/.ckpt LoRAs are not loaded; re-download or convert it)") from e
    kohya = _kohya_names(unet_config)
    entries: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            raise ValueError(f"{path}: key {key} is a text-encoder LoRA weight; only UNet LoRAs are supported "
                             "(remove the lora_te*/text_encoder* keys to use its UNet part)")
        if key.startswith("lora_unet_"):
            name, _, suffix = key.partition(".")
            if suffix not in KOHYA_SUFFIXES:
                raise ValueError(f"{path}: key {key} is not a plain LoRA weight (DoRA/LoHa/LoKr are not supported)")
            if name not in kohya:
                raise ValueError(f"{path}: key {key} names no module of this SDXL UNet; the LoRA was made for "
                                 "another base model (e.g. SD 1.5) or another UNet config")
            module, part = kohya[name], KOHYA_SUFFIXES[suffix]
        else:
            stripped = key.removeprefix("unet.")
            suffix = next((s for s in PEFT_SUFFIXES if stripped.endswith(s)), None)
            if suffix is None:
                raise ValueError(f"{path}: key {key} is neither a kohya (lora_unet_*) nor a diffusers/peft "
                                 "(unet.*.lora_A/lora_B.weight) LoRA weight")
            module, part = stripped.removesuffix(suffix), PEFT_SUFFIXES[suffix]
        entry = entries.setdefault(module, {"key": key})
        if part in entry:
            raise ValueError(f"{path}: key {key} repeats the {part} weight of {entry['key']}")
        if part == "alpha" and tensor.numel() != 1:
            raise ValueError(f"{path}: key {key} should be one number (alpha), not shape {tuple(tensor.shape)}")
        entry[part] = tensor
    lora_alpha, alpha_pattern, rslora = _peft_alpha(metadata, path)
    for module, entry in entries.items():
        if "down" not in entry or "up" not in entry:
            raise ValueError(f"{path}: key {entry['key']} has no matching {'up' if 'down' in entry else 'down'} "
                             "weight; the file is incomplete")
        rank = entry["down"].shape[0]
        if "alpha" in entry:  # kohya
            entry["alpha"] = float(entry["alpha"].float().item())
        elif not entry["key"].startswith("lora_unet_"):  # peft: scale = lora_alpha / r (or / sqrt(r), rsLoRA)
            pattern = next((p for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", module)), None)
            alpha = alpha_pattern[pattern] if pattern else lora_alpha
            entry["alpha"] = rank if alpha is None else float(alpha) * (math.sqrt(rank) if rslora else 1.0)
        else:  # kohya without .alpha means alpha = rank
            entry["alpha"] = float(rank)
    return entries, metadata


def read_lora_file(path, unet_config: dict | None = None):
    """Parse a LoRA file of any supported format into diffusers module path -> (down, up, alpha).

    down is [rank, in], up is [out, rank]; the update to apply is alpha / rank * up @ down.
    `unet_config`: the diffusers UNet config that SGM block numbers refer to (default: SDXL base).
    Returns that dict and the file's metadata."""
    entries, metadata = _parse(path, unet_config or SDXL_CONFIG.to_diffusers())
    return {m: (e["down"], e["up"], e["alpha"]) for m, e in entries.items()}, metadata


@torch.no_grad()
def load_lora(unet: nn.Module, path, scale: float = 1.0) -> dict[str, str]:
    """Merge `scale * alpha / rank * up @ down` from a LoRA file into the UNet's Linear weights.

    Accepts kohya (SGM or diffusers-style names) and diffusers/peft files, and training checkpoint
    folders (see `lora_file_of`). Wrapped layers (LoRALinear) take the update in their frozen base.
    Every key is checked before any weight changes; loading two files adds both. Returns the file's metadata."""
    entries, metadata = _parse(path, unet.config.to_diffusers())
    modules = dict(unet.named_modules())
    plan = []
    for name, e in entries.items():
        key, module = e["key"], modules.get(name)
        if module is None:
            raise ValueError(f"{path}: key {key} names module {name}, which this UNet does not have; the LoRA "
                             "was made for another base model or UNet config")
        linear = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{path}: key {key} adapts {name}, a {type(linear).__name__}; only LoRAs on Linear "
                             "layers are supported (conv LoRAs such as LoCon are not)")
        down, up = e["down"], e["up"]
        want_down, want_up = (down.shape[0], linear.in_features), (linear.out_features, down.shape[0])
        if down.ndim != 2 or up.ndim != 2 or tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ValueError(f"{path}: key {key} has shapes down {tuple(down.shape)}, up {tuple(up.shape)} but "
                             f"{name} is Linear({linear.in_features}, {linear.out_features}); the LoRA was made "
                             "for another base model (e.g. SD 1.5) or UNet config")
        plan.append((linear.weight, down, up, scale * e["alpha"] / down.shape[0]))
    for weight, down, up, s in plan:
        delta = s * (up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32))
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return metadata
