"""Key maps between single-file SDXL checkpoints (SGM / "LDM" names) and diffusers / transformers names.

A single-file SDXL checkpoint (`sd_xl_base_1.0.safetensors`, CivitAI models) is the state dict of
Stability's `DiffusionEngine` (github.com/Stability-AI/generative-models, `sgm/`):

    model.diffusion_model.*              UNetModel     (sgm/modules/diffusionmodules/openaimodel.py)
    first_stage_model.*                  AutoencoderKL (sgm/modules/diffusionmodules/model.py, LDM names)
    conditioner.embedders.0.transformer.*  FrozenCLIPEmbedder: a transformers CLIPTextModel (CLIP ViT-L)
    conditioner.embedders.1.model.*      FrozenOpenCLIPEmbedder2: the open_clip text tower (ViT-bigG)

The other side is diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers'
`CLIPTextModel` / `CLIPTextModelWithProjection`. The UNet and VAE maps are built per module from
the diffusers config (`unet_sgm_names`, `vae_sgm_names`: diffusers module path -> SGM module path)
and every state-dict conversion is a rename through them, so a LoRA writer can use the same map
(kohya names are `lora_unet_` + SGM module path with `.` -> `_`). Conversions never copy tensors
except where the layout differs (VAE attention 1x1 convs, OpenCLIP fused qkv, text projection).
"""

import functools
import re

import torch
from torch import Tensor

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

# Leaf modules inside one block: diffusers name -> SGM name.
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
TRANSFORMER_BLOCK = ("norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "norm2", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                     "norm3", "ff.net.0.proj", "ff.net.2")  # same names on both sides
OPENCLIP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "text_projection.weight": "text_projection"}  # [proj, C] in HF, [C, proj] in OpenCLIP
OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # inside encoder.layers.N / resblocks.N
UNET_BLOCKS = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}


def _add(names: dict, diffusers: str, sgm: str, table: dict, shortcut: bool = True) -> None:
    for d, s in table.items():
        if shortcut or d != "conv_shortcut":  # the 1x1 shortcut exists only when channels change
            names[f"{diffusers}.{d}"] = f"{sgm}.{s}"


def _transformer(names: dict, diffusers: str, sgm: str, depth: int) -> None:
    for name in ("norm", "proj_in", "proj_out"):
        names[f"{diffusers}.{name}"] = f"{sgm}.{name}"
    for k in range(depth):
        for name in TRANSFORMER_BLOCK:
            names[f"{diffusers}.transformer_blocks.{k}.{name}"] = f"{sgm}.transformer_blocks.{k}.{name}"


def _per(value, n: int) -> list:
    """diffusers lets a per-level (or per-layer) setting be one int or a sequence."""
    return [value] * n if isinstance(value, int) else list(value)


