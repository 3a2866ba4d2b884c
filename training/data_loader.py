"""Training data: image folders and WebDataset shards -> aspect-bucketed, reproducible SDXL batches.

Every optimizer micro-batch is a dict (B images of one bucket (H, W)):
    pixel_values   float32 (B, 3, H, W) in [-1, 1]
    captions       list[str]         after caption dropout and tag shuffling
    original_size  int64 (B, 2)      (h, w) of the image as displayed (EXIF rotation applied), before resizing
    crop_top_left  int64 (B, 2)      (top, left) of the crop in the resized image (the mirrored one if flipped)
    target_size    int64 (B, 2)      (H, W), the bucket
    keys           list[str]         stable sample id: path relative to data_dir, or "<shard file>/<key>"
    flipped        bool (B,)
and SDXL's micro-conditioning (Podell et al. 2023, "SDXL", section 2.2; DESIGN.md "Micro-conditioning") is
`time_ids = original_size + crop_top_left + target_size`.

Sources, detected from `data_dir` by `build_dataset`:
- a folder of .jpg/.jpeg/.png/.webp images (any letter case, recursive; hidden files and folders are
  skipped) with same-stem .txt captions, or with a `metadata.jsonl` ({"file_name": "sub/a.png",
  "text": "..."} per line) whose captions take precedence over .txt files -> `FolderDataset`;
- WebDataset .tar shards (a folder holding *.tar, a single .tar, or a brace pattern
  "data-{000..099}.tar") with jpg|jpeg|png|webp + txt members -> `ShardDataset` (streamed).

Folder sources are scanned once at start-up (`scan_folder`): every image header is read and every image
checked for truncation, so broken files are reported, with their paths, before training starts.

Flip and crop: the crop (top, left) is chosen in the resized, unflipped image; a flipped sample is that
crop mirrored, which is exactly the crop of the mirrored image at left' = resized_w - W - left, so that
is the crop_top_left it reports (`buckets.flipped_crop_offset`); SDXL conditions on what the UNet sees.

Determinism and exact resume (folder sources): the batches of epoch e are a pure function of
(seed, epoch, the scanned file list, batch_size, world_size), and each sample's crop, flip, caption
dropout and tag order are a pure function of (seed, epoch, sample index), drawn from their own numpy
generators, never from global RNG state. So `iter_epoch(e, start=k)` reproduces batches k, k+1, ... of
epoch e exactly, with any number of DataLoader workers; a checkpoint needs only (epoch, k).

Batches: a bucket's last batch of an epoch may be smaller than batch_size (kept, not dropped). With
world_size > 1 each global batch is shared equally by the ranks (see `FolderDataset`). Shards stream,
so their order is reproducible only for the same num_workers, and their epochs have no fixed length.
"""

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path, PurePosixPath

import braceexpand
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from training.buckets import (
    closest_bucket,
    cover_size,
    crop_to_bucket,
    group_by_bucket,
    make_buckets,
    plan_global_batches,
    rank_share,
)
from training.signals import ignore_stop_signals

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_FILE = "metadata.jsonl"
MAX_CAPTION_WARNINGS = 50  # "no caption" warnings printed one by one; the rest are summed up in one line
PROGRESS_MIN_FILES = 500  # show a progress bar for scans of at least this many files

# Independent random streams of one sample (seeded by (seed, epoch, index, stream)), and of the epoch order.
CROP_STREAM, FLIP_STREAM, CAPTION_STREAM = 1, 2, 3
ORDER_STREAM, SHARD_STREAM = 0x0D3D, 0x5D4D


class DataError(ValueError):
    """Training data that cannot be used as given; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------
# Start-up scan of a folder source


@dataclass(frozen=True)
class ImageRecord:
    """One usable image found by the scan."""

    path: str  # absolute path
    key: str  # path relative to data_dir, posix separators: the sample's stable id
    caption: str
    height: int  # as displayed, i.e. with the EXIF orientation applied
    width: int


@dataclass
class ScanResult:
    """What `scan_folder` found: the usable images (sorted by key) and what it left out or filled in."""

    root: Path
    records: list[ImageRecord]
    bad_files: list[tuple[str, str]]  # (path, reason), excluded
    missing_captions: list[str]  # paths of images kept with an empty caption

    @property
    def num_images(self) -> int:
        return len(self.records)


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively (symlinked folders followed once), sorted by relative path."""
    found, seen_dirs = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_metadata(root: Path) -> dict[str, str | None] | None:
    """Captions from root/metadata.jsonl, keyed by normalized relative path; None if there is no such file."""
    path = root / METADATA_FILE
    if not path.is_file():
        return None
    captions = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            file_name = entry["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(
                f'{path}:{line_number}: expected a JSON object like {{"file_name": "a.png", "text": "a caption"}} '
                f"({type(error).__name__}: {error}); fix or delete that line"
            ) from None
        caption = entry.get("text", entry.get("caption"))
        captions[PurePosixPath(file_name.replace("\\", "/")).as_posix()] = None if caption is None else str(caption)
    return captions


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8) from the file header, without decoding pixels; 1 if absent."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # a broken EXIF block: the image is still usable, just not rotated
        return 1
    return int(exif.get(0x0112, 1) or 1)


