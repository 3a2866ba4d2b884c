"""Stable Diffusion 3.5 as a model family (the interface of families.py; sdxl/family.py is the worked example).

    denoiser      our MMDiT (sd3/mmdit.py), diffusers' SD3Transformer2DModel names; SD3 Medium, SD 3.5 Medium
                  (MMDiT-X), SD 3.5 Large
    text encoder  CLIP-L + CLIP-G + T5-XXL (sd3/text_encoders.py): embeds (B, 77 + max_sequence_length, 4096),
                  pooled (B, 2048); --no-t5 leaves T5 out (zero tokens)
    latents       diffusers' AutoencoderKL, 16 channels, (z - 0.0609) * 1.5305 (diffusion/vae.py)
    objective     rectified flow (diffusion/flow.py `FlowObjective`): velocity target, logit-normal times shifted
                  by the model's scheduler shift (3.0)
    conditioning  pooled text; the timestep is sigma * 1000; no micro-conditioning
    LoRA          attention / attention_mlp / all (sd3/lora.py); kohya `lora_unet_<SAI path>` names, q/k/v fused
    sampling      flow Euler with CFG against the encoded negative prompt (sd3/sample.py)

The model flags of this family (`t5`, `max_sequence_length`: training/flags.py `families`) reach
`load_text_encoder` as keyword arguments (training/loop/train.py); flag_defaults gives their model defaults.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from diffusion.flow import FlowObjective
from lora.files import LoRANames
from lora.layer import LoRAConfig, LoRALayer
from lora.text_encoders import apply_text_encoder_lora
from sd3 import loading, lora, sai
from sd3 import sample as sampling
from sd3.configs import SD3_SCHEDULER_CONFIG
from sd3.mmdit import JointTransformerBlock, SD3Transformer
from sd3.text_encoders import MAX_SEQUENCE_LENGTH, SD3TextEncoder

NAME, TITLE, TINY, SCRIPT = "sd3", "Stable Diffusion 3.5", "tiny-sd3", "train_sd3.py"
SAMPLERS = sampling.SAMPLERS
DEFAULTS = {"width": 1024, "height": 1024, "steps": 28, "guidance_scale": 7.0, "sampler": "flow_euler"}  # pipeline's


def defaults(path) -> dict:
    """Generation defaults: StableDiffusion3Pipeline's for every SD 3.5 model."""
    return dict(DEFAULTS)
LORA_MODES, LORA_BASES = lora.MODES, lora.BASES
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIPs a text-encoder LoRA goes on (kohya lora_te1/2_); no T5
PREDICTION_TYPES = ("flow",)
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "sigmoid")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")

# --- weights in


