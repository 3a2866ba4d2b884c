"""Key maps between Stability AI's single-file SD3 / SD 3.5 checkpoints and diffusers / transformers names.

An SAI single file (`sd3_medium.safetensors`, `sd3.5_medium.safetensors`, `sd3.5_large.safetensors`, with or
without `_incl_clips...`) is the state dict of SAI's reference implementation (github.com/Stability-AI/sd3.5,
`mmditx.py`, `sd3_impls.py`):

    model.diffusion_model.*               the MMDiT: x_embedder, pos_embed, t_embedder, y_embedder,
                                          context_embedder, joint_blocks.N.{x_block, context_block}, final_layer
    first_stage_model.*                   the 16-channel VAE (LDM names, no quant convs)
    text_encoders.clip_l.transformer.*    CLIP-L, transformers names (no text_projection: it is the identity)
    text_encoders.clip_g.transformer.*    CLIP-G, transformers names with text_projection
    text_encoders.t5xxl.transformer.*     T5-XXL encoder, transformers names

The transformer map is two-way (a LoRA writer can use it, and tests write SAI files with it); where the layouts
differ: SAI fuses q/k/v into one `qkv` Linear per stream, and its final-layer and last-context-block adaLN
store (shift, scale) where diffusers' AdaLayerNormContinuous expects (scale, shift). The VAE and text encoders
are read one way (SAI -> diffusers / transformers). Oracle: diffusers' `convert_sd3_transformer_checkpoint_to_
diffusers` and the CLIP/T5/VAE converters of loaders/single_file_utils.py (tests/test_sd3_loading.py).
"""

import re

import torch
from torch import Tensor

from sdxl.sgm import vae_sgm_to_diffusers  # the LDM VAE names are the same in every family's single files

PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}

# diffusers module -> SAI module, outside the blocks
TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) <-> (shift, scale)
    "proj_out": "final_layer.linear",
}
# diffusers module -> SAI module, inside transformer_blocks.N / joint_blocks.N
BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # last block: (scale, shift) <-> (shift, scale)
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# SAI's fused qkv Linear of each attention -> diffusers' three Linears, in order
FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_BLOCK_KEY = re.compile(r"(transformer_blocks|joint_blocks)\.(\d+)\.(.+)\.(weight|bias)")


def swap_halves(t: Tensor) -> Tensor:
    """(a, b) -> (b, a) along dim 0: SAI's (shift, scale) <-> diffusers' (scale, shift); its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _last_block(sd: dict, name: str) -> int:
    return max((int(m[2]) for k in sd if (m := _BLOCK_KEY.fullmatch(k)) and m[1] == name), default=-1)


def transformer_sai_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAI MMDiT keys (without `model.diffusion_model.`) -> diffusers `SD3Transformer2DModel` keys.
    An unknown key is a KeyError naming it."""
    block_map, top_map = {v: k for k, v in BLOCK.items()}, {v: k for k, v in TOP.items()}
    last = _last_block(sd, "joint_blocks")
    out = {}
    for key, value in sd.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        m = _BLOCK_KEY.fullmatch(key)
        module, _, param = key.rpartition(".")
        if m and m[1] == "joint_blocks" and m[3] in FUSED:
            for name, part in zip(FUSED[m[3]], value.chunk(3, dim=0), strict=True):  # clone: own storage, saveable
                out[f"transformer_blocks.{m[2]}.{name}.{param}"] = part.clone()
        elif m and m[1] == "joint_blocks" and m[3] in block_map:
            name = block_map[m[3]]
            swap = name == "norm1_context.linear" and int(m[2]) == last
            out[f"transformer_blocks.{m[2]}.{name}.{param}"] = swap_halves(value) if swap else value
        elif module in top_map:
            out[f"{top_map[module]}.{param}"] = swap_halves(value) if module == TOP["norm_out.linear"] else value
        else:
            raise KeyError(f"SAI MMDiT: no mapping for key {key!r}")
    return out


