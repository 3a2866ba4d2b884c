"""The models one training run holds (`Models`): the family's denoiser with its LoRA on frozen base weights
(in --base_dtype, sharded by FSDP2 with --shard_base), its text encoder, the VAE and their caches; how they are
built (`build_models`) and wrapped for several processes (`data_parallel`)."""

import random
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from common.runtime import DTYPES
from lora.base_weights import STORAGE, store_linears
from lora.layer import LoRAConfig, add_lora, lora_parameters
from lora.text_encoders import text_encoder_lora_parameters
from training.data.datasets import TrainingData
from training.flags import Settings, model_options
from training.loop.caching import LatentCache, TextEmbeddingCache
from training.loop.shard import local_bytes, shard_base


@dataclass
class Models:
    """What one training step runs: the family's denoiser with its LoRA, its text encoder (frozen, or with a LoRA of
    its own with --train_text_encoder), the frozen VAE, their caches, and the family's objective."""

    family: ModuleType  # the family module (families.py), e.g. sdxl/family.py
    denoiser: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    latents: LatentCache
    texts: TextEmbeddingCache
    lora_config: LoRAConfig
    objective: object  # families.Objective
    scheduler_config: dict  # how it samples (grids, scores)
    train_text_encoder: bool  # whether the text encoder's LoRA trains (never cached then)
    sharded: bool = False  # the denoiser is sharded across the processes (--shard_base): every rank runs its forwards

    def fill_caches(self, data: TrainingData, device, val_data: TrainingData | None = None,
                    prompts: list[str] = ()) -> str | None:
        """Encode every image and caption of a folder dataset once, before the first step (training/loop/caching.py).
        On a GPU with --cache_text_embeddings and no text-encoder LoRA, also the validation images' captions and the
        validation prompts, then move the text encoder to the CPU: it frees the GPU memory the encoder held (FLUX.1's
        T5-XXL: 9.5 GB in bf16), and a caption still missing (FLUX.1's empty negative prompt of a sample grid) is
        encoded on the CPU. Returns a note saying so, or None."""
        self.latents.fill(data, self.vae, device)
        if data.records is None or self.texts.store.mode == "none":  # streamed shards: captions come as they come
            return None
        self.texts.fill([r.caption for r in data.records] + [""], self.text_encoder)
        if device.type != "cuda" or self.train_text_encoder:
            return None
        val_records = (val_data.records or []) if val_data is not None else []
        self.texts.fill([r.caption for r in val_records] + list(prompts), self.text_encoder)  # what else it encodes
        held = sum(p.numel() * p.element_size() for p in self.text_encoder.parameters())
        self.text_encoder.to("cpu")
        torch.cuda.empty_cache()
        return (f"every caption is cached: the text encoder moved to the CPU ({held / 2**30:.1f} GiB of GPU memory "
                "freed)")

    def encode(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A data batch -> (x0 latents fp32, prompt embeds, pooled) on `device`."""
        x0 = self.latents.get(batch, self.vae, device)  # (B, C, H/8, W/8)
        if self.train_text_encoder:  # never cached (training/config.py): its LoRA gets gradients
            embeds, pooled = self.text_encoder(batch["captions"])
        else:
            embeds, pooled = self.texts.get(batch["captions"], self.text_encoder)
        return x0, embeds.to(device), pooled.to(device)

    def predictor(self, model: torch.nn.Module | None = None):
        """`for_batch(batch, embeds, pooled)` -> `predict(x_t, t)`: the family's denoiser call with that batch's
        conditioning (`model`: the denoiser as trained, e.g. in DDP; default: the denoiser itself)."""
        model = model or self.denoiser
        return lambda batch, embeds, pooled: lambda x_t, t: self.family.predict(model, x_t, t, embeds, pooled, batch,
                                                                                self.objective)

    def set_training(self, on: bool) -> None:
        """Train mode (LoRA dropout, checkpointing) for what trains; the frozen text encoder stays in eval mode."""
        self.denoiser.train(on)
        self.text_encoder.train(on and self.train_text_encoder)


def build_models(settings: Settings, family: ModuleType, device: torch.device, sharded: bool = False) -> Models:
    """The frozen base denoiser in the weight dtype (its blocks' Linear layers in --base_dtype) with a fresh LoRA
    (seeded) on `device`, the text encoder, the VAE (fp32). `sharded`: the denoiser stays on the CPU, for
    `shard_base` to move 1/N of it to the device."""
    model, lora, runtime = settings.model, settings.lora, settings.runtime
    compute, storage = DTYPES[runtime.precision], STORAGE[runtime.base_dtype]
    # A base stored narrower, or sharded, loads on the CPU: the GPU then receives only its narrow (one layer at a
    # time) or sharded (one block at a time) form, never the whole model in the compute dtype.
    load_on = torch.device("cpu") if sharded or storage != compute else device
    denoiser = family.load_denoiser(model.pretrained_model, dtype=compute, device=load_on)
    if storage != compute:  # before the LoRA: DoRA's magnitudes are the row norms of the weights as computed
        store_linears(family.blocks(denoiser), storage, device=load_on if sharded else device)
    if not sharded:
        denoiser.to(device)  # the rest (norms, embedders); stored weights keep their dtype
    torch.manual_seed(runtime.seed)  # here, so that the LoRA init and dropout do not depend on how the model loaded
    random.seed(runtime.seed)
    np.random.seed(runtime.seed)
    lora_config = LoRAConfig(lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_target_mode,
                             lora.conv_rank, lora.conv_alpha, lora.use_dora)
    add_lora(denoiser, family.lora_targets(denoiser, lora_config), lora_config.dropout, lora_config.use_dora,
             device=device)
    denoiser.set_gradient_checkpointing(runtime.gradient_checkpointing)
    text_dtype = DTYPES[runtime.precision] if device.type == "cuda" else torch.float32
    options = model_options(model, family.NAME)  # e.g. SD 3.5's t5, max_sequence_length
    text_encoder = family.load_text_encoder(model.pretrained_model, dtype=text_dtype, device=device, **options)
    if lora.train_text_encoder:  # after the denoiser's LoRA: its init is the same with and without
        family.text_encoder_lora(text_encoder, lora.lora_rank, lora.lora_alpha, lora.lora_dropout,
                                 lora.text_encoder_target_mode, runtime.gradient_checkpointing)
    model_id = f"{Path(str(model.pretrained_model)).name}:{model.vae_model or ''}"
    text_id = model_id + "".join(f":{k}={v}" for k, v in options.items())  # e.g. --no-t5's embeddings kept apart
    models = Models(
        family=family,
        denoiser=denoiser,
        text_encoder=text_encoder,
        vae=family.load_vae(model.vae_model or model.pretrained_model, device=device),
        latents=LatentCache(runtime.cache_latents, Path(runtime.cache_dir), model_id),
        texts=TextEmbeddingCache("disk" if runtime.cache_text_embeddings else "none", Path(runtime.cache_dir),
                                 text_id),
        lora_config=lora_config,
        objective=family.objective(settings.noise, model.pretrained_model),
        scheduler_config=family.scheduler_config(model.pretrained_model),
        train_text_encoder=lora.train_text_encoder,
        sharded=sharded,
    )
    models.set_training(True)
    return models


def data_parallel(module: torch.nn.Module, world, blocks: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """Under torchrun, the module in torch DDP: its trainable (LoRA) gradients are averaged over the processes in
    buckets that overlap the backward pass. The frozen base weights are loaded by every rank from the same
    files, so DDP neither broadcasts nor watches them. With `blocks` (--shard_base), the frozen base is sharded
    by FSDP2 instead, block by block, and the module itself is returned (its LoRA gradients are averaged after
    the backward: training/loop/shard.py)."""
    if world.size == 1:
        return module
    if blocks is not None:
        shard_base(module, blocks, world)
        mine = local_bytes(module)
        whole = world.sum(mine)  # a collective: every rank
        if world.main:
            print(f"--shard_base: the frozen base ({whole / 2**20:,.1f} MiB) sharded across {world.size} processes, "
                  f"{mine / 2**20:,.1f} MiB on rank 0")
        return module
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad] + [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(module, device_ids=[world.device] if world.device.type == "cuda" else None,
                                   broadcast_buffers=False)


def trained_parameters(models: Models) -> tuple[list, list]:
    """(every trained tensor, those of the text encoder's LoRA) of a run."""
    text_params = list(text_encoder_lora_parameters(models.text_encoder).values())
    return lora_parameters(models.denoiser) + text_params, text_params
