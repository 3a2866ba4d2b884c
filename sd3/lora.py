"""LoRA on the SD 3.5 MMDiT: where it goes (the family's `lora_targets`) and what its layers are called in LoRA
files (`lora_names`), for SD3 Medium, SD 3.5 Medium (MMDiT-X), SD 3.5 Large and the tiny model.

Target modes (`--lora_target_mode`), Linear layers of each joint block (diffusers names, relative to
`transformer_blocks.N`):
  attention      the joint attention of both streams: attn.to_q/k/v, attn.to_out.0, attn.add_q/k/v_proj,
                 attn.to_add_out, and MMDiT-X's image self-attention attn2.to_q/k/v, attn2.to_out.0 (diffusers' SD3
                 LoRA example and SimpleTuner target these names; the default)
  attention_mlp  + both streams' feed-forwards ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2
  all            + the adaLN modulations norm1.linear, norm1_context.linear: every Linear of the joint blocks,
                 kohya's SD3 default (its x/context attn, mlp and mod dims)
The embedders and the final layer outside the blocks are never targeted (kohya's `emb_dims`, off by default), but
files with them are read. The pre-only last block's text queries (attn.add_q_proj) are targeted, as by diffusers
and kohya, though its text output is dropped, so their LoRA gets no gradient: leaving them out would leave rows of
SAI's fused qkv without a DoRA magnitude, which a kohya file cannot express.

kohya names are SAI's (sd3/sai.py), as kohya's sd-scripts write SD3 LoRAs and ComfyUI reads them:
`lora_unet_` + the SAI module path with `.` -> `_`, e.g. `lora_unet_joint_blocks_0_x_block_attn_qkv` (our to_q,
to_k, to_v fused: lora/files.py), `..._context_block_attn_proj`, `..._x_block_mlp_fc1`,
`..._x_block_adaLN_modulation_1`; the last block's `context_block_adaLN_modulation_1` and the final layer's hold
(shift, scale) where diffusers' layers hold (scale, shift) (`kohya_swapped`). Files with kohya-style diffusers
names (`lora_unet_transformer_blocks_0_attn_to_q`) are read too. diffusers/peft names are `transformer.<diffusers
module path>` (diffusers' `StableDiffusion3Pipeline.load_lora_weights`, SimpleTuner, ai-toolkit).
"""

import functools
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lora.files import LoRANames, adaptable_layers
from sd3 import sai
from sd3.configs import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, config_from_diffusers, config_from_sai
from sd3.mmdit import MMDiTConfig, SD3Transformer
from sd3.tiny import TINY_MMDIT_CONFIG

MODES = ("attention", "attention_mlp", "all")
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
TARGETS = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP}  # "all": every Linear of the block


def lora_target_names(model: nn.Module, mode: str) -> list[str]:
    """Module paths (diffusers names) of the Linear layers `mode` adapts, in module order."""
    if mode not in MODES:
        raise ValueError(f"LoRA target mode {mode!r} is not one of SD 3.5's {', '.join(MODES)}")
    return [f"transformer_blocks.{i}.{name}" for i, block in enumerate(model.transformer_blocks)
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and (mode == "all" or name in TARGETS[mode])]


