"""The denoisers the benchmarks compare, one pair per family (`--family sdxl|sd3|flux`): ours (sdxl/unet.py,
sd3/mmdit.py, flux/transformer.py) and diffusers' model of the same config (`UNet2DConditionModel`,
`SD3Transformer2DModel`, `FluxTransformer2DModel`), built on the very same tensors; their configs (the released
model's, with random weights, and the tiny one), their inputs, and diffusers' model called like ours.

    spec = SPECS["flux"]
    peer = peer_model(spec, spec.full, "cuda", torch.bfloat16)   # random FLUX.1-dev weights, made in bf16
    ours = ours_on(spec, spec.full, peer.state_dict())           # our transformer on the same tensors
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flux.configs import FLUX_DEV
from flux.configs import config_to_diffusers as flux_to_diffusers
from flux.tiny import TINY_TRANSFORMER_CONFIG
from flux.transformer import FluxTransformer, image_ids, pack_latents, text_ids
from sd3.configs import SD35_MEDIUM
from sd3.configs import config_to_diffusers as sd3_to_diffusers
from sd3.mmdit import SD3Transformer
from sd3.tiny import TINY_MMDIT_CONFIG
from sdxl.configs import unet_config_to_diffusers
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet


@dataclass(frozen=True)
class Spec:
    """One family's pair of denoisers."""

    title: str  # the released model `full` is shaped like
    full: object  # its config (random weights of it: nothing is downloaded)
    tiny: object  # the tiny model's config (CPU, --smoke)
    ours: type
    peer: str  # the diffusers class
    to_diffusers: Callable[[object], dict]  # our config -> the diffusers class's config dict
    peer_args: tuple[str, ...]  # diffusers' keyword names of our forward's positional arguments, in order
    widths: Callable[[object], tuple[int, int, int]]  # config -> (latent channels, text width, pooled width)
    tokens: tuple[int, int]  # text tokens per prompt: full, tiny (CLIP 77 [+ T5's], or T5's alone for FLUX.1)


def _sdxl_widths(cfg) -> tuple[int, int, int]:
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # 2816 - 6 * 256 = 1280
    return cfg.in_channels, cfg.cross_attention_dim, pooled


SPECS = {
    "sdxl": Spec("SDXL base", SDXL_CONFIG, TINY_UNET_CONFIG, SDXLUNet, "UNet2DConditionModel", unet_config_to_diffusers,
                 ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs"), _sdxl_widths, (77, 77)),
    # SD 3.5: 77 CLIP tokens + 256 T5 tokens (the trainer's default, flag_defaults); tiny-sd3's T5 length is 32
    "sd3": Spec("SD 3.5 Medium", SD35_MEDIUM, TINY_MMDIT_CONFIG, SD3Transformer, "SD3Transformer2DModel",
                sd3_to_diffusers, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                lambda c: (c.in_channels, c.joint_attention_dim, c.pooled_projection_dim), (77 + 256, 77 + 32)),
    # FLUX.1-dev: 512 T5 tokens (FluxPipeline's and the trainer's default for dev); 16 latent channels packed 2x2
    "flux": Spec("FLUX.1-dev", FLUX_DEV, TINY_TRANSFORMER_CONFIG, FluxTransformer, "FluxTransformer2DModel",
                 flux_to_diffusers, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                     "img_ids", "txt_ids", "guidance"),
                 lambda c: (c.in_channels // 4, c.joint_attention_dim, c.pooled_projection_dim), (512, 32)),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters made in `dtype`: a bf16 FLUX.1 (23.8 GB) never exists in fp32 (47.6 GB) on the way."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def peer_model(spec: Spec, cfg, device, dtype: torch.dtype) -> nn.Module:
    """diffusers' model of `cfg` with its own random init, made on `device` in `dtype` (its buffers cast too)."""
    import diffusers
    from diffusers.utils import logging

    logging.set_verbosity_error()  # not the `to(dtype)` advice: the benches cast on purpose
    kwargs = {k: v for k, v in spec.to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device(device), default_dtype(dtype):
        model = getattr(diffusers, spec.peer)(**kwargs)
    return model if str(device) == "meta" else model.to(dtype=dtype)


def ours_on(spec: Spec, cfg, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Our model of `cfg` holding the very tensors of `state_dict` (diffusers' names: strict)."""
    with torch.device("meta"):
        model = spec.ours(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


class PeerCall(nn.Module):
    """diffusers' model called like ours: our forward's positional arguments become its keywords; returns `.sample`.
    `config` is the model's (FLUX.1's `predict` reads `config.guidance_embeds`)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names, self.config = model, names, model.config

    def forward(self, *args, **kwargs):
        return self.model(**dict(zip(self.names, args, strict=False)), **kwargs).sample


def model_inputs(family: str, cfg, batch: int, resolution: int, tokens: int, g: torch.Generator) -> dict:
    """Keyword inputs of one call of the denoiser (ours and diffusers' take the same names), CPU fp32: random latents
    and text at `resolution` px, mid-schedule timesteps, the conditioning each family takes."""
    spec = SPECS[family]
    channels, text, pooled = spec.widths(cfg)
    s = resolution // 8
    latents = torch.randn(batch, channels, s, s, generator=g)  # (B, C, H/8, W/8)
    embeds = torch.randn(batch, tokens, text, generator=g)  # (B, L, text width)
    vector = torch.randn(batch, pooled, generator=g)  # (B, pooled width)
    sigma = torch.rand(batch, generator=g)  # (B,) in [0, 1)
    if family == "sdxl":
        r = resolution
        return {"sample": latents, "timestep": (sigma * 1000).to(torch.int64), "encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": vector,
                                      "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=torch.float32)}}
    if family == "sd3":
        return {"hidden_states": latents, "encoder_hidden_states": embeds, "pooled_projections": vector,
                "timestep": sigma * 1000}  # diffusers' units
    x = {"hidden_states": pack_latents(latents), "encoder_hidden_states": embeds, "pooled_projections": vector,
         "timestep": sigma, "img_ids": image_ids(s, s), "txt_ids": text_ids(tokens)}  # (B, s/2 * s/2, 64), ...
    if cfg.guidance_embeds:
        x["guidance"] = torch.full((batch,), 3.5)  # FluxPipeline's default for dev
    return x
