"""FLUX.1 as a model family (the interface of families.py): dev (guidance-distilled) and schnell.

    denoiser      our FLUX transformer (flux/transformer.py), diffusers' FluxTransformer2DModel names; it takes
                  packed 2x2 latent patches (B, h/2 * w/2, 64) with position ids, and returns their velocity
    text encoder  CLIP-L pooled (B, 768) + T5-XXL tokens (B, L, 4096), L = 512 dev / 256 schnell (flux/text_encoders.py)
    latents       diffusers' AutoencoderKL, 16 channels, shift 0.1159, scale 0.3611 (diffusion/vae.py)
    objective     rectified flow (diffusion/flow.py): velocity e - x0; noise levels `flux_shift` (sigmoid, shifted
                  for the image's token count as FLUX.1's sampler), sigmoid, logit_normal, uniform
    conditioning  timestep = sigma; dev's guidance embedding gets --guidance_scale in training (the objective's
                  `guidance`); text ids zero, image ids (0, row, column)
    LoRA          attention / all / all_plus on the double- and single-stream blocks (flux/lora.py); kohya names are
                  BFL's (`lora_unet_double_blocks_0_img_attn_qkv`: q, k, v fused), diffusers' `transformer.<path>`;
                  a text-encoder LoRA goes on CLIP-L only (kohya lora_te1_)
    sampling      flow Euler with FLUX.1's resolution-dependent shift, embedded guidance, optional true CFG
                  (flux/sample.py), equal to FluxPipeline
"""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from diffusion.flow import FlowObjective
from flux import loading
from flux import lora as flux_lora
from flux import sample as sampling
from flux.bfl import PREFIX
from flux.configs import FLUX_DEV_SCHEDULER
from flux.transformer import BLOCKS, image_ids, pack_latents, text_ids, unpack_latents
from lora.files import LoRANames
from lora.layer import LoRAConfig, LoRALayer
from lora.text_encoders import apply_text_encoder_lora

NAME, TITLE, TINY, SCRIPT = "flux", "FLUX.1", "tiny-flux", "train_flux.py"
SAMPLERS = ("flow_euler",)
# FluxPipeline's defaults for FLUX.1-dev; schnell's (4 steps, no guidance) come from `defaults(path)`. true_cfg_scale
# 1 = off (the pipeline's); its presence tells generate_images.py that this family takes --true-cfg-scale.
DEFAULTS = {"width": 1024, "height": 1024, "steps": 28, "guidance_scale": 3.5, "sampler": "flow_euler",
            "true_cfg_scale": 1.0}
SCHNELL_DEFAULTS = DEFAULTS | {"steps": 4, "guidance_scale": 0.0}
LORA_MODES, LORA_BASES = flux_lora.MODES, flux_lora.BASES
TEXT_ENCODERS = ("text_encoder",)  # CLIP-L takes the text-encoder LoRA (kohya lora_te1_); T5 never does
PREDICTION_TYPES = ("flow",)
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "sigmoid", "flux_shift")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")

# --- weights in


def recognizes(path: Path) -> bool:
    """A diffusers folder with a FluxTransformer2DModel (model_index.json aside), or a single file of FLUX.1
    tensors: BFL's names (`double_blocks.*`, with or without ComfyUI's `model.diffusion_model.`) or diffusers'
    (`single_transformer_blocks.*`). Only names are read, no tensors."""
    if path.is_dir():
        config = path / "transformer" / "config.json"
        try:
            return config.is_file() and json.loads(config.read_text()).get("_class_name") == "FluxTransformer2DModel"
        except (OSError, ValueError):
            return False
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return any(k.startswith(("double_blocks.", PREFIX + "double_blocks.", "single_transformer_blocks."))
                           for k in f.keys())
        except Exception:  # not a safetensors file: model_problem says so
            return False
    return False


def model_problem(path) -> str | None:
    """Why `path` cannot be the scripts' --pretrained_model, or None. A single file holds only the transformer;
    the scripts take no second path for the text encoders and VAE yet, so they need the diffusers folder."""
    problem = loading.model_path_problem(path)
    if problem is None and str(path) != TINY and Path(path).expanduser().is_file():
        return ("is a FLUX.1 single file, which holds only the transformer; the text encoders (CLIP-L, T5-XXL) and "
                "VAE come from a diffusers FLUX.1 folder: give that folder (e.g. ./weights/flux1-dev) instead "
                "(flux.loading reads single files with config_path=FOLDER from Python)")
    return problem


def vae_problem(path) -> str | None:
    """Why `path` cannot be --vae_model: a diffusers VAE folder (or model folder) with 16 latent channels."""
    root = Path(path).expanduser()
    config = next((c for c in (root / "config.json", root / "vae" / "config.json") if c.is_file()), None)
    if config is None:
        return "is not an existing diffusers VAE folder (no config.json); give FLUX.1's vae/ folder, or leave it out"
    try:
        channels = json.loads(config.read_text()).get("latent_channels")
    except (OSError, ValueError) as e:
        return f"cannot be read ({config}: {e})"
    if channels != 16:
        return f"is a VAE with {channels} latent channels; FLUX.1's has 16"
    return None


resolve = loading.resolve_model_path
load_denoiser, load_vae = loading.load_transformer, loading.load_vae


def load_text_encoder(path, dtype=torch.float32, device="cpu", max_sequence_length: int | None = None) -> nn.Module:
    """CLIP-L + T5 (flux/text_encoders.py); T5 tokens `max_sequence_length` (--max_sequence_length; default: the
    model's: 512 dev, 256 schnell, 32 tiny-flux)."""
    return loading.load_text_encoder(path, dtype=dtype, device=device, max_sequence_length=max_sequence_length)