def unet_sgm_names(config: dict) -> dict[str, str]:
    """Every UNet module holding parameters: diffusers path -> SGM path, in SGM's reading order.

    SGM numbers blocks flatly: `input_blocks.0` is conv_in, then per level `layers` blocks
    (`.0` resnet, `.1` transformer) and a downsampler block (`.0.op`) except after the last
    level; `middle_block.0/1/2` = resnet, transformer, resnet; `output_blocks` run `layers + 1`
    per level with the upsampler after the transformer (`.1.conv` or `.2.conv`).
    """
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if not set(down + up) <= UNET_BLOCKS or mid != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet config {down}, {mid}, {up} is not SDXL-shaped: blocks must be among "
                         f"{sorted(UNET_BLOCKS)} with a UNetMidBlock2DCrossAttn")
    widths = list(config["block_out_channels"])
    n = len(widths)
    layers = _per(config["layers_per_block"], n)
    depths = _per(config.get("transformer_layers_per_block", 1), n)
    up_depths = config.get("reverse_transformer_layers_per_block") or depths[::-1]

    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    if config.get("addition_embed_type") == "text_time":
        names |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    names["conv_in"] = "input_blocks.0.0"
    i = 1
    for level, width in enumerate(widths):
        c_in = widths[max(level - 1, 0)]
        for j in range(layers[level]):
            _add(names, f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET,
                 shortcut=(c_in if j == 0 else width) != width)
            if "CrossAttn" in down[level]:
                _transformer(names, f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1",
                             _per(depths[level], layers[level])[j])
            i += 1
        if level < n - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1

    _add(names, "mid_block.resnets.0", "middle_block.0", UNET_RESNET, shortcut=False)
    _transformer(names, "mid_block.attentions.0", "middle_block.1", _per(depths[-1], 1)[0])
    _add(names, "mid_block.resnets.1", "middle_block.2", UNET_RESNET, shortcut=False)

    rwidths, rlayers = widths[::-1], layers[::-1]
    i = 0
    for level, width in enumerate(rwidths):
        count = rlayers[level] + 1
        prev, skip_in = rwidths[max(level - 1, 0)], rwidths[min(level + 1, n - 1)]
        for j in range(count):  # input = previous output ++ skip from the down path
            c_in = (prev if j == 0 else width) + (skip_in if j == count - 1 else width)
            _add(names, f"up_blocks.{level}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET,
                 shortcut=c_in != width)
            attn = "CrossAttn" in up[level]
            if attn:
                _transformer(names, f"up_blocks.{level}.attentions.{j}", f"output_blocks.{i}.1",
                             _per(up_depths[level], count)[j])
            if j == count - 1 and level < n - 1:
                names[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attn else 1}.conv"
            i += 1
    names |= {"conv_norm_out": "out.0", "conv_out": "out.2"}
    return names


