"""Model families: SDXL, SD 3.5 and FLUX.1 behind one small interface, the seam between the model packages
(sdxl/, sd3/, flux/) and everything above them (training/, sampling/, evaluation/, the scripts), which never name a
family. A family is one package with a `family.py` module implementing `Family` below, plus one line in `FAMILIES`.

    family = families.get("sdxl")                 # the module sdxl/family.py
    family = families.of("./weights/sd3.5-medium")  # from a folder's model_index.json, a file's keys, a tiny name

What a family knows, and nothing above it does: how to load its parts (denoiser, text encoder, VAE) from a diffusers
folder, the vendor's single file or its tiny model; how its text encoder turns prompts into (embeds, pooled); its
latents (the VAE's scale and shift: diffusion/vae.py); its training objective (DDPM's epsilon/v for SDXL, rectified
flow for SD 3.5 and FLUX.1: an `Objective`); how to call its denoiser with its conditioning (`predict`); where its
LoRA goes and what its layers are called in LoRA files (`lora_targets`, `lora_names`); how it samples (`sample`).
"""

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
from torch import nn

FAMILIES = {"sdxl": "sdxl.family", "sd3": "sd3.family", "flux": "flux.family"}
TINY = {"tiny": "sdxl", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}  # the embedded tiny models


class Objective(Protocol):
    """What a training step draws and regresses (diffusion/ddpm.py `DDPMObjective`, diffusion/flow.py
    `FlowObjective`). `t` is the objective's own time: an integer DDPM timestep or a flow sigma."""

    def draw_times(self, n: int, generator: torch.Generator, latent_shape: tuple) -> torch.Tensor: ...
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def output(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def weights(self, t: torch.Tensor) -> torch.Tensor | None: ...
    def validation_times(self, k: int) -> torch.Tensor: ...


class Family(Protocol):
    """The interface: the module-level names of `<family>/family.py` (tests/test_families.py checks that each family
    has every one; sdxl/family.py is the worked example)."""

    NAME: str  # "sdxl"
    TITLE: str  # "SDXL", for messages
    TINY: str  # the name of its embedded tiny model ("tiny", "tiny-sd3", "tiny-flux")
    SCRIPT: str  # its trainer, e.g. "train_sdxl.py"
    SAMPLERS: tuple[str, ...]  # what generate_images.py --scheduler offers
    DEFAULTS: dict  # generation defaults of its main model: width, height, steps, guidance_scale, sampler (+ the
    #                 sampling options it alone takes, e.g. FLUX.1's true_cfg_scale); `defaults(path)`: a model's
    LORA_MODES: tuple[str, ...]  # --lora_target_mode values
    LORA_BASES: tuple[str, ...]  # the base models a LoRA file is tried against (read_lora), e.g. ("sdxl", "tiny")
    PREDICTION_TYPES: tuple[str, ...]  # --prediction_type values it trains
    TIMESTEP_SAMPLING: tuple[str, ...]  # --timestep_sampling values
    LOSS_WEIGHTING: tuple[str, ...]  # --loss_weighting values

    # --- weights in: a diffusers folder, the vendor's single file, or the tiny name
    recognizes: Callable[[Path], bool]  # (path) -> a diffusers folder or single file of this family?
    model_problem: Callable[[str], str | None]  # (path) -> why --pretrained_model cannot load it, or None
    vae_problem: Callable[[str], str | None]  # (path) -> why --vae_model cannot load it, or None
    resolve: Callable[[str], Path]  # (path or tiny name) -> the folder or file
    load_denoiser: Callable[..., nn.Module]  # (path, dtype, device)
    # (path, dtype, device, **its model flags: training/flags.py `model_options`, e.g. SD 3.5's t5,
    # max_sequence_length); encode(prompts) -> (embeds, pooled)
    load_text_encoder: Callable[..., nn.Module]
    load_vae: Callable[..., nn.Module]  # (path, device) -> a LatentVAE (fp32, scaled latents)
    scheduler_config: Callable[[str], dict]  # (path) -> its sampling schedule's config (diffusers' json)
    defaults: Callable[[str], dict]  # (path) -> DEFAULTS for this model (FLUX.1-schnell: 4 steps, no guidance)

    # --- training
    flag_defaults: Callable[[str], dict]  # (path) -> values of the trainer flags whose default is the model's
    objective: Callable[..., Objective]  # (NoiseSettings, path)
    predict: Callable[..., torch.Tensor]  # (denoiser, x_t, t, embeds, pooled, batch, objective): with its
    #                                       conditioning from the batch (SDXL's sizes) and the objective (FLUX.1's
    #                                       training guidance)
    lora_targets: Callable[..., dict[str, tuple[int, float]]]  # (denoiser, LoRAConfig) -> path: (rank, alpha)
    text_encoder_lora: Callable[..., dict]  # (text_encoder, rank, alpha, dropout, mode, checkpointing)
    blocks: Callable[[nn.Module], list[nn.Module]]  # (denoiser) -> what --compile compiles, one by one

    # --- LoRA files
    lora_names: Callable[[str], object]  # (base) -> lora/files.py `LoRANames`

    # --- sampling
    sample: Callable[..., torch.Tensor]  # (denoiser, embeds, pooled, neg_embeds, neg_pooled, *, seeds, height,
    #                                      width, steps, guidance_scale, sampler, scheduler_config, and the
    #                                      DEFAULTS keys beyond these, e.g. true_cfg_scale) -> latents
    negative: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (text_encoder, prompts, embeds, pooled)


def get(name: str) -> ModuleType:
    """The family module of `name` ("sdxl", "sd3", "flux")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; the families are {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


PIPELINES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def name_of(model) -> str | None:
    """The family of a model, without loading it: a tiny name, a diffusers folder's model_index.json, or a single
    file's tensor names (each family's `recognizes`); None when no family claims it."""
    text = str(model)
    if text in TINY:
        return TINY[text]
    path = Path(text).expanduser()
    index = path / "model_index.json"
    if index.is_file():
        try:
            return PIPELINES.get(json.loads(index.read_text()).get("_class_name"))
        except (OSError, ValueError):
            return None
    for name in FAMILIES:
        try:
            if get(name).recognizes(path):
                return name
        except ModuleNotFoundError:  # a family package not in this checkout
            continue
    return None


def of(model) -> ModuleType:
    """The family module of a model (see `name_of`); a ValueError naming the model if none claims it."""
    name = name_of(model)
    if name is None:
        raise ValueError(f"{model} is not a model of a known family (SDXL, SD 3.5, FLUX.1): no model_index.json "
                         "naming its pipeline and no single-file layout we know")
    return get(name)


def lora_names(base: str | None = None) -> list:
    """The `LoRANames` a LoRA file is checked against: those of `base` (a family's base name such as `sdxl`, a tiny
    name, a model folder), else every family's known bases (`LORA_BASES`), in the order of `FAMILIES`."""
    if base is not None:
        family = name_of(base) or next((n for n in FAMILIES if base in _bases(n)), None)
        if family is None:
            raise ValueError(f"--base {base}: not a base model we know; give {', '.join(all_bases())} or a diffusers "
                             "model folder")
        return [get(family).lora_names(base)]
    return [get(name).lora_names(b) for name in FAMILIES for b in _bases(name)]


def _bases(name: str) -> tuple[str, ...]:
    try:
        return get(name).LORA_BASES
    except ModuleNotFoundError:  # a family package not in this checkout
        return ()


def all_bases() -> list[str]:
    return [b for name in FAMILIES for b in _bases(name)]


def read_lora(path, base: str | None = None):
    """A LoRA file of any format and family, checked against `base` (see `lora_names`): lora/reading.py."""
    from lora.reading import read_lora as read

    return read(path, lora_names(base))
