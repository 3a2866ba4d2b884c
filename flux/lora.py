"""LoRA on the FLUX.1 transformer: where it goes (the family's `lora_targets`), what its layers are called in LoRA
files (`lora_names`), and FLUX's `save_lora` / `load_lora`.

Target modes (`--lora_target_mode`), Linear layers of the double- and single-stream blocks:
  attention  double blocks' attn to_q/to_k/to_v/to_out.0 and add_q/k/v_proj/to_add_out, single blocks' attn
             to_q/to_k/to_v (the attention of both streams; diffusers' FLUX LoRA example without the MLPs)
  all        every Linear of the blocks but the modulations: + ff, ff_context, proj_mlp, proj_out (kohya's default,
             which leaves the modulations out since sd-scripts 0.8.8)
  all_plus   all + the blocks' modulation linears (norm1.linear, norm1_context.linear, norm.linear) and the input
             layers (x_embedder, context_embedder, time_text_embed's linears), as kohya's and ai-toolkit's options
FLUX.1 has no convolutions, so no LoCon (`--conv_rank` must be 0).

kohya names are Black Forest Labs' module paths (flux/bfl.py `module_names`) with `.` -> `_` under `lora_unet_`,
what kohya's sd-scripts, ComfyUI, Forge and diffusers' FLUX loader read. BFL fuses layers diffusers keeps apart:
a double block's q, k, v per stream in `img_attn.qkv` / `txt_attn.qkv`, a single block's q, k, v and MLP input in
`linear1` ([q; k; v; mlp] rows); LoRANames.kohya gives each of our layers its rows there (lora/files.py fuses and
splits). The final adaLN (`final_layer.adaLN_modulation.1`) is stored with its halves swapped, which one row range
cannot express: it has no kohya name (its LoRAs are read and written in diffusers format). diffusers/peft names are
`transformer.<diffusers module path>`; `lora_transformer_<path with _>` (a kohya-style spelling of diffusers names
some tools write) is read too.
"""

import functools
import json
from pathlib import Path

import torch
from torch import nn

from flux.bfl import FINAL, module_names
from flux.configs import FLUX_DEV, FLUX_SCHNELL, config_from_diffusers
from flux.tiny import TINY_TRANSFORMER_CONFIG
from flux.transformer import DoubleStreamBlock, FluxConfig, FluxTransformer, SingleStreamBlock
from lora import files, reading
from lora.files import LoRANames, adaptable_layers
from lora.layer import LoRAConfig

MODES = ("attention", "all", "all_plus")
ATTENTION = {  # Linear layers by name relative to their block
    DoubleStreamBlock: ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    SingleStreamBlock: ("attn.to_q", "attn.to_k", "attn.to_v"),
}  # fmt: skip
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")
INPUTS = ("x_embedder", "context_embedder", "time_text_embed.")  # the last: its timestep/text/guidance MLPs


def lora_target_names(model: nn.Module, mode: str) -> list[str]:
    """Module paths (diffusers names) of the Linear layers `mode` adapts, in module order."""
    if mode not in MODES:
        raise ValueError(f"LoRA target mode {mode!r} is not one of FLUX.1's {', '.join(MODES)}")
    names = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if path.startswith(INPUTS):
            if mode == "all_plus":
                names.append(path)
            continue
        block_path = ".".join(path.split(".")[:2])  # transformer_blocks.N / single_transformer_blocks.N
        block = model.get_submodule(block_path) if path.startswith(("transformer_blocks.",
                                                                     "single_transformer_blocks.")) else None
        if not isinstance(block, (DoubleStreamBlock, SingleStreamBlock)):
            continue  # norm_out, proj_out: the final layer
        local = path[len(block_path) + 1 :]
        if mode == "attention":
            keep = local in ATTENTION[type(block)]
        else:
            keep = mode == "all_plus" or local not in MODULATION
        if keep:
            names.append(path)
    return names