def vae_sgm_names(config: dict) -> dict[str, str]:
    """Every AutoencoderKL module holding parameters: diffusers path -> LDM path.

    LDM's `decoder.up.N` is indexed by resolution level (N = 0 is the last one run), diffusers'
    `decoder.up_blocks.i` by execution order, so i = levels - 1 - N.
    """
    widths = list(config["block_out_channels"])
    n, layers = len(widths), config["layers_per_block"]
    names = {}
    for part in ("encoder", "decoder"):
        names |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_norm_out": f"{part}.norm_out",
                  f"{part}.conv_out": f"{part}.conv_out"}
        _add(names, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET, shortcut=False)
        if config.get("mid_block_add_attention", True):
            _add(names, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)
        _add(names, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET, shortcut=False)
    for level, width in enumerate(widths):
        c_in = widths[max(level - 1, 0)]
        for j in range(layers):
            _add(names, f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}",
                 VAE_RESNET, shortcut=(c_in if j == 0 else width) != width)
        if level < n - 1:
            names[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
                f"encoder.down.{level}.downsample.conv")
    rwidths = widths[::-1]
    for level, width in enumerate(rwidths):
        c_in, ldm = rwidths[max(level - 1, 0)], n - 1 - level
        for j in range(layers + 1):
            _add(names, f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{ldm}.block.{j}",
                 VAE_RESNET, shortcut=(c_in if j == 0 else width) != width)
        if level < n - 1:
            names[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{ldm}.upsample.conv"
    return names | {k: k for k in ("quant_conv", "post_quant_conv") if config.get(f"use_{k}", True)}


def _invert(names: dict[str, str]) -> dict[str, str]:
    inverse = {v: k for k, v in names.items()}
    assert len(inverse) == len(names), "module name map is not one-to-one"
    return inverse


def _rename(sd: dict[str, Tensor], names: dict[str, str], what: str) -> dict[str, Tensor]:
    """Rename `module.param` keys through a module-level map; an unmapped module is an error."""
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module not in names:
            raise KeyError(f"{what}: no mapping for key {key!r} (module {module!r}); the checkpoint does not "
                           "match the config's structure (wrong model type or a corrupted file?)")
        out[f"{names[module]}.{param}"] = value
    return out


def unet_sgm_to_diffusers(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """SGM UNet keys (without `model.diffusion_model.`) -> diffusers `UNet2DConditionModel` keys."""
    return _rename(sd, _invert(unet_sgm_names(config)), "SGM UNet")


def _is_vae_attention_weight(key: str) -> bool:  # a diffusers key
    return ".attentions." in key and key.endswith(
        (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))


def vae_sgm_to_diffusers(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """LDM VAE keys (without `first_stage_model.`) -> diffusers `AutoencoderKL` keys.

    LDM's mid-block attention q/k/v/proj_out are 1x1 convs [C, C, 1, 1]; diffusers uses Linear [C, C].
    """
    out = _rename(sd, _invert(vae_sgm_names(config)), "LDM VAE")
    for key, value in out.items():
        if _is_vae_attention_weight(key) and value.ndim == 4:
            out[key] = value.reshape(value.shape[:2])
    return out


@functools.cache
def _clip_text_prefix() -> str:
    """"text_model." if the installed transformers nests CLIPTextModel's modules under it (4.x), else ""."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                            num_attention_heads=1, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):  # no memory, no init cost
        keys = CLIPTextModel(config).state_dict()
    return "text_model." if any(k.startswith("text_model.") for k in keys) else ""


def text_encoder_sgm_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """`conditioner.embedders.0.transformer.*` (transformers 4 CLIPTextModel names, without the
    prefix) -> the installed transformers' `CLIPTextModel.state_dict()` names.

    Drops `text_model.embeddings.position_ids`, a non-persistent buffer (arange) in transformers.
    transformers >= 5 dropped the `text_model.` level from CLIPTextModel (its from_pretrained still
    reads files with it, but load_state_dict does not).
    """
    out = {}
    for key, value in sd.items():
        if not key.startswith("text_model."):
            raise KeyError(f"CLIP-L text encoder: no mapping for key {key!r} (expected 'text_model.*')")
        if key != "text_model.embeddings.position_ids":
            out[_clip_text_prefix() + key.removeprefix("text_model.")] = value
    return out


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def text_encoder_2_openclip_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP text tower keys (without `conditioner.embedders.1.model.`) ->
    transformers `CLIPTextModelWithProjection` keys.

    OpenCLIP fuses q/k/v into `attn.in_proj_weight` [3C, C] (nn.MultiheadAttention) and stores
    `text_projection` as [C, proj] for `x @ P`; HF has separate q/k/v_proj and a Linear [proj, C].
    `logit_scale` (the contrastive temperature, unused by the text tower) is dropped.
    """
    top, layer = _invert(OPENCLIP), _invert(OPENCLIP_LAYER)
    out = {}
    for key, value in sd.items():
        m = _RESBLOCK.fullmatch(key)
        if key in top:
            out[top[key]] = value.T.contiguous() if key == "text_projection" else value
        elif key == "logit_scale":
            continue
        elif m and m[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            param = m[2].removeprefix("attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3), strict=True):  # clone: own storage, saveable
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{param}"] = part.clone()
        elif m and m[2].rpartition(".")[0] in layer:
            module, _, param = m[2].rpartition(".")
            out[f"text_model.encoder.layers.{m[1]}.{layer[module]}.{param}"] = value
        else:
            raise KeyError(f"OpenCLIP text encoder: no mapping for key {key!r}")
    return out


def split_single_file(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a single-file SDXL checkpoint into unet / vae / text_encoder / text_encoder_2 dicts
    with their prefixes stripped (still SGM names). Keys outside the four models (`denoiser.sigmas`,
    `model_ema.*`, ...) hold nothing the models need and are left out."""
    if not any(k.startswith(PREFIXES["unet"]) for k in sd):
        sample = ", ".join(sorted(sd)[:3])
        raise ValueError(f"not an SGM SDXL checkpoint: no '{PREFIXES['unet']}*' keys (first keys: {sample}). "
                         "Pass a diffusers model folder (with unet/, vae/, text_encoder/...) or an original "
                         "single-file SDXL .safetensors such as sd_xl_base_1.0.safetensors.")
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd):
        raise ValueError("this looks like an SDXL refiner checkpoint (OpenCLIP as embedder 0); "
                         "only SDXL base models (CLIP-L + OpenCLIP-bigG) are supported")
    return {name: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)} for name, p in PREFIXES.items()}
