"""The SDXL parts' configs in diffusers' and transformers' spellings: the UNet config translation, and the
configs a single-file checkpoint (which carries none) is read with.

`unet_config_from_diffusers` reads a diffusers `unet/config.json` dict into our `UNetConfig` and refuses
what `sdxl/unet.py` does not implement; `unet_config_to_diffusers` writes the dict diffusers'
`UNet2DConditionModel` builds the same network from. The loader (sdxl/loading.py) and the tiny-model
builder (sdxl/tiny.py) both use them.
"""

from dataclasses import fields

from sdxl.unet import UNetConfig


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """Read a diffusers `unet/config.json` dict; refuse what this UNet does not implement."""
    down = list(cfg.get("down_block_types", []))
    n = len(down)
    expected_up = [t.replace("Down", "Up") for t in reversed(down)]
    checks = {
        "down_block_types": all(t in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down) and n > 0,
        "up_block_types": list(cfg.get("up_block_types", [])) == expected_up,
        "use_linear_projection": cfg.get("use_linear_projection") is True,
        "addition_embed_type": cfg.get("addition_embed_type") == "text_time",
        "mid_block_type": cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn",
        "time_embedding_type": cfg.get("time_embedding_type", "positional") == "positional",
        "resnet_time_scale_shift": cfg.get("resnet_time_scale_shift", "default") == "default",
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        values = ", ".join(f"{k}={cfg.get(k)!r}" for k in bad)
        raise ValueError(f"UNet config is not SDXL-shaped: unsupported {values}")

    def per_level(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    tlpb = per_level(cfg.get("transformer_layers_per_block", 1))
    if any(isinstance(t, (list, tuple)) for t in tlpb) or cfg.get("reverse_transformer_layers_per_block"):
        raise ValueError("UNet config is not SDXL-shaped: per-layer transformer depths are not supported")
    return UNetConfig(
        block_out_channels=tuple(cfg["block_out_channels"]),
        cross_attention=tuple(t == "CrossAttnDownBlock2D" for t in down),
        layers_per_block=int(cfg.get("layers_per_block", 2)),
        transformer_layers_per_block=tlpb,
        num_attention_heads=per_level(heads),
        cross_attention_dim=int(cfg["cross_attention_dim"]),
        addition_time_embed_dim=int(cfg["addition_time_embed_dim"]),
        projection_class_embeddings_input_dim=int(cfg["projection_class_embeddings_input_dim"]),
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
    )


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """The diffusers `UNet2DConditionModel` config for the same network."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.cross_attention]
    cfg = {f.name: getattr(config, f.name) for f in fields(config)}
    del cfg["cross_attention"], cfg["num_attention_heads"]
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    return {
        "_class_name": "UNet2DConditionModel",
        **cfg,
        "attention_head_dim": list(config.num_attention_heads),
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "addition_embed_type": "text_time",
        "use_linear_projection": True,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "upcast_attention": False,
        "sample_size": 128,
    }


# Single-file SGM checkpoints (sd_xl_base_1.0.safetensors, CivitAI models) carry no configs: these are
# SDXL base's, used unless a diffusers folder is given to take them from.
SDXL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}  # fmt: skip
CLIP_L_CONFIG = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}  # fmt: skip
OPENCLIP_BIGG_CONFIG = {
    **CLIP_L_CONFIG, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
    "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280,
}  # fmt: skip
# Tokenizers for a single file when no config folder is given: the Hugging Face cache (downloaded once).
HUB_TOKENIZERS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")


# SDXL base's scheduler (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json): its training
# noise schedule (diffusion/ddpm.py) and the default sampling schedule (diffusion/samplers.py).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