def recognizes(path: Path) -> bool:
    """A diffusers folder whose transformer is an SD3Transformer2DModel, or an SAI single file
    (`model.diffusion_model.joint_blocks.*`; only the header is read)."""
    if path.is_dir():
        try:
            config = json.loads((path / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return config.get("_class_name") == "SD3Transformer2DModel"
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return any(k.startswith(sai.PREFIXES["transformer"] + "joint_blocks.") for k in f.keys())
        except Exception:  # not a safetensors file: model_problem says so
            return False
    return False


def model_problem(path) -> str | None:
    """Why `path` cannot be the SD 3.5 model of a run, or None. An SAI single file loads as a transformer and VAE
    (sd3/loading.py) but holds no tokenizers, which prompts need: the diffusers folder is required here."""
    if problem := loading.model_path_problem(path):
        return problem
    if Path(path).expanduser().is_file():
        return ("is an SAI single file, which holds no tokenizers (and often no text encoders); give the diffusers "
                "folder of the model (e.g. stabilityai/stable-diffusion-3.5-medium), or use tiny-sd3")
    return None


def vae_problem(path) -> str | None:
    """Why `path` cannot be a --vae_model (a diffusers 16-channel VAE folder, or an SD3 model folder), or None."""
    path = Path(path).expanduser()
    config = next((c for c in (path / "config.json", path / "vae" / "config.json") if c.is_file()), None)
    if config is None:
        return "is not a diffusers VAE folder (no config.json or vae/config.json); give one, or leave the flag out"
    try:
        channels = json.loads(config.read_text()).get("latent_channels")
    except (OSError, ValueError) as e:
        return f"has an unreadable {config} ({e})"
    if channels != 16:
        return f"is a VAE with {channels} latent channels; SD 3.5's has 16 (an SDXL VAE has 4): leave the flag out"
    return None


resolve = loading.resolve_model_path


def load_denoiser(path, dtype=torch.float32, device="cpu") -> SD3Transformer:
    return loading.load_transformer(path, dtype=dtype, device=device)


def load_text_encoder(path, dtype=torch.float32, device="cpu", t5: bool = True,
                      max_sequence_length: int | None = None) -> SD3TextEncoder:
    """CLIP-L, CLIP-G and, unless `t5` is off (--no-t5: zero T5 tokens), T5 with `max_sequence_length` tokens."""
    return loading.load_text_encoder(path, dtype=dtype, device=device, t5=t5, max_sequence_length=max_sequence_length)


def load_vae(path, device="cpu"):
    return loading.load_vae(path, device=device)


def scheduler_config(path) -> dict:
    """The model folder's scheduler/scheduler_config.json (SD 3.5: FlowMatchEulerDiscreteScheduler, shift 3.0)."""
    return loading.scheduler_config(path)


# --- training


def flag_defaults(path) -> dict:
    """The trainer flags whose default is the model's: flow matching with logit-normal times (SD3's paper and
    diffusers' example), shifted by the model's scheduler shift; LoRA on the attention; 256 T5 tokens. Called
    before validation: a path that cannot be read gets SD 3.5's values (validation then says what is wrong)."""
    try:
        shift = SD3_SCHEDULER_CONFIG["shift"] if str(path) == TINY else scheduler_config(path).get("shift", 1.0)
    except (OSError, ValueError):
        shift = SD3_SCHEDULER_CONFIG["shift"]
    return {"prediction_type": "flow", "timestep_sampling": "logit_normal", "lora_target_mode": "attention",
            "flow_shift": float(shift), "max_sequence_length": t5_length(path)}


def t5_length(path) -> int:
    """The model's T5 length (256, capped by its tokenizer: tiny-sd3's 32); SD 3.5's for a path not readable yet."""
    try:
        return loading.default_max_sequence_length(path)
    except (OSError, ValueError):
        return MAX_SEQUENCE_LENGTH


def objective(noise, path=None) -> FlowObjective:
    """Rectified flow with the run's NoiseSettings; times shifted by --flow_shift (default: the model's)."""
    shift = noise.flow_shift if noise.flow_shift is not None else flag_defaults(path)["flow_shift"]
    return FlowObjective(noise.timestep_sampling, noise.logit_mean, noise.logit_std, noise.mode_scale,
                         noise.sigmoid_scale, shift=shift, min_timestep=noise.min_timestep,
                         max_timestep=noise.max_timestep, loss_weighting=noise.loss_weighting,
                         precondition=noise.precondition_outputs)


def predict(transformer: nn.Module, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
            batch: dict, objective=None) -> torch.Tensor:
    """The MMDiT's velocity for noisy latents x_t (B, 16, h, w) at noise levels t (B,) in [0, 1]: diffusers' timestep
    units are sigma * 1000. SD3 has no micro-conditioning (the batch's sizes are unused)."""
    return transformer(x_t, embeds, pooled, t * 1000)  # (B, 16, h, w)


def lora_targets(transformer: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, float]]:
    return lora.lora_targets(transformer, config)


def text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, dropout: float, mode: str,
                      gradient_checkpointing: bool) -> dict[str, LoRALayer]:
    """A LoRA on both CLIP models (kohya lora_te1_ / lora_te2_); T5 stays frozen, as in every SD3 trainer."""
    return apply_text_encoder_lora(text_encoder, rank, alpha, dropout, mode, gradient_checkpointing, TEXT_ENCODERS)


def blocks(transformer: nn.Module) -> list[nn.Module]:
    """What --compile compiles one by one: the joint blocks (diffusion/compile.py)."""
    return [m for m in transformer.modules() if isinstance(m, JointTransformerBlock)]


def lora_names(base: str = "sd3.5-medium") -> LoRANames:
    return lora.lora_names(base)


# --- sampling


def sample(transformer, embeds, pooled, neg_embeds=None, neg_pooled=None, *, seeds, height, width, steps=28,
           guidance_scale=7.0, sampler="flow_euler", scheduler_config=SD3_SCHEDULER_CONFIG) -> torch.Tensor:
    """Clean latents (B, 16, H/8, W/8) of one image per (embeds[i], pooled[i], seeds[i]) (sd3/sample.py)."""
    return sampling.generate_latents(transformer, embeds, pooled, seeds=seeds, height=height, width=width,
                                     steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                     scheduler_config=scheduler_config, neg_embeds=neg_embeds, neg_pooled=neg_pooled)


negative = sampling.negative
