"""Caches so that training runs neither the VAE nor the text encoders more than once per image and caption.

`fill` encodes everything before the first step, in a fixed order and fixed batches, with a progress bar:
every latent of an image folder (its center crop, and its mirror with --random_flip) and every caption (and
the empty one of caption dropout). So a cached value never depends on which images happened to share a
batch, and a resumed run, which rebuilds a memory cache, gets the same values bit for bit. Once the latents
are cached, the data loader decodes no pixels at all (`FolderDataset.decode = False`).

Latent entries are keyed by the model, the image file's content (a SHA-256 of its bytes), its bucket, crop
offset and flip; text entries by the model and the caption. So a changed file, another resolution or crop,
or another VAE never hits a stale entry. `memory` keeps the cache in RAM for this run; `disk` also writes
one safetensors file per entry under `cache_dir`, which survives restarts; a disk entry that does not load
or holds non-finite values is rebuilt, with a warning. WebDataset shards stream, so their latents are
cached as they first come (keyed by the pixels), as are latents the pre-pass did not make. An entry is written
through a temporary file (common/files.py `atomic_write`); the temporaries a run killed mid-write left are
removed when the next run starts (`clear_cache_temporaries`; those of a live process, e.g. another run sharing
the folder on this machine, are kept).
"""

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from common.files import atomic_write, remove_stale_temporaries
from training.data.images import to_unit
from training.data.scan import map_in_threads

logger = logging.getLogger(__name__)
FILL_BATCH = 16  # images (or captions x 4) per encoder call while filling: fixed, so values never depend on it


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:32]


def clear_cache_temporaries(cache_dir: Path) -> None:
    """Remove the temporaries of cache entries (`.KEY.safetensors.tmp-PID`) whose writer is gone (killed mid-write)."""
    for part in ("latents", "text"):
        if (Path(cache_dir) / part).is_dir():
            remove_stale_temporaries(Path(cache_dir) / part, only_dead=True)


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
    """Pixels -> VAE latents (posterior mean, scaled), through the cache."""

    def __init__(self, mode: str, cache_dir: Path, model_id: str):
        self.store = _Store(mode, Path(cache_dir) / "latents")
        self.model_id = model_id.encode()
        self.files: dict[str, str] = {}  # sample key -> digest of its file's bytes (the folders `fill` saw)

    @property
    def enabled(self) -> bool:
        return self.store.mode != "none"

    def _key(self, sample_key: str, target_size, crop_top_left, flipped: bool) -> str:
        where = f"{tuple(target_size)}{tuple(crop_top_left)}{bool(flipped)}".encode()
        return _digest(self.model_id, self.files[sample_key].encode(), where)

    @torch.no_grad()
    def fill(self, dataset, vae, device) -> None:
        """Encode every image of a folder dataset (its crop, and the mirror with random flips) in fixed batches
        of one bucket; afterwards the dataset decodes nothing. Other datasets fill as they go (`get`)."""
        if not self.enabled or dataset.records is None:
            return
        digests = map_in_threads(lambda r: _digest(Path(r.path).read_bytes()), dataset.records, "hashing images")
        self.files = dict(zip([r.key for r in dataset.records], digests, strict=True))
        todo = defaultdict(list)  # bucket -> [(index, flipped)], in index order
        for index, bucket in enumerate(dataset.bucket_of):
            for flipped in (False, True) if dataset.aug.random_flip else (False,):
                todo[bucket].append((index, flipped))
        chunks = [items[i : i + FILL_BATCH] for _, items in sorted(todo.items())
                  for i in range(0, len(items), FILL_BATCH)]
        missing = 0
        for chunk in tqdm(chunks, desc="caching latents", unit="batch", disable=len(chunks) < 8):
            examples = [dataset.load_example(index, 0) for index, _ in chunk]  # center crops: any epoch
            keys = [self._key(e.key, e.target_size, e.crop_top_left_flipped if f else e.crop_top_left, f)
                    for e, (_, f) in zip(examples, chunk, strict=True)]
            if all(self.store.read(k) is not None for k in keys):
                continue
            pixels = torch.stack([e.pixel_values.flip(-1) if f else e.pixel_values
                                  for e, (_, f) in zip(examples, chunk, strict=True)])  # uint8 (B, 3, H, W)
            latents = vae.encode(to_unit(pixels.to(device)), sample=False).cpu()  # (B, 4, H/8, W/8)
            for key, latent in zip(keys, latents, strict=True):
                self.store.write(key, {"latent": latent.clone()})
            missing += len(keys)
        dataset.decode = False
        if missing:
            logger.info("cached %d latents", missing)

    @torch.no_grad()
    def get(self, batch: dict, vae, device) -> torch.Tensor:
        """The batch's latents (B, 4, H/8, W/8) on `device`: from the cache, else encoded (and cached)."""
        if not self.enabled:
            return vae.encode(to_unit(batch["pixel_values"].to(device)), sample=False)
        if all(k in self.files for k in batch["keys"]):
            where = zip(batch["keys"], batch["target_size"].tolist(), batch["crop_top_left"].tolist(),
                        batch["flipped"].tolist(), strict=True)
            keys = [self._key(*x) for x in where]
        else:  # streamed shards: keyed by the pixels
            keys = [_digest(self.model_id, str(tuple(p.shape)).encode(), p.numpy().tobytes())
                    for p in batch["pixel_values"]]
        entries = [self.store.read(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            pixels = batch["pixel_values"][missing].to(device)
            fresh = vae.encode(to_unit(pixels), sample=False).cpu()
            for i, latent in zip(missing, fresh, strict=True):
                entries[i] = {"latent": latent.clone()}
                self.store.write(keys[i], entries[i])
        return torch.stack([e["latent"] for e in entries]).to(device)  # (B, 4, H/8, W/8)


class TextEmbeddingCache:
    """Captions -> (prompt embeds, pooled), through the cache."""

    def __init__(self, mode: str, cache_dir: Path, model_id: str):
        self.store = _Store(mode, Path(cache_dir) / "text")
        self.model_id = model_id.encode()

    @torch.no_grad()
    def fill(self, captions: list[str], text_encoder) -> None:
        """Encode every distinct caption, sorted, in fixed batches."""
        if self.store.mode == "none":
            return
        unique = sorted(set(captions))
        for start in range(0, len(unique), 4 * FILL_BATCH):
            self.get(unique[start : start + 4 * FILL_BATCH], text_encoder)

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