def probe_image(path: Path) -> tuple[int, int] | str:
    """Displayed (h, w) of an image file, or the reason it is unusable.

    Fast but thorough: a JPEG is decoded at 1/8 scale (every byte of the entropy-coded data is still
    read, so truncation shows), a PNG is verified (all chunks read, CRCs checked), anything else decoded.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            width, height = image.size
            if exif_orientation(image) in (5, 6, 7, 8):  # rotated by 90 degrees when displayed
                height, width = width, height
            if image.format == "PNG":
                image.verify()
            else:
                image.draft(None, (64, 64))  # only JPEG has a draft mode; other formats ignore this
                image.load()
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify the file)"
    except Exception as error:
        return f"corrupt or truncated: {type(error).__name__}: {error}".replace("\n", " ")
    return height, width


def read_caption(path: Path, metadata: dict[str, str | None] | None, key: str) -> str | None:
    """The caption of an image: metadata.jsonl first, then the same-stem .txt file; None if neither has one."""
    if metadata is not None and metadata.get(key) is not None:
        return metadata[key].strip()
    text_file = path.with_suffix(".txt")
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8", errors="replace").strip()
    return None


def scan_folder(data_dir: str | Path, max_bad_fraction: float = 0.05) -> ScanResult:
    """Check every image under data_dir before training; raise DataError if too many are unusable."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data_dir {root} does not exist or is not a folder; pass a folder of images or .tar shards")
    paths = find_images(root)
    metadata = read_metadata(root)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; check the data_dir path")

    def check(path: Path) -> tuple[tuple[int, int] | str, str | None]:
        return probe_image(path), read_caption(path, metadata, path.relative_to(root).as_posix())

    records, bad_files, missing_captions = [], [], []
    for path, (size, caption) in zip(paths, map_in_threads(check, paths, "scanning images"), strict=True):
        if isinstance(size, str):
            logger.warning("bad image, excluded from training: %s (%s)", path, size)
            bad_files.append((str(path), size))
            continue
        if caption is None:
            if len(missing_captions) < MAX_CAPTION_WARNINGS:
                logger.warning("no caption: %s (training it with an empty caption)", path)
            missing_captions.append(str(path))
        records.append(ImageRecord(str(path), path.relative_to(root).as_posix(), caption or "", *size))
    if len(missing_captions) > MAX_CAPTION_WARNINGS:
        logger.warning("... and %d more images have no caption", len(missing_captions) - MAX_CAPTION_WARNINGS)
    for key in sorted(set(metadata or {}) - {p.relative_to(root).as_posix() for p in paths}):
        problem = "is not a .jpg/.jpeg/.png/.webp image" if (root / key).exists() else "does not exist"
        reason = f"listed in {METADATA_FILE} but {problem}"
        logger.warning("bad image, excluded from training: %s (%s)", root / key, reason)
        bad_files.append((str(root / key), reason))
    check_bad_fraction(root, bad_files, len(records) + len(bad_files), max_bad_fraction)
    if not records:
        raise DataError(f"none of the images under {root} can be read; see the warnings above")
    return ScanResult(root, records, bad_files, missing_captions)


def map_in_threads(function: Callable, items: list, description: str, chunk: int = 1024) -> Iterator:
    """function(item) for every item, in order, on a thread pool (PIL decodes without the GIL), with a progress bar."""
    workers = min(16, 2 * (os.cpu_count() or 1))
    progress = tqdm(total=len(items), desc=description, unit="file", disable=len(items) < PROGRESS_MIN_FILES)
    with ThreadPoolExecutor(max_workers=workers) as pool, progress:
        for start in range(0, len(items), chunk):  # in chunks: a million pending futures would not fit in memory
            for result in pool.map(function, items[start : start + chunk]):
                progress.update()
                yield result


