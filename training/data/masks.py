"""Masked loss (--masked_loss): a grey-level mask per training image weights the loss of each latent pixel, so
only the masked subject is learned (white = train, black = ignore).

Where the mask of `photo.png` comes from: `photo_mask.png` beside it; or `MASK_DIR/photo.png` (--mask_dir); or
the image's own alpha channel (--alpha_mask). An image without one trains everywhere (a mask of ones).
The mask goes through exactly its image's geometry: the same resize to cover the bucket, the same crop (random or
centered), the same flip (`Example.to_sample`); then it is averaged over each 8x8 pixel block, onto the latent grid.
The per-pixel squared error is weighted by it and normalised by its mean, so a mask of ones is the plain loss and
a small mask weighs as much as a large one (as kohya-ss/sd-scripts' masked loss).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from common.errors import DataError
from common.images import link_outside
from training.data.buckets import cover_size

logger = logging.getLogger(__name__)
MASK_SUFFIX = "_mask.png"
LATENT_FACTOR = 8  # pixels per latent pixel (the VAE's downsampling)


@dataclass(frozen=True)
class MaskSource:
    mask_dir: Path | None = None  # masks named like their image's file, .png, in this folder
    alpha: bool = False  # the image's alpha channel


def mask_file(image: Path, source: MaskSource) -> Path:
    return source.mask_dir / f"{image.stem}.png" if source.mask_dir else image.with_name(image.stem + MASK_SUFFIX)


def is_mask_file(path: str, source: MaskSource | None) -> bool:
    """Whether a file the scan found is a mask beside its image, not a training image."""
    return source is not None and source.mask_dir is None and not source.alpha and path.endswith(MASK_SUFFIX)


def check_masks(scan, source: MaskSource) -> None:
    """Every mask file has its image's size (headers only, at the scan: a wrong mask stops the run before it starts).
    An image whose mask file is a link out of its folder (the data folder, or --mask_dir) is skipped with a warning
    naming it, as an image whose caption is such a link (training/data/scan.py); `scan.records` keeps the others."""
    beside = dict(scan.links_outside)  # `_mask.png` files the scan skipped as links out of the data folder
    kept = []
    for record in scan.records:
        path = Path(record.path)
        mask_path = mask_file(path, source)
        if source.alpha:
            kept.append(record)
            continue
        if source.mask_dir is None:
            target = beside.get(str(mask_path))
        else:
            target = link_outside(mask_path, source.mask_dir) if mask_path.exists() else None
            if target is not None:
                scan.links_outside.append((str(mask_path), target))
        if target is not None:
            folder = source.mask_dir or "the data folder"
            logger.warning("skipping %s: its mask %s is a link to %s, outside %s (masks are read only inside it; copy "
                           "the mask in)", path, mask_path, target, folder)
            continue
        kept.append(record)
        if not mask_path.is_file():
            continue
        with Image.open(mask_path) as mask:
            w, h = mask.size
        if (h, w) != (record.height, record.width):
            raise DataError(f"mask {mask_path} is {w}x{h} but its image {path} is {record.width}x{record.height}; "
                            "give a mask of the image's size")
    if not kept:
        raise DataError("none of the images can be used: each one's mask is a link out of its folder; see the "
                        "warnings above")
    scan.records = kept


def read_mask(image_path: str, source: MaskSource) -> Image.Image | None:
    """The upright 8-bit mask of an image ("L", the image's displayed size), or None where it has none."""
    path = Path(image_path)
    if source.alpha:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            if "A" not in upright.getbands() and "transparency" not in upright.info:
                return None
            return upright.convert("RGBA").getchannel("A")
    mask_path = mask_file(path, source)
    if not mask_path.is_file():
        return None
    with Image.open(mask_path) as mask, Image.open(path) as image:
        mask, size = ImageOps.exif_transpose(mask).convert("L"), ImageOps.exif_transpose(image).size
    if mask.size != size:
        raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {path} is "
                        f"{size[0]}x{size[1]}; give a mask of the image's size")
    return mask


def mask_crop(mask: Image.Image | None, original_size: tuple[int, int], bucket: tuple[int, int],
              top_left: tuple[int, int]) -> torch.Tensor:
    """uint8 (1, H, W): the mask resized to cover the bucket and cropped at `top_left`, as its image was
    (`buckets.crop_to_bucket`); all 255 where there is no mask."""
    if mask is None:
        return torch.full((1, *bucket), 255, dtype=torch.uint8)
    resized = cover_size(*original_size, bucket)  # (h, w)
    if mask.size != (resized[1], resized[0]):
        mask = mask.resize((resized[1], resized[0]), Image.Resampling.LANCZOS)
    top, left = top_left
    crop = mask.crop((left, top, left + bucket[1], top + bucket[0]))
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy())[None]


def latent_mask(masks: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, H, W) masks -> float (B, 1, H/8, W/8) in [0, 1]: the mean of each 8x8 block."""
    return F.avg_pool2d(masks.float() / 255, LATENT_FACTOR)


def masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of per_pixel (B, C, h, w) weighted by mask (B, 1, h, w), normalised by the mask's mean."""
    return (per_pixel * mask).mean(dim=(1, 2, 3)) / mask.mean(dim=(1, 2, 3)).clamp_min(1e-6)
