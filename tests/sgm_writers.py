"""The inverse key maps (diffusers / transformers -> single-file SGM names): tests build single-file SDXL
checkpoints from diffusers-format models with them, to check the loader's forward maps (sdxl/sgm.py)."""

import re

import torch
from torch import Tensor

from sdxl.sgm import OPENCLIP, OPENCLIP_LAYER, _is_vae_attention_weight, _rename, unet_sgm_names, vae_sgm_names

_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def unet_diffusers_to_sgm(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """diffusers `UNet2DConditionModel` keys -> SGM UNet keys (without `model.diffusion_model.`)."""
    return _rename(sd, unet_sgm_names(config), "diffusers UNet")


def vae_diffusers_to_sgm(sd: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` keys -> LDM VAE keys (attention weights back to [C, C, 1, 1])."""
    sd = {k: v[:, :, None, None] if _is_vae_attention_weight(k) and v.ndim == 2 else v for k, v in sd.items()}
    return _rename(sd, vae_sgm_names(config), "diffusers VAE")


def text_encoder_hf_to_sgm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `text_encoder_sgm_to_hf` (without position_ids)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in sd.items() if not k.endswith("position_ids")}


def text_encoder_2_hf_to_openclip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `text_encoder_2_openclip_to_hf` (q/k/v concatenated back into in_proj)."""
    out, qkv = {}, {}
    for key, value in sd.items():
        m = _HF_LAYER.fullmatch(key)
        module, _, param = m[2].rpartition(".") if m else ("", "", "")
        if key in OPENCLIP:
            out[OPENCLIP[key]] = value.T.contiguous() if key == "text_projection.weight" else value
        elif m and module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            name = module.removeprefix("self_attn.")[0]  # q, k or v
            qkv.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{param}", {})[name] = value
        elif m and module in OPENCLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{OPENCLIP_LAYER[module]}.{param}"] = value
        else:
            raise KeyError(f"CLIPTextModelWithProjection: no mapping for key {key!r}")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{key}: needs q, k and v projections, got only {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
