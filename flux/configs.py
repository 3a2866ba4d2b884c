"""FLUX.1's configs in diffusers' spelling: the transformer config translation, FLUX.1-dev's and schnell's, the
config a Black Forest Labs single file (which carries none) is read with, and the sampler schedules.

`config_from_diffusers` reads a diffusers `transformer/config.json` dict into our `FluxConfig` and refuses what
flux/transformer.py does not implement; `config_to_diffusers` writes the dict diffusers' `FluxTransformer2DModel`
builds the same network from; `config_from_bfl_shapes` infers the config from a single file's tensor shapes.
"""

from flux.transformer import FluxConfig

FLUX_DEV = FluxConfig(guidance_embeds=True)  # black-forest-labs/FLUX.1-dev: 11.9 B parameters
FLUX_SCHNELL = FluxConfig(guidance_embeds=False)  # black-forest-labs/FLUX.1-schnell

# The T5 sequence length each model was trained with (diffusers' FluxPipeline default 512; schnell's model card
# and pipeline examples use 256).
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}

# scheduler/scheduler_config.json of FLUX.1-dev (resolution-dependent shift mu, diffusers' calculate_shift) and
# FLUX.1-schnell (no shift): what a single file is sampled with when no diffusers folder is given.
FLUX_DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}  # fmt: skip
FLUX_SCHNELL_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
    "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}  # fmt: skip


def config_from_diffusers(cfg: dict) -> FluxConfig:
    """Read a diffusers `transformer/config.json` dict; refuse what this transformer does not implement."""
    if cfg.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise ValueError(f"not a FLUX.1 transformer config: _class_name={cfg['_class_name']!r}")
    if cfg.get("patch_size", 1) != 1:
        raise ValueError(f"FLUX transformer config: unsupported patch_size={cfg['patch_size']!r} (FLUX.1 uses 1)")
    in_channels = int(cfg.get("in_channels", 64))
    config = FluxConfig(
        num_layers=int(cfg.get("num_layers", 19)),
        num_single_layers=int(cfg.get("num_single_layers", 38)),
        num_attention_heads=int(cfg.get("num_attention_heads", 24)),
        attention_head_dim=int(cfg.get("attention_head_dim", 128)),
        joint_attention_dim=int(cfg.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(cfg.get("pooled_projection_dim", 768)),
        in_channels=in_channels,
        out_channels=int(cfg.get("out_channels") or in_channels),
        guidance_embeds=bool(cfg.get("guidance_embeds", False)),
        axes_dims_rope=tuple(int(a) for a in cfg.get("axes_dims_rope", (16, 56, 56))),
    )
    if sum(config.axes_dims_rope) != config.attention_head_dim or len(config.axes_dims_rope) != 3:
        raise ValueError(f"FLUX transformer config: axes_dims_rope {list(config.axes_dims_rope)} must be 3 axes "
                         f"summing to attention_head_dim {config.attention_head_dim}")
    return config


def config_to_diffusers(config: FluxConfig) -> dict:
    """The diffusers `FluxTransformer2DModel` config for the same network."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.num_layers,
        "num_single_layers": config.num_single_layers,
        "attention_head_dim": config.attention_head_dim,
        "num_attention_heads": config.num_attention_heads,
        "joint_attention_dim": config.joint_attention_dim,
        "pooled_projection_dim": config.pooled_projection_dim,
        "guidance_embeds": config.guidance_embeds,
        "axes_dims_rope": list(config.axes_dims_rope),
    }


def config_from_bfl_shapes(shapes: dict[str, tuple[int, ...]], axes_dims_rope=None) -> FluxConfig:
    """The config of a transformer in Black Forest Labs' names (prefix stripped) from its tensor shapes: block
    counts from the keys, widths from img_in / txt_in / vector_in / final_layer, head width from the qk norm,
    guidance embedding from the presence of guidance_in. The rotary split is not in the shapes: FLUX.1's
    (16, 56, 56) for 128-wide heads, else `axes_dims_rope` must be given."""
    def count(prefix):
        return len({int(k.split(".")[1]) for k in shapes if k.startswith(prefix)})

    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        config = dict(
            num_layers=count("double_blocks."), num_single_layers=count("single_blocks."),
            num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
            joint_attention_dim=shapes["txt_in.weight"][1],
            pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
            in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
            guidance_embeds="guidance_in.in_layer.weight" in shapes,
        )  # fmt: skip
        mlp = shapes["double_blocks.0.img_mlp.0.weight"][0]
    except KeyError as e:
        raise ValueError(f"not a FLUX.1 transformer in Black Forest Labs' names: no {e.args[0]}") from e
    if mlp != 4 * hidden or hidden % head_dim:
        raise ValueError(f"unsupported FLUX-like transformer: width {hidden}, MLP {mlp} (FLUX.1: 4x), head {head_dim}")
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"heads of {head_dim} channels: the rotary split (axes_dims_rope) is not in a single "
                             "file; give a diffusers folder with this model's transformer/config.json")
        axes_dims_rope = (16, 56, 56)
    return FluxConfig(**config, axes_dims_rope=tuple(axes_dims_rope))