def check_bad_fraction(root: Path, bad_files: list[tuple[str, str]], total: int, max_bad_fraction: float) -> None:
    """Raise a one-line DataError naming the bad files when more than max_bad_fraction of them are bad."""
    if len(bad_files) <= max_bad_fraction * total:
        return
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad_files[:5])
    more = f"; and {len(bad_files) - 5} more" if len(bad_files) > 5 else ""
    raise DataError(
        f"{len(bad_files)} of {total} image files under {root} are unusable, more than "
        f"max_bad_fraction={max_bad_fraction}: {shown}{more}. Fix or delete these files, "
        f"or raise max_bad_fraction to train without them"
    )


# ----------------------------------------------------------------------------------------------------
# Decoding an image to 8-bit RGB


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: 16-bit scaled down, transparency composited on white, CMYK/gray/palette converted."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grayscale ("I" assumed 0..65535)
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(
    source: str | Path | io.BytesIO, resize_to: Callable[[int, int], tuple[int, int]] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image as upright 8-bit RGB; return it with its displayed full-resolution (h, w).

    `resize_to(h, w)` says what the image will be resized to; a JPEG is then decoded at the smallest
    1/2, 1/4 or 1/8 scale that still covers that size (much faster for photos; no effect on geometry).
    """
    with Image.open(source) as image:
        full_w, full_h = image.size
        if resize_to is not None and image.format == "JPEG":
            rotated = exif_orientation(image) in (5, 6, 7, 8)
            out_h, out_w = resize_to(*((full_w, full_h) if rotated else (full_h, full_w)))
            image.draft(None, (out_h, out_w) if rotated else (out_w, out_h))
        image.load()
        upright = ImageOps.exif_transpose(image)
        swapped = upright.size != image.size
        return to_rgb(upright), ((full_w, full_h) if swapped else (full_h, full_w))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------
# Per-sample augmentation: crop, flip, caption


@dataclass(frozen=True)
class Augmentation:
    """The per-sample random choices and the seed they derive from."""

    center_crop: bool = False
    random_flip: bool = False
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    seed: int = 0


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample index, stream): no global RNG state involved."""
    return np.random.default_rng([seed % 2**64, epoch, index, stream])


def transform_caption(caption: str, rng: np.random.Generator, dropout: float, shuffle_tags: bool, keep: int) -> str:
    """Caption dropout (-> ""), then optionally shuffle comma-separated tags, the first `keep` staying in place."""
    if rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, shuffled = tags[:keep], tags[keep:]
    return ", ".join(fixed + [shuffled[i] for i in rng.permutation(len(shuffled))])


@dataclass
class Example:
    """One sample before the flip: the unflipped crop and both crop offsets (a latent cache can store both flips)."""

    pixel_values: torch.Tensor  # (3, H, W) in [-1, 1], unflipped
    caption: str
    key: str
    original_size: tuple[int, int]  # (h, w)
    crop_top_left: tuple[int, int]  # (top, left) of this crop in the resized image
    crop_top_left_flipped: tuple[int, int]  # the same for the mirrored crop in the mirrored resized image
    target_size: tuple[int, int]  # (H, W)
    flip: bool  # whether this (seed, epoch, index) trains on the mirrored crop

    def to_sample(self) -> dict:
        """The training sample: mirrored (pixels and crop offset) when `flip`."""
        return {
            "pixel_values": self.pixel_values.flip(-1) if self.flip else self.pixel_values,
            "caption": self.caption,
            "key": self.key,
            "original_size": self.original_size,
            "crop_top_left": self.crop_top_left_flipped if self.flip else self.crop_top_left,
            "target_size": self.target_size,
            "flipped": self.flip,
        }


def make_example(
    image: Image.Image,
    original_size: tuple[int, int],
    bucket: tuple[int, int],
    caption: str,
    key: str,
    aug: Augmentation,
    epoch: int,
    index: int,
) -> Example:
    """Resize an upright RGB image to cover its bucket, crop, and draw flip and caption for (epoch, index)."""
    crop_rng = None if aug.center_crop else sample_rng(aug.seed, epoch, index, CROP_STREAM)
    crop, top_left, top_left_flipped = crop_to_bucket(image, original_size, bucket, crop_rng)
    flip = aug.random_flip and bool(sample_rng(aug.seed, epoch, index, FLIP_STREAM).random() < 0.5)
    caption_rng = sample_rng(aug.seed, epoch, index, CAPTION_STREAM)
    return Example(
        pixel_values=to_tensor(crop),
        caption=transform_caption(caption, caption_rng, aug.caption_dropout, aug.shuffle_tags, aug.keep_tokens),
        key=key,
        original_size=original_size,
        crop_top_left=top_left,
        crop_top_left_flipped=top_left_flipped,
        target_size=bucket,
        flip=flip,
    )


def collate(samples: list[dict]) -> dict:
    """Stack samples of one bucket into the batch dict described in the module docstring."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),  # (B, 3, H, W)
        "captions": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),  # (B, 2)
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),  # (B, 2)
        "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),  # (B, 2)
        "keys": [s["key"] for s in samples],
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),  # (B,)
    }


# ----------------------------------------------------------------------------------------------------
# Folder source: a map-style dataset with a reproducible batch plan


def own_generator(seed: int, epoch: int) -> torch.Generator:
    """For a DataLoader's base seed, which it would otherwise draw from torch's global RNG each time an
    epoch starts (shifting LoRA dropout's random numbers, so a resumed run would differ)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class FolderDataset(torch.utils.data.Dataset):
    """Scanned images, bucketed; batches of epoch e are `batches_for_epoch(e)`, loaded by `iter_epoch`.

    With world_size > 1, each global batch of batch_size * world_size samples (one bucket) is split into
    equal contiguous shares, one per rank: every rank runs the same number of batches of the same size,
    the ranks' samples are disjoint, and together they are exactly the batch a single process with
    batch_size * world_size would see (so DDP matches one big-batch process; DESIGN.md oracle 7).
    Items are (epoch, index) pairs, since a sample's augmentation depends on the epoch.
    """

    def __init__(
        self,
        scan: ScanResult,
        buckets: list[tuple[int, int]],
        batch_size: int,
        aug: Augmentation,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.scan, self.buckets, self.batch_size, self.aug = scan, buckets, batch_size, aug
        self.rank, self.world_size = rank, world_size
        self.records = scan.records
        self.bucket_of = [closest_bucket(r.height, r.width, buckets) for r in self.records]
        self._same_bucket = {b: [] for b in set(self.bucket_of)}  # bucket -> its sample indices, ascending
        for index, bucket in enumerate(self.bucket_of):
            self._same_bucket[bucket].append(index)
        self._position = {i: n for members in self._same_bucket.values() for n, i in enumerate(members)}
        self._failed: set[int] = set()  # indices that failed to load in this process
        self._num_batches = len(self.batches_for_epoch(0))  # the same for every epoch

    def global_batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of the epoch, batch_size * world_size samples each (fewer at a bucket's end)."""
        rng = np.random.default_rng([self.aug.seed % 2**64, epoch, ORDER_STREAM])
        return plan_global_batches(self.bucket_of, self.batch_size * self.world_size, self.world_size, rng)

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches of the epoch (sample indices), a pure function of (seed, epoch, data, sizes)."""
        return [rank_share(b, self.rank, self.world_size) for b in self.global_batches_for_epoch(epoch)]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._num_batches

    def load_example(self, index: int, epoch: int) -> Example:
        """Sample `index` as seen in `epoch`, before the flip.

        A file that no longer loads (changed or removed since the scan) is skipped with a warning, and
        the next image of the same bucket (in index order, wrapping around; if none loads, any other image,
        cropped to this bucket) takes its place, so the batch keeps its size and its bucket; the
        replacement is augmented with the skipped slot's (epoch, index) randomness, so the run stays
        deterministic.
        """
        bucket = self.buckets[self.bucket_of[index]]
        same = self._same_bucket[self.bucket_of[index]]
        start = self._position[index]
        others = (i for i, b in enumerate(self.bucket_of) if b != self.bucket_of[index])
        for candidate in chain(same[start:], same[:start], others):
            if candidate in self._failed:
                continue
            record = self.records[candidate]
            try:
                image, original_size = open_rgb(record.path, lambda h, w: cover_size(h, w, bucket))
            except Exception as error:
                self._failed.add(candidate)
                logger.warning("cannot load %s any more, replacing it in its batch: %s", record.path, error)
                continue
            return make_example(image, original_size, bucket, record.caption, record.key, self.aug, epoch, index)
        raise DataError(f"none of the images under {self.scan.root} can be loaded any more; see the warnings above")

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        return self.load_example(index, epoch).to_sample()

    def dataloader(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over batches start, start + 1, ... of the epoch (kwargs: pin_memory, prefetch_factor...)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be a batch position in 0..{len(self)}, got {start}")
        batches = [[(epoch, i) for i in batch] for batch in self.batches_for_epoch(epoch)[start:]]
        return torch.utils.data.DataLoader(
            self, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
            worker_init_fn=ignore_stop_signals, generator=own_generator(self.aug.seed, epoch), **kwargs
        )

    def iter_epoch(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> Iterator[dict]:
        """Collated batches of the epoch from batch position `start` (the resume point) to its end."""
        return iter(self.dataloader(epoch, start, num_workers, **kwargs))

    def fingerprint(self) -> str:
        """A short hash of what defines the batch plan (files, sizes, captions); compare it when resuming."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(f"{record.key}\0{record.height}x{record.width}\0{record.caption}\n".encode())
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        counts = Counter(self.bucket_of)
        return {
            "source": "folder",
            "data_dir": str(self.scan.root),
            "num_images": self.scan.num_images,
            "bad_files": self.scan.bad_files,
            "missing_captions": self.scan.missing_captions,
            "buckets": {f"{h}x{w}": counts[i] for i, (h, w) in enumerate(self.buckets) if counts[i]},
            "batches_per_epoch": len(self),
            "fingerprint": self.fingerprint(),
        }


# ----------------------------------------------------------------------------------------------------
# WebDataset shards: a streamed, shuffled, bucketing iterable dataset


def find_shards(data_dir: str | Path) -> list[str] | None:
    """The .tar shards named by data_dir (brace pattern, one .tar, or a folder of *.tar); None if it names none."""
    text = str(data_dir)
    if "{" in text and text.endswith(".tar"):
        shards = list(braceexpand.braceexpand(text))
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of the {len(shards)} shards of {text} are missing, e.g. {missing[0]}")
        return shards
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if path.is_dir() and not (path / METADATA_FILE).is_file():
        return sorted(str(p) for p in path.glob("*.tar")) or None
    return None


def stable_index(key: str) -> int:
    """A sample's index for the per-sample random streams, from its key (same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def buffered_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Approximate streaming shuffle: keep `size` items, emit a random one for each new item read."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    for pick in rng.permutation(len(buffer)):
        yield buffer[pick]


def split_for_slot(shards: list[str], slot: int, num_slots: int) -> tuple[list[str], int, int]:
    """This reader's shards and sample filter (keep sample n when n % stride == offset).

    A reader is one DataLoader worker of one rank. With at least as many shards as readers, shards are
    dealt out; otherwise every reader streams every shard and keeps every num_slots-th sample.
    """
    if len(shards) >= num_slots:
        return shards[slot::num_slots], 1, 0
    return shards, num_slots, slot


class ShardDataset(torch.utils.data.IterableDataset):
    """WebDataset shards streamed as collated single-bucket batches; `iter_epoch(epoch)` runs one epoch.

    Per epoch, the shard list is shuffled with (seed, epoch) and dealt out to (rank, worker) readers
    (disjoint across ranks); each reader shuffles its samples with a buffer of `shuffle_buffer` samples,
    decodes them, puts each into its bucket's pending list, and yields a batch whenever a bucket holds
    batch_size images; at the end of the epoch the incomplete batches are yielded too (smaller).
    Undecodable samples are skipped with a warning. Order is reproducible for the same seed, epoch,
    world_size and num_workers; ranks may get different numbers of batches (fix steps per epoch for DDP).
    """

    def __init__(
        self,
        shards: list[str],
        buckets: list[tuple[int, int]],
        batch_size: int,
        aug: Augmentation,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
    ):
        self.shards, self.buckets, self.batch_size, self.aug = shards, buckets, batch_size, aug
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.epoch = 0
        if len(shards) < world_size:
            logger.warning("%d shards for %d ranks: each rank reads all shards; write more", len(shards), world_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration streams (shard order, shuffle buffer and augmentation depend on it)."""
        self.epoch = epoch

    def _samples(self) -> Iterator[dict]:
        """Raw samples (dicts of member bytes) of this reader, shuffled, for self.epoch."""
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        order = np.random.default_rng([self.aug.seed % 2**64, self.epoch, ORDER_STREAM]).permutation(len(self.shards))
        slot, num_slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        shards, stride, offset = split_for_slot([self.shards[i] for i in order], slot, num_slots)
        samples = tarfile_samples([{"url": s} for s in shards], handler=_warn_and_continue)
        mine = (s for n, s in enumerate(samples) if n % stride == offset)
        rng = np.random.default_rng([self.aug.seed % 2**64, self.epoch, slot, SHARD_STREAM])
        return buffered_shuffle(mine, self.shuffle_buffer, rng)

    def _example(self, sample: dict) -> Example | None:
        """Decode one raw sample into its bucket; None (with a warning) if it has no readable image."""
        key = f"{Path(sample['__url__']).name}/{sample['__key__']}"
        member = next((ext for ext in ("jpg", "jpeg", "png", "webp") if ext in sample), None)
        if member is None:
            logger.warning("skipping %s: no jpg/jpeg/png/webp member (has %s)", key, sorted(sample))
            return None
        if "txt" not in sample:
            logger.warning("no caption: %s (training it with an empty caption)", key)
        caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()

        def resize_to(h: int, w: int) -> tuple[int, int]:
            return cover_size(h, w, self.buckets[closest_bucket(h, w, self.buckets)])

        try:
            image, original_size = open_rgb(io.BytesIO(sample[member]), resize_to)
        except Exception as error:
            logger.warning("skipping %s: cannot decode its %s (%s)", key, member, error)
            return None
        bucket = self.buckets[closest_bucket(*original_size, self.buckets)]
        return make_example(image, original_size, bucket, caption, key, self.aug, self.epoch, stable_index(key))

    def __iter__(self) -> Iterator[dict]:
        examples = (e for e in map(self._example, self._samples()) if e is not None)
        samples = (e.to_sample() for e in examples)
        for batch in group_by_bucket(samples, lambda s: s["target_size"], self.batch_size):
            yield collate(batch)

    def iter_epoch(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> Iterator[dict]:
        """Collated batches of the epoch, skipping the first `start` (decoded again; same num_workers needed)."""
        self.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers,
                                             worker_init_fn=ignore_stop_signals,
                                             generator=own_generator(self.aug.seed, epoch), **kwargs)
        return islice(iter(loader), start, None)

    def summary(self) -> dict:
        return {
            "source": "webdataset",
            "shards": len(self.shards),
            "num_images": None,  # unknown until streamed
            "bad_files": [],
            "missing_captions": [],
            "buckets": {f"{h}x{w}": None for h, w in self.buckets},
        }


def _warn_and_continue(error: Exception) -> bool:
    logger.warning("skipping unreadable shard data: %s", error)
    return True


# ----------------------------------------------------------------------------------------------------


def build_dataset(
    data_dir: str | Path,
    resolution: int,
    batch_size: int,
    bucketing: bool = True,
    center_crop: bool = False,
    random_flip: bool = False,
    caption_dropout: float = 0.0,
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
) -> FolderDataset | ShardDataset:
    """The training dataset for data_dir (a folder, a metadata.jsonl folder, or .tar shards); see the module doc.

    bucketing=False trains at a fixed resolution x resolution: short side resized to it, then cropped.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if not 0.0 <= caption_dropout <= 1.0 or keep_tokens < 0:
        raise ValueError(f"need 0 <= caption_dropout <= 1 and keep_tokens >= 0, got {caption_dropout}, {keep_tokens}")
    if resolution % 32 or resolution < 64:
        raise ValueError(f"resolution {resolution} must be a multiple of 32 and at least 64 (VAE /8, UNet /4)")
    buckets = make_buckets(resolution) if bucketing else [(resolution, resolution)]
    aug = Augmentation(center_crop, random_flip, caption_dropout, shuffle_tags, keep_tokens, seed)
    shards = find_shards(data_dir)
    if shards is not None:
        dataset = ShardDataset(shards, buckets, batch_size, aug, rank, world_size, shuffle_buffer)
        logger.info("training data: %d webdataset shards from %s", len(shards), data_dir)
        return dataset
    dataset = FolderDataset(scan_folder(data_dir, max_bad_fraction), buckets, batch_size, aug, rank, world_size)
    summary = dataset.summary()
    logger.info(
        "training data: %d images (%d bad, %d without caption) in buckets %s; %d batches per epoch",
        summary["num_images"],
        len(summary["bad_files"]),
        len(summary["missing_captions"]),
        summary["buckets"],
        summary["batches_per_epoch"],
    )
    return dataset
