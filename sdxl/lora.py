"""LoRA on the SDXL UNet: where it goes (the family's `lora_targets`), as kohya's and diffusers' SDXL trainers put
it, what its layers are called in LoRA files (`lora_names`), and SDXL's `save_lora` / `load_lora`.

Target modes (`--lora_target_mode`), Linear layers inside each Transformer2DModel:
  attention      attn1/attn2 to_q, to_k, to_v
  attention_out  + to_out.0
  all            every Linear of the transformer blocks: proj_in/out, attention, feed-forward (kohya's default)
LoCon (`--conv_rank`) adds the 3x3 convs: every ResNet's conv1/conv2 and the down/upsampler convs (kohya's
conv_dim set).

kohya names are `lora_unet_` + the SGM module path (sdxl/sgm.py) with `.` -> `_`; diffusers/peft names are
`unet.<diffusers module path>`.
"""

import functools
import re
from pathlib import Path

import torch
from torch import nn

from lora import files, reading
from lora.files import LoRANames, adaptable_layers
from lora.layer import LoRAConfig, LoRALayer, add_lora
from sdxl.configs import unet_config_from_diffusers, unet_config_to_diffusers
from sdxl.loading import read_unet_config, unet_folder
from sdxl.sgm import unet_sgm_names
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet, Transformer2DModel, UNetConfig

MODES = ("attention", "attention_out", "all")
TARGETS = {  # Linear layers inside each Transformer2DModel, by name relative to it ("all" takes every one)
    "attention": tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v")),
    "attention_out": tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
}
CONV_TARGETS = re.compile(r".*\.(resnets\.\d+\.conv[12]|downsamplers\.0\.conv|upsamplers\.0\.conv)")  # kohya's 3x3 set


def lora_target_names(unet: nn.Module, mode: str) -> list[str]:
    """Module paths (diffusers names) of the Linear layers `mode` adapts, in module order."""
    if mode not in MODES:
        raise ValueError(f"LoRA target mode {mode!r} is not one of SDXL's {', '.join(MODES)}")
    names = []
    for prefix, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear) and (mode == "all" or name.endswith(TARGETS[mode])):
                    names.append(f"{prefix}.{name}")
    return names


def conv_target_names(unet: nn.Module) -> list[str]:
    """Module paths of the 3x3 convs LoCon adapts: every ResNet's conv1/conv2 and the down/upsampler convs."""
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d) and CONV_TARGETS.fullmatch(n)]


def lora_targets(unet: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, alpha) of every layer a LoRA of `config` adapts (LoCon's convs their own)."""
    targets = {name: (config.rank, config.alpha) for name in lora_target_names(unet, config.target_mode)}
    if config.conv_rank:
        targets |= {name: (config.conv_rank, config.conv_alpha or config.conv_rank) for name in conv_target_names(unet)}
    return targets


def apply_lora(unet: nn.Module, config: LoRAConfig) -> dict[str, LoRALayer]:
    """Freeze the UNet and wrap every layer `config` targets in a LoRALayer; only LoRA params train."""
    return add_lora(unet, lora_targets(unet, config), config.dropout, config.use_dora)


# ---------------------------------------------------------------------------------------------------
# Names in LoRA files


KOHYA_METADATA = {"ss_base_model_version": "sdxl_base_v1-0",
                  "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                  "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}
BASES = ("sdxl", "tiny")  # the base models a LoRA file is tried against when none is named


@functools.cache
def names_for(config: UNetConfig, base: str) -> LoRANames:
    """The LoRA file names of an SDXL-shaped UNet: diffusers module paths, their shapes, kohya's `lora_unet_<SGM
    module path>` (and the diffusers-style kohya names some tools write, read only), the target modes."""
    with torch.device("meta"):
        unet = SDXLUNet(config)
    layers = adaptable_layers(unet)
    sgm = unet_sgm_names(unet_config_to_diffusers(config))
    kohya = {name: ("lora_unet_" + sgm[name].replace(".", "_"), 0, shape[0]) for name, shape in layers.items()
             if name in sgm}
    aliases = {"lora_unet_" + name.replace(".", "_"): name for name in kohya}
    targets = {mode: frozenset(lora_target_names(unet, mode)) for mode in MODES}
    return LoRANames("sdxl", base, layers, kohya, targets, "unet", KOHYA_METADATA, aliases)


def lora_names(base: str = "sdxl") -> LoRANames:
    """The LoRA names of a base model: `sdxl` (SDXL base), `tiny` / `tiny-sdxl`, a diffusers SDXL folder (its
    unet/config.json); a single-file checkpoint, or a folder no longer there, is SDXL base."""
    name = str(base)
    if name in ("tiny", "tiny-sdxl"):
        return names_for(TINY_UNET_CONFIG, "tiny")
    path = Path(name).expanduser()
    if name != "sdxl" and path.is_dir():
        return names_for(read_unet_config(unet_folder(path)), name)
    return names_for(SDXL_CONFIG, "sdxl")


def save_lora(unet: nn.Module, path, config: LoRAConfig, format: str = "kohya", metadata: dict | None = None,
              dtype=torch.float32, text_encoder: nn.Module | None = None):
    """Write an SDXL UNet's LoRA (and its text encoders') to a LoRA file: lora/files.py `save_lora`."""
    return files.save_lora(unet, path, config, names_for(unet.config, "unet"), format, metadata, dtype, text_encoder)


def load_lora(unet: nn.Module, path, scale: float = 1.0, text_encoder: nn.Module | None = None) -> dict[str, str]:
    """Merge a LoRA file of any supported format into an SDXL UNet (and its text encoders): lora/reading.py."""
    return reading.load_lora(unet, path, names_for(unet.config, "unet"), scale, text_encoder)


def read_lora_file(path, base: str | dict = "sdxl"):
    """A LoRA file's (module path -> (down, up, alpha), metadata), read against an SDXL base (a base name or a
    diffusers UNet config dict): lora/reading.py."""
    names = names_for(unet_config_from_diffusers(base), "unet") if isinstance(base, dict) else lora_names(base)
    return reading.read_lora_file(path, names)
