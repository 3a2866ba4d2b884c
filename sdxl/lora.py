"""LoRA for the SDXL UNet: the trainable wrapper, where it goes, its state dict, and merging it.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a Linear layer W and learns a low-rank update: y = W x + (alpha / rank) * up(down(x)),
with `down` [rank, in] initialised like peft's lora_A (kaiming-uniform, a = sqrt(5)) and `up`
[out, rank] zero, so training starts from the base model exactly. The files a LoRA is saved to and
read from (kohya and diffusers/peft formats) are sdxl/lora_files.py.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sdxl.unet import Transformer2DModel

TargetMode = Literal["attention", "attention_out", "all"]
TARGETS = {  # Linear layers inside each Transformer2DModel, by name relative to it ("all" takes every one)
    "attention": tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v")),
    "attention_out": tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
}
MODES = ("attention", "attention_out", "all")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_mode: TargetMode = "attention"

    def __post_init__(self):
        if self.target_mode not in MODES:
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