def scheduler_config(path) -> dict:
    return loading.scheduler_config(path)


def defaults(path) -> dict:
    """Generation defaults of a model: FluxPipeline's for dev (28 steps, guidance 3.5), schnell's model card's
    (4 steps, no guidance: it has no guidance embedding)."""
    try:
        return dict(SCHNELL_DEFAULTS if loading.is_schnell(path) else DEFAULTS)
    except (OSError, ValueError):  # not loadable: model_problem says why
        return dict(DEFAULTS)


# --- training


def flag_defaults(path) -> dict:
    """The trainer flags whose default is the model's: flow prediction, FLUX.1's shifted sigmoid noise levels, the
    attention LoRA, no fixed shift (what uniform/logit_normal/sigmoid use), the model's T5 length."""
    try:
        length = loading.default_max_sequence_length(path)
    except (OSError, ValueError):  # not loadable: validation reports model_problem
        length = 512
    return {"prediction_type": "flow", "timestep_sampling": "flux_shift", "lora_target_mode": "attention",
            "flow_shift": 1.0, "max_sequence_length": length}


def image_tokens(latent_shape) -> int:
    """The packed token count of a (B, 16, h, w) latent: (h/2)(w/2), what FLUX.1's shift is a function of."""
    return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


@dataclasses.dataclass(frozen=True)
class FluxObjective(FlowObjective):
    """FLUX.1's rectified-flow objective, plus what its transformer is conditioned on in training: the guidance
    value of dev's guidance embedding (`guidance`, --guidance_scale; None for schnell, which has none)."""

    guidance: float | None = None


def objective(noise, path=None) -> FluxObjective:
    """The run's NoiseSettings as FLUX.1's objective; flux_shift takes the base/max shift and token counts of the
    model's scheduler config (FLUX.1-dev: 0.5 at 256 tokens to 1.15 at 4096)."""
    if noise.timestep_sampling == "flux_shift" and noise.flow_shift not in (None, 1.0):
        raise ValueError(f"--flow_shift {noise.flow_shift} does nothing with --timestep_sampling flux_shift (which "
                         "shifts by the image's size); use it with sigmoid, logit_normal or uniform")
    config = scheduler_config(path) if path is not None else dict(FLUX_DEV_SCHEDULER)
    dynamic = {k: config[k] for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
               if k in config}
    schnell = path is not None and loading.is_schnell(path)
    return FluxObjective(noise.timestep_sampling, noise.logit_mean, noise.logit_std, noise.mode_scale,
                         noise.sigmoid_scale, noise.flow_shift or 1.0, dynamic, image_tokens, noise.min_timestep,
                         noise.max_timestep, noise.loss_weighting, False,
                         guidance=None if schnell else noise.guidance_scale)


def predict(transformer: nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
            batch: dict, objective: FluxObjective | None = None) -> torch.Tensor:
    """The velocity prediction for noisy latents x_t (B, 16, h, w) at noise levels t (B,): packed into 2x2-patch
    tokens with their position ids, timestep = sigma, dev's guidance = the objective's (--guidance_scale, default
    1.0, as diffusers' FLUX LoRA example), unpacked."""
    b, _, h, w = x_t.shape
    distilled = getattr(transformer, "module", transformer).config.guidance_embeds  # (in DDP: its module's)
    value = 1.0 if objective is None or objective.guidance is None else float(objective.guidance)
    guidance = batch["guidance"].to(x_t.device) if "guidance" in batch else torch.full((b,), value, device=x_t.device)
    guidance = guidance if distilled else None  # a batch's own (B,) guidance: tools/pretrain_tiny.py's distillation
    v = transformer(pack_latents(x_t), embeds, pooled, t, image_ids(h, w, device=x_t.device),
                    text_ids(embeds.shape[1], device=x_t.device), guidance=guidance)  # (B, N, 64)
    return unpack_latents(v, h, w)  # (B, 16, h, w)


def lora_targets(transformer: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, float]]:
    return flux_lora.lora_targets(transformer, config)


def text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, dropout: float, mode: str,
                      gradient_checkpointing: bool) -> dict[str, LoRALayer]:
    """A LoRA on CLIP-L only (kohya lora_te1_, diffusers text_encoder.); FLUX.1 trainers leave T5 frozen."""
    return apply_text_encoder_lora(text_encoder, rank, alpha, dropout, mode, gradient_checkpointing, TEXT_ENCODERS)


def blocks(transformer: nn.Module) -> list[nn.Module]:
    """What --compile compiles one by one: every double- and single-stream block."""
    return [m for m in transformer.modules() if isinstance(m, BLOCKS)]


def lora_names(base: str = "flux-dev") -> LoRANames:
    return flux_lora.lora_names(base)


# --- sampling


def sample(transformer, embeds, pooled, neg_embeds=None, neg_pooled=None, *, seeds, height, width, steps=28,
           guidance_scale=3.5, sampler="flow_euler", scheduler_config=FLUX_DEV_SCHEDULER,
           true_cfg_scale: float = 1.0) -> torch.Tensor:
    """Clean latents (B, 16, H/8, W/8) of one image per (embeds[i], pooled[i], seeds[i]) (flux/sample.py)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not a FLUX.1 sampler; use one of {', '.join(SAMPLERS)}")
    return sampling.generate_latents(transformer, embeds, pooled, seeds=seeds, height=height, width=width,
                                     steps=steps, guidance_scale=guidance_scale, scheduler_config=scheduler_config,
                                     neg_embeds=neg_embeds, neg_pooled=neg_pooled, true_cfg_scale=true_cfg_scale)


negative = sampling.negative
