"""The SD3-family configs in diffusers' spelling: the transformer config translation, the released models' values,
and the config of a single-file checkpoint read from its tensor shapes.

`config_from_diffusers` reads a diffusers `transformer/config.json` dict into our `MMDiTConfig` and refuses what
sd3/mmdit.py does not implement; `config_to_diffusers` writes the dict diffusers' `SD3Transformer2DModel` builds
the same network from; `config_from_sai` infers the config of an SAI single file (which carries none).
The released values are those of the models' `transformer/config.json` (stabilityai/stable-diffusion-3-medium-
diffusers, stable-diffusion-3.5-medium, stable-diffusion-3.5-large; diffusers single_file_utils maps the single
files to these repositories).
"""

import re
from dataclasses import fields

from sd3.mmdit import MMDiTConfig

SD3_MEDIUM = MMDiTConfig(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
SD35_MEDIUM = MMDiTConfig(  # MMDiT-X: attn2 in blocks 0..12, qk RMS norm, a 384-patch position grid
    num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                         qk_norm="rms_norm")

# SD3's VAE (the same in 3 and 3.5): 16 latent channels, no quant convs, latents (z - 0.0609) * 1.5305.
SD3_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}  # fmt: skip
# SD3's and SD 3.5's scheduler/scheduler_config.json: rectified flow, sampling sigmas shifted by 3.
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

_INTS = ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim", "caption_projection_dim",
         "pooled_projection_dim", "in_channels", "out_channels", "patch_size", "sample_size", "pos_embed_max_size")


def config_from_diffusers(cfg: dict) -> MMDiTConfig:
    """Read a diffusers `transformer/config.json` dict; refuse what this transformer does not implement."""
    name = cfg.get("_class_name", "SD3Transformer2DModel")
    if name != "SD3Transformer2DModel":
        raise ValueError(f"transformer config describes a {name}, not an SD3Transformer2DModel")
    default = MMDiTConfig()
    values = {k: int(cfg[k]) if cfg.get(k) is not None else getattr(default, k) for k in _INTS}
    if cfg.get("out_channels") is None:  # diffusers: out_channels None means in_channels
        values["out_channels"] = values["in_channels"]
    qk_norm = cfg.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"transformer config: qk_norm {qk_norm!r} is not supported (SD3: null, SD 3.5: 'rms_norm')")
    config = MMDiTConfig(**values, dual_attention_layers=tuple(int(i) for i in cfg.get("dual_attention_layers") or ()),
                         qk_norm=qk_norm)
    if config.caption_projection_dim != config.inner_dim:
        raise ValueError(f"transformer config: caption_projection_dim {config.caption_projection_dim} != "
                         f"num_attention_heads * attention_head_dim = {config.inner_dim}; not an SD3-shaped model")
    return config


def config_to_diffusers(config: MMDiTConfig) -> dict:
    """The diffusers `SD3Transformer2DModel` config for the same network."""
    cfg = {f.name: getattr(config, f.name) for f in fields(config)}
    cfg["dual_attention_layers"] = list(config.dual_attention_layers)
    return {"_class_name": "SD3Transformer2DModel", **cfg}


def config_from_sai(sd: dict) -> MMDiTConfig:
    """The config of an SAI single-file transformer (keys without `model.diffusion_model.`), from its shapes.

    Depth = number of joint blocks; width, patch and channels from x_embedder; head width from the qk-norm gains
    (64 without qk norm, as every SAI MMDiT); dual-attention layers = the blocks with an attn2; the position grid
    from pos_embed's length. sample_size is not stored; 128 (every SD3 model's) only matters for a freshly built
    pos_embed, and the file's own is loaded."""
    try:
        width, c_in, p, _ = sd["x_embedder.proj.weight"].shape
        blocks = sorted({int(m[1]) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.", k))})
        dual = tuple(sorted({int(m[1]) for k in sd if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}))
        qk = "joint_blocks.0.x_block.attn.ln_q.weight"
        head_dim = sd[qk].shape[0] if qk in sd else 64
        grid = round(sd["pos_embed"].shape[1] ** 0.5)
        caption_out, joint_dim = sd["context_embedder.weight"].shape
        config = MMDiTConfig(
            num_layers=len(blocks), num_attention_heads=width // head_dim, attention_head_dim=head_dim,
            joint_attention_dim=joint_dim, caption_projection_dim=caption_out,
            pooled_projection_dim=sd["y_embedder.mlp.0.weight"].shape[1], in_channels=c_in,
            out_channels=sd["final_layer.linear.weight"].shape[0] // (p * p), patch_size=p,
            pos_embed_max_size=grid, dual_attention_layers=dual, qk_norm="rms_norm" if qk in sd else None,
        )  # fmt: skip
    except KeyError as e:
        raise ValueError(f"not an SD3 MMDiT checkpoint: no {e.args[0]!r}") from e
    if blocks != list(range(len(blocks))) or not blocks:
        raise ValueError(f"not an SD3 MMDiT checkpoint: joint blocks {blocks[:3]}... are not numbered 0..n-1")
    return config
