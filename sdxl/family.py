"""SDXL as a model family (the interface of families.py), the worked example of the seam.

    denoiser      our UNet (sdxl/unet.py), diffusers' UNet2DConditionModel names
    text encoder  CLIP-L + OpenCLIP bigG (sdxl/text_encoders.py): embeds (B, 77, 2048), pooled (B, 1280)
    latents       diffusers' AutoencoderKL, 4 channels, scale 0.13025 (diffusion/vae.py)
    objective     DDPM, epsilon or v (diffusion/ddpm.py), SDXL's scaled-linear betas
    conditioning  pooled text + micro-conditioning time ids (original size, crop, target size) from the batch
    LoRA          attention / attention_out / all + LoCon (sdxl/lora.py); kohya `lora_unet_<SGM path>` names
    sampling      euler, euler_a, ddim, dpmpp_2m (+ _karras) with CFG (sdxl/sample.py, diffusion/samplers.py)
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from diffusion.ddpm import DDPMObjective, alphas_cumprod
from diffusion.samplers import sampler_names
from lora.files import LoRANames
from lora.layer import LoRAConfig, LoRALayer
from lora.text_encoders import apply_text_encoder_lora
from sdxl import loading, lora
from sdxl import sample as sampling
from sdxl.configs import SDXL_SCHEDULER_CONFIG
from sdxl.sgm import PREFIXES
from sdxl.unet import BasicTransformerBlock, ResnetBlock2D

NAME, TITLE, TINY, SCRIPT = "sdxl", "SDXL", "tiny", "train_sdxl.py"
SAMPLERS = tuple(sampler_names())
DEFAULTS = {"width": 1024, "height": 1024, "steps": 30, "guidance_scale": 5.0, "sampler": "euler"}
LORA_MODES, LORA_BASES = lora.MODES, lora.BASES
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIP models a text-encoder LoRA goes on (kohya lora_te1/2_)
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("none", "min_snr", "debiased")

# --- weights in


def recognizes(path: Path) -> bool:
    """A diffusers folder with a UNet, or an SGM single file (`model.diffusion_model.input_blocks.*`)."""
    if path.is_dir():
        return (path / "unet" / "config.json").is_file()
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return any(k.startswith(PREFIXES["unet"] + "input_blocks.") for k in f.keys())
        except Exception:  # not a safetensors file: model_problem says so
            return False
    return False


model_problem, vae_problem, resolve = loading.model_path_problem, loading.vae_path_problem, loading.resolve_model_path
load_denoiser, load_vae = loading.load_unet, loading.load_vae


def load_text_encoder(path, dtype=torch.float32, device="cpu", settings=None) -> nn.Module:
    """Both CLIP encoders (sdxl/text_encoders.py); SDXL has no text-encoder settings (`settings` is ignored)."""
    return loading.load_text_encoder(path, dtype=dtype, device=device)


def defaults(path) -> dict:
    """Generation defaults: SDXL base's for every SDXL model."""
    return dict(DEFAULTS)


def scheduler_config(path) -> dict:
    """The model folder's scheduler/scheduler_config.json, else SDXL base's (single files carry none)."""
    config = Path(resolve(path)) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return dict(SDXL_SCHEDULER_CONFIG)
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config}: {e}; fix or delete the file (SDXL base's schedule is then "
                         "used)") from e


# --- training


def objective(noise, path=None) -> DDPMObjective:
    """SDXL's DDPM objective (1000 scaled-linear timesteps) with the run's NoiseSettings."""
    return DDPMObjective(alphas_cumprod(), noise.min_timestep, noise.max_timestep, noise.timestep_sampling,
                         noise.logit_mean, noise.logit_std, noise.mode_scale, noise.prediction_type,
                         noise.loss_weighting, noise.min_snr_gamma)


def predict(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
            batch: dict, objective=None) -> torch.Tensor:
    """The UNet's prediction for noisy latents x_t (B, 4, h, w) at timesteps t (B,), with SDXL's micro-conditioning
    from the batch: original size, crop top-left, target size, each (h, w) (the objective adds none)."""
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()
    return unet(x_t, t, embeds, {"text_embeds": pooled, "time_ids": time_ids.to(x_t.device)})  # (B, 4, h, w)


def lora_targets(unet: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, float]]:
    return lora.lora_targets(unet, config)


def text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, dropout: float, mode: str,
                      gradient_checkpointing: bool) -> dict[str, LoRALayer]:
    """A LoRA on both CLIP models (kohya lora_te1_ / lora_te2_)."""
    return apply_text_encoder_lora(text_encoder, rank, alpha, dropout, mode, gradient_checkpointing, TEXT_ENCODERS)


def blocks(unet: nn.Module) -> list[nn.Module]:
    """What --compile compiles one by one: every ResNet and transformer block (diffusion/compile.py)."""
    return [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]


def lora_names(base: str = "sdxl") -> LoRANames:
    return lora.lora_names(base)


# --- sampling


def sample(unet, embeds, pooled, neg_embeds=None, neg_pooled=None, *, seeds, height, width, steps=20,
           guidance_scale=5.0, sampler="euler", scheduler_config=SDXL_SCHEDULER_CONFIG) -> torch.Tensor:
    """Clean latents (B, 4, H/8, W/8) of one image per (embeds[i], pooled[i], seeds[i]) (sdxl/sample.py)."""
    return sampling.generate_latents(unet, embeds, pooled, seeds=seeds, height=height, width=width, steps=steps,
                                     guidance_scale=guidance_scale, sampler=sampler,
                                     scheduler_config=scheduler_config, neg_embeds=neg_embeds, neg_pooled=neg_pooled)


negative = sampling.negative


def flag_defaults(path) -> dict:
    """The trainer flags whose default is the model's (training/config.py): SDXL's."""
    return {"prediction_type": "epsilon", "timestep_sampling": "uniform", "lora_target_mode": "attention_out"}