def lora_targets(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, alpha) of every layer a LoRA of `config` adapts."""
    if config.conv_rank:
        raise ValueError(f"--conv_rank {config.conv_rank}: FLUX.1 has no convolutions to put LoCon on; leave it 0")
    return {name: (config.rank, config.alpha) for name in lora_target_names(model, config.target_mode)}


# ---------------------------------------------------------------------------------------------------
# Names in LoRA files

PEFT_PREFIX = "transformer"
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
BASES = ("flux-dev", "flux-schnell", "tiny-flux")  # the base models a LoRA file is tried against when none is named
CONFIGS = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "tiny-flux": TINY_TRANSFORMER_CONFIG}


def kohya_metadata(config: FluxConfig) -> dict[str, str]:
    """What kohya's sd-scripts writes for a FLUX.1 LoRA (library/flux_utils.py MODEL_VERSION_FLUX_V1,
    sai_model_spec.py ARCH_FLUX_1_DEV / _SCHNELL, IMPL_FLUX); guidance embedding = dev."""
    name = "dev" if config.guidance_embeds else "schnell"
    return {"ss_base_model_version": "flux1", "modelspec.architecture": f"flux-1-{name}/lora",
            "modelspec.implementation": IMPLEMENTATION}


def kohya_names(config: FluxConfig, layers: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int, int]]:
    """Our module path -> (kohya name, first row, rows) in BFL's (possibly fused) layer, every Linear of ours that
    has one (all but norm_out.linear, whose BFL layer has its halves swapped)."""
    kohya = {}
    for bfl, targets in module_names(config.num_layers, config.num_single_layers, config.guidance_embeds).items():
        if bfl == FINAL or targets[0] not in layers:  # the swapped final adaLN; RMSNorms (no Linear)
            continue
        row = 0
        for target in targets:
            rows = layers[target][0]
            kohya[target] = ("lora_unet_" + bfl.replace(".", "_"), row, rows)
            row += rows
    return kohya


@functools.cache
def names_for(config: FluxConfig, base: str) -> LoRANames:
    """The LoRA file names of a FLUX-shaped transformer (built on the meta device: no memory, ~0.1 s for
    FLUX.1's 12 B parameters): diffusers module paths and shapes, kohya's BFL names, the target modes."""
    with torch.device("meta"):
        model = FluxTransformer(config)
    layers = adaptable_layers(model)
    aliases = {"lora_transformer_" + name.replace(".", "_"): name for name in layers}
    targets = {mode: frozenset(lora_target_names(model, mode)) for mode in MODES}
    return LoRANames("flux", base, layers, kohya_names(config, layers), targets, PEFT_PREFIX,
                     kohya_metadata(config), aliases)


def lora_names(base: str = "flux-dev") -> LoRANames:
    """The LoRA names of a base model: `flux-dev`, `flux-schnell`, `tiny-flux`, a diffusers FLUX.1 folder (its
    transformer/config.json) or a single file (its shapes); anything else (e.g. a folder no longer there) is
    FLUX.1-dev."""
    name = str(base)
    if name in CONFIGS:
        return names_for(CONFIGS[name], name)
    path = Path(name).expanduser()
    config = path / "transformer" / "config.json"
    if config.is_file():
        try:
            return names_for(config_from_diffusers(json.loads(config.read_text())), name)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if path.is_file():
        from flux.loading import single_file_config, single_file_index

        try:
            keys, shapes = single_file_index(path)
            return names_for(single_file_config(path, keys, shapes), name)
        except (ValueError, KeyError):
            pass
    return names_for(FLUX_DEV, "flux-dev")


def save_lora(transformer: nn.Module, path, config: LoRAConfig, format: str = "kohya", metadata: dict | None = None,
              dtype=torch.float32, text_encoder: nn.Module | None = None):
    """Write a FLUX transformer's LoRA (and its CLIP-L's) to a LoRA file: lora/files.py `save_lora`."""
    names = names_for(transformer.config, "transformer")
    return files.save_lora(transformer, path, config, names, format, metadata, dtype, text_encoder)


def load_lora(transformer: nn.Module, path, scale: float = 1.0, text_encoder: nn.Module | None = None) -> dict:
    """Merge a LoRA file of any supported format into a FLUX transformer (and CLIP-L): lora/reading.py."""
    return reading.load_lora(transformer, path, names_for(transformer.config, "transformer"), scale, text_encoder)