def transformer_diffusers_to_sai(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `SD3Transformer2DModel` keys -> SAI MMDiT keys (without `model.diffusion_model.`): the inverse
    of `transformer_sai_to_diffusers`."""
    fused = {name: (sai, i) for sai, names in FUSED.items() for i, name in enumerate(names)}
    last = _last_block(sd, "transformer_blocks")
    out, parts = {}, {}
    for key, value in sd.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        m = _BLOCK_KEY.fullmatch(key)
        module, _, param = key.rpartition(".")
        if m and m[1] == "transformer_blocks" and m[3] in fused:
            sai, i = fused[m[3]]
            parts.setdefault(f"joint_blocks.{m[2]}.{sai}.{param}", [None] * 3)[i] = value
        elif m and m[1] == "transformer_blocks" and m[3] in BLOCK:
            swap = m[3] == "norm1_context.linear" and int(m[2]) == last
            out[f"joint_blocks.{m[2]}.{BLOCK[m[3]]}.{param}"] = swap_halves(value) if swap else value
        elif module in TOP:
            out[f"{TOP[module]}.{param}"] = swap_halves(value) if module == "norm_out.linear" else value
        else:
            raise KeyError(f"diffusers SD3 transformer: no mapping for key {key!r}")
    for key, qkv in parts.items():
        if any(t is None for t in qkv):
            raise KeyError(f"diffusers SD3 transformer: {key} needs all of q, k and v")
        out[key] = torch.cat(qkv, dim=0)
    return out


def vae_sai_to_diffusers(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """LDM VAE keys (without `first_stage_model.`) -> diffusers `AutoencoderKL` keys for `config`."""
    return vae_sgm_to_diffusers(sd, config)


def clip_sai_to_hf(sd: dict[str, Tensor], model_keys, identity_projection: bool = False) -> dict[str, Tensor]:
    """`text_encoders.clip_{l,g}.transformer.*` (transformers names, without the prefix) -> the keys of the given
    model (`model_keys`: its state_dict keys; transformers >= 5.6 dropped `CLIPTextModel`'s `text_model.` level).

    Drops `text_model.embeddings.position_ids` (a non-persistent buffer). CLIP-L files carry no text_projection:
    SAI's CLIP-L pools through the identity (as the diffusers SD3 folder's text_encoder), so with
    `identity_projection` a missing one becomes eye(hidden)."""
    nested = any(k.startswith("text_model.") for k in model_keys)
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            raise KeyError(f"CLIP text encoder: no mapping for key {key!r} (expected 'text_model.*')")
        out[key if nested or not key.startswith("text_model.") else key.removeprefix("text_model.")] = value
    if identity_projection and "text_projection.weight" not in out:
        width = out[("text_model." if nested else "") + "final_layer_norm.weight"].shape[0]
        out["text_projection.weight"] = torch.eye(width, dtype=out[next(iter(out))].dtype)
    return out


def t5_sai_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """`text_encoders.t5xxl.transformer.*` (without the prefix) -> `T5EncoderModel` keys: the same names; the
    token embedding is stored once (`shared.weight`) and tied to `encoder.embed_tokens.weight`."""
    out = dict(sd)
    if "shared.weight" in out:
        out.setdefault("encoder.embed_tokens.weight", out["shared.weight"])
    elif "encoder.embed_tokens.weight" in out:
        out["shared.weight"] = out["encoder.embed_tokens.weight"]
    return out


def split_single_file(keys) -> dict[str, list[str]]:
    """The keys of an SAI single file per part (transformer, vae, text_encoder, text_encoder_2, text_encoder_3),
    prefixes kept; a file without MMDiT keys is a one-line ValueError."""
    keys = list(keys)
    if not any(k.startswith(PREFIXES["transformer"] + "joint_blocks.") for k in keys):
        sample = ", ".join(sorted(keys)[:3])
        hint = " (this looks like an SDXL checkpoint)" if any(k.startswith("conditioner.") for k in keys) else ""
        raise ValueError(f"not an SAI SD3/SD 3.5 checkpoint: no '{PREFIXES['transformer']}joint_blocks.*' keys{hint} "
                         f"(first keys: {sample}); pass a diffusers SD3 folder or sd3.5_*.safetensors")
    return {part: [k for k in keys if k.startswith(prefix)] for part, prefix in PREFIXES.items()}
