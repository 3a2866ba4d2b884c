"""Caches so that later epochs run neither the VAE nor the text encoders.

Latents are keyed by the exact pixels the VAE would see (the image file after resize, crop and
flip, hashed) and the model, so a changed file, another resolution or crop, or another VAE never
hits a stale entry. Text embeddings are keyed by the caption and the model. `memory` keeps them in
RAM for this run; `disk` also writes one safetensors file per entry under `cache_dir`, which
survives restarts. A disk entry that does not load or holds non-finite values is rebuilt, with a
warning.
"""

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_write

logger = logging.getLogger(__name__)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:32]


class _Store:
    def __init__(self, mode: str, folder: Path):
        if mode not in ("none", "memory", "disk"):
            raise ValueError(f"cache mode {mode!r} is not one of none, memory, disk")
        self.mode, self.folder, self.memory = mode, folder, {}
        if mode == "disk":
            folder.mkdir(parents=True, exist_ok=True)

    def read(self, key: str) -> dict | None:
        if key in self.memory:
            return self.memory[key]
        if self.mode != "disk":
            return None
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            entry = load_file(path)
            if not all(torch.isfinite(v).all() for v in entry.values()):
                raise ValueError("non-finite values")
        except Exception as e:
            logger.warning("cache entry %s is unusable (%s); rebuilding it", path, e)
            path.unlink(missing_ok=True)
            return None
        self.memory[key] = entry
        return entry

    def write(self, key: str, entry: dict) -> None:
        if self.mode == "none":
            return
        self.memory[key] = entry
        if self.mode == "disk":
            tensors = {k: v.contiguous() for k, v in entry.items()}
            atomic_write(self.folder / f"{key}.safetensors", lambda tmp: save_file(tensors, tmp))


class LatentCache:
    """pixel_values -> VAE latents (posterior mean, scaled), through the cache."""

    def __init__(self, mode: str, cache_dir: Path, model_id: str):
        self.store = _Store(mode, Path(cache_dir) / "latents")
        self.model_id = model_id.encode()

    @torch.no_grad()
    def get(self, batch: dict, vae) -> torch.Tensor:
        pixels = batch["pixel_values"]  # (B, 3, H, W)
        if self.store.mode == "none":
            return vae.encode(pixels, sample=False)
        keys = [_digest(self.model_id, str(tuple(p.shape)).encode(), p.numpy().tobytes()) for p in pixels]
        entries = [self.store.read(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            fresh = vae.encode(pixels[missing], sample=False).cpu()
            for i, latent in zip(missing, fresh, strict=True):
                entries[i] = {"latent": latent.clone()}
                self.store.write(keys[i], entries[i])
        return torch.stack([e["latent"] for e in entries])  # (B, 4, H/8, W/8)


class TextEmbeddingCache:
    """captions -> (prompt embeds, pooled), through the cache."""

    def __init__(self, mode: str, cache_dir: Path, model_id: str):
        self.store = _Store(mode, Path(cache_dir) / "text")
        self.model_id = model_id.encode()

    @torch.no_grad()
    def get(self, captions: list[str], text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store.mode == "none":
            return text_encoder.encode(captions)
        keys = [_digest(self.model_id, c.encode()) for c in captions]
        entries = [self.store.read(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            embeds, pooled = text_encoder.encode([captions[i] for i in missing])
            for j, i in enumerate(missing):
                entries[i] = {"embeds": embeds[j].cpu().clone(), "pooled": pooled[j].cpu().clone()}
                self.store.write(keys[i], entries[i])
        return torch.stack([e["embeds"] for e in entries]), torch.stack([e["pooled"] for e in entries])
