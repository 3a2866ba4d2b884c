"""LoRA: the trainable wrapper of a frozen layer, putting it into a model, its state dict, and merging it.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a layer W and learns a low-rank update: y = W x + (alpha / rank) * up(down(x)), with `down`
initialised like peft's lora_A (kaiming-uniform, a = sqrt(5)) and `up` zero, so training starts from the
base model exactly. On a Linear layer down is [rank, in] and up [out, rank]; on a Conv2d (LoCon, as kohya's
`conv_dim`) down is a conv with the base's kernel, stride and padding [rank, in, k, k] and up a 1x1 conv
[out, rank, 1, 1], so up(down(x)) is the conv of x by the rank-`rank` kernel up @ down.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) also trains a
magnitude m (one number per output channel, initialised to the row norms of W):
    W' = m * (W + s dW) / ||W + s dW||,   s = alpha / rank, norms per output row, detached (section 4.3),
computed in the forward as peft's DoraLinearLayer does: y = (m/n - 1) W x + m/n (W x + s up(down(x))) + b.
Which layers of a model get one is its family's business (`lora_targets`: sdxl/lora_targets.py, ...); the files
a LoRA is saved to and read from (kohya and diffusers/peft formats) are lora/files.py and lora/reading.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora.base_weights import StoredLinear


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_mode: str = "attention"  # which layers: one of the family's modes (e.g. SDXL's attention_out, all)
    conv_rank: int = 0  # LoCon on the ResNet and down/upsampler 3x3 convs (SDXL); 0 = none
    conv_alpha: float = 0.0  # 0 = conv_rank
    use_dora: bool = False

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.conv_rank < 0 or self.conv_alpha < 0:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1, conv_rank >= 0, conv_alpha >= 0; "
                             f"got {self}")


class LoRALayer(nn.Module):
    """A frozen `nn.Linear` or `nn.Conv2d` (`base`) plus a trainable fp32 low-rank update (and DoRA magnitude)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0,
                 dora: bool = False, device=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        device = base.weight.device if device is None else torch.device(device)  # the LoRA's; default: the base's
        kw = dict(bias=False, dtype=torch.float32, device=device)  # fp32 even for a bf16 or fp8 base
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, **kw)  # (rank, in, k, k)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, **kw)  # (out, rank, 1, 1)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, **kw)  # (rank, in)
            self.lora_up = nn.Linear(rank, base.out_features, **kw)  # (out, rank)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as peft's lora_A
        nn.init.zeros_(self.lora_up.weight)
        # DoRA's magnitude: the row norms of W at the start (up = 0), so training starts from the base model
        # (of the weight as the layer computes with it: an fp8 base's cast-up weight)
        self.magnitude = nn.Parameter(self.row_norm(base.weight.float()).to(device)) if dora else None  # (out,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha = rank, float(alpha)
        self.scale = 1.0  # inference strength, multiplies alpha / rank
        self.merged = None  # while merged: (scale, DoRA norm or None) merged into base.weight

    @staticmethod
    def row_norm(w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(w.flatten(1), dim=1)  # (out,)

    def delta_weight(self) -> torch.Tensor:
        """scale * alpha / rank * up @ down, fp32, shaped like base.weight."""
        up, down = self.lora_up.weight, self.lora_down.weight  # base.weight: (out, in, *kernel) = up's out, down's rest
        return (self.scale * self.alpha / self.rank) * (up.flatten(1) @ down.flatten(1)).view(up.shape[0],
                                                                                               *down.shape[1:])

    def dora_gain(self) -> torch.Tensor:
        """m / ||W + s dW|| per output channel (the norm detached), shaped to broadcast over the output."""
        norm = self.row_norm(self.base.weight.float() + self.delta_weight().detach()).detach()
        gain = self.magnitude / norm
        return gain.view(-1, 1, 1) if isinstance(self.base, nn.Conv2d) else gain

    def forward(self, x):
        y = self.base(x)
        if self.merged is not None:
            return y
        # Under autocast the branch runs in the autocast dtype (autocast casts the fp32 LoRA weights for the
        # matmuls, gradients land in fp32); without it, in fp32.
        h = self.dropout(x if torch.is_autocast_enabled(x.device.type) else x.float())
        s = self.scale * self.alpha / self.rank
        if self.magnitude is None:
            return torch.add(y, self.lora_up(self.lora_down(h)), alpha=s).to(y.dtype)
        # DoRA: y + (g - 1) W x + g s up(down(x)), W x without bias (recomputed on the dropped-out x in training)
        g = self.dora_gain()
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base.bias
            wx = y if bias is None else y - (bias.view(-1, 1, 1) if isinstance(self.base, nn.Conv2d) else bias)
        else:
            wx = self.base_without_bias(h)
        return (y + (g - 1) * wx + g * (s * self.lora_up(self.lora_down(h)))).to(y.dtype)

    def base_without_bias(self, x):
        if isinstance(self.base, StoredLinear):  # its own matmul: keeps no cast-up weight for the backward
            return self.base(x, bias=False)
        w = self.base.weight.to(x.dtype)
        return self.base._conv_forward(x, w, None) if isinstance(self.base, nn.Conv2d) else F.linear(x, w)

    @torch.no_grad()
    def merge(self) -> None:
        """Put the update into base.weight (in fp32, cast back); forward then skips the branch."""
        if isinstance(self.base, StoredLinear):
            raise ValueError(f"cannot merge a LoRA into a base stored as {self.base.weight_stored.dtype} "
                             "(--base_dtype); load the base in bf16 or fp32 to merge, or keep the LoRA unmerged")
        if self.merged is None:
            w = self.base.weight
            merged = w.float() + self.delta_weight()
            norm = self.row_norm(merged) if self.magnitude is not None else None
            if norm is not None:
                merged *= (self.magnitude / norm).view(-1, *[1] * (w.ndim - 1))
            w.copy_(merged.to(w.dtype))
            self.merged = (self.scale, norm)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo what `merge` did (exact up to one rounding of base.weight's dtype)."""
        if self.merged is not None:
            scale, (self.scale, norm) = self.scale, self.merged
            w = self.base.weight
            merged = w.float()
            if norm is not None:
                merged *= (norm / self.magnitude).view(-1, *[1] * (w.ndim - 1))
            w.copy_((merged - self.delta_weight()).to(w.dtype))
            self.scale, self.merged = scale, None

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, dora={self.magnitude is not None}, scale={self.scale}, "
                f"merged={self.merged is not None}")


# ---------------------------------------------------------------------------------------------------
# Putting LoRA into a model, and its state dict (training checkpoints use these keys).


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def add_lora(model: nn.Module, targets: dict[str, tuple[int, float]], dropout: float = 0.0,
             dora: bool = False, device=None) -> dict[str, LoRALayer]:
    """Freeze the model and wrap each target layer (module path -> (rank, alpha)) in a LoRALayer; only LoRA params
    train. The targets come from the model's family (`lora_targets`). `device`: where the LoRA is made (default:
    on its layer's device; a base to be sharded across GPUs is still on the CPU, its LoRA already on the GPU)."""
    if lora_modules(model):
        raise ValueError("this model already has LoRA layers; build a fresh one to apply another LoRA")
    model.requires_grad_(False)
    wrapped = {}
    for name, (rank, alpha) in targets.items():
        parent_name, _, child = name.rpartition(".")
        wrapped[name] = LoRALayer(model.get_submodule(name), rank, alpha, dropout, dora, device)
        setattr(model.get_submodule(parent_name), child, wrapped[name])
    return wrapped


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_down.weight, m.lora_up.weight, m.magnitude)
            if p is not None]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<diffusers module path>.lora_down.weight` / `.lora_up.weight` (/ `.magnitude`, DoRA) -> fp32 tensors
    (detached)."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_down.weight"] = m.lora_down.weight.detach()
        sd[f"{name}.lora_up.weight"] = m.lora_up.weight.detach()
        if m.magnitude is not None:
            sd[f"{name}.magnitude"] = m.magnitude.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state_dict` into the model's LoRA layers; keys and shapes must match exactly."""
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [k for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or shapes:
        first = (missing + unexpected + shapes)[0]
        raise ValueError(f"LoRA state dict does not match this model's LoRA layers: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped keys (first: {first}); "
                         "was it saved with another rank, conv_rank, use_dora or target_mode?")
    merged = [name for name, m in lora_modules(model).items() if m.merged is not None]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]} is merged; call unmerge() before loading LoRA weights")
    params = {k: v for k, v in zip(lora_state_dict(model), lora_parameters(model), strict=True)}
    for key, p in params.items():
        p.copy_(sd[key])