def lora_targets(model: nn.Module, config) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, alpha) of every layer a LoRA of `config` (lora/layer.py `LoRAConfig`) adapts."""
    if config.conv_rank:
        raise ValueError("--conv_rank (LoCon) is for SDXL's 3x3 convs; SD 3.5's MMDiT has none: leave it out")
    return {name: (config.rank, config.alpha) for name in lora_target_names(model, config.target_mode)}


# ---------------------------------------------------------------------------------------------------
# Names in LoRA files

# modelspec.architecture, as the model spec's readers (SwarmUI) name SD3 classes
ARCHITECTURES = {"sd3-medium": "stable-diffusion-v3-medium/lora", "sd3.5-medium": "stable-diffusion-v3.5-medium/lora",
                 "sd3.5-large": "stable-diffusion-v3.5-large/lora"}
# ss_base_model_version, as kohya's sd3_train_network.py writes it (its MMDiT's model_type, sd3_utils.py)
KOHYA_VERSIONS = {"sd3-medium": "medium", "sd3.5-medium": "5-medium", "sd3.5-large": "5-large"}
BASES = ("sd3.5-medium", "sd3.5-large", "sd3-medium", "tiny-sd3")  # tried in this order when no base is named
CONFIGS = {"sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE, "sd3-medium": SD3_MEDIUM,
           "tiny-sd3": TINY_MMDIT_CONFIG}


def architecture(config: MMDiTConfig) -> str:
    """The released model a config is shaped like: MMDiT-X is SD 3.5 Medium, qk-norm alone SD 3.5 Large."""
    if config.dual_attention_layers:
        return "sd3.5-medium"
    return "sd3.5-large" if config.qk_norm else "sd3-medium"


def kohya_metadata(config: MMDiTConfig) -> dict[str, str]:
    arch = architecture(config)
    return {"ss_base_model_version": KOHYA_VERSIONS[arch], "modelspec.architecture": ARCHITECTURES[arch],
            "modelspec.implementation": "https://github.com/Stability-AI/sd3.5"}


def kohya_names(config: MMDiTConfig, layers) -> tuple[dict[str, tuple[str, int, int]], frozenset[str]]:
    """(module path -> (kohya name, first row, rows), the module paths whose SAI layer swaps our row halves), for
    every Linear and Conv2d of the transformer, from sd3/sai.py's map."""
    fused = {name: (sai_name, i) for sai_name, names in sai.FUSED.items() for i, name in enumerate(names)}
    kohya, swapped = {}, set()
    for path, shape in layers.items():
        rows = shape[0]
        if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path):
            block, local = m.groups()
            if local in fused:  # q, k, v: rows i * width of SAI's qkv
                sai_name, i = fused[local]
                kohya[path] = (f"lora_unet_joint_blocks_{block}_{sai_name.replace('.', '_')}", i * rows, rows)
                continue
            sai_name = f"joint_blocks.{block}.{sai.BLOCK[local]}"
            if local == "norm1_context.linear" and int(block) == config.num_layers - 1:
                swapped.add(path)
        else:
            sai_name = sai.TOP[path]
            if path == "norm_out.linear":
                swapped.add(path)
        kohya[path] = ("lora_unet_" + sai_name.replace(".", "_"), 0, rows)
    return kohya, frozenset(swapped)


@functools.cache
def names_for(config: MMDiTConfig, base: str) -> LoRANames:
    """The LoRA file names of an SD3-family transformer of this config (built on the meta device, no weights)."""
    with torch.device("meta"):
        model = SD3Transformer(config)
    layers = adaptable_layers(model)
    kohya, swapped = kohya_names(config, layers)
    aliases = {"lora_unet_" + name.replace(".", "_"): name for name in layers}  # kohya-style diffusers names
    targets = {mode: frozenset(lora_target_names(model, mode)) for mode in MODES}
    return LoRANames("sd3", base, layers, kohya, targets, "transformer", kohya_metadata(config), aliases, swapped)


def config_of(base: str) -> MMDiTConfig:
    """The transformer config of a base: a released model's name (`BASES`), a diffusers SD3 folder (its
    transformer/config.json), an SAI single file (its tensor shapes, read from the header only); a path no longer
    there is SD 3.5 Large if its name says `large`, else SD 3.5 Medium."""
    name = str(base)
    if name in CONFIGS:
        return CONFIGS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        try:
            return config_from_diffusers(json.loads((folder / "config.json").read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{folder / 'config.json'}: {e}; give an SD3 model folder or one of "
                             f"{', '.join(BASES)}") from e
    if path.is_file():
        prefix = sai.PREFIXES["transformer"]
        with safe_open(str(path), framework="pt") as f:  # shapes only: meta tensors
            shapes = {k[len(prefix):]: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()
                      if k.startswith(prefix)}
        return config_from_sai(shapes)
    return SD35_LARGE if "large" in path.name.lower() else SD35_MEDIUM


def lora_names(base: str = "sd3.5-medium") -> LoRANames:
    """The LoRA names of a base model (see `config_of`), cached per config."""
    return names_for(config_of(base), str(base))
