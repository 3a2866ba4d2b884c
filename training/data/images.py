"""One training sample: an image file decoded to upright 8-bit RGB (common/images.py), resized and cropped to its
bucket, flipped, its caption dropped out or tag-shuffled; and samples of one bucket collated into a batch.

Every optimizer micro-batch is a dict (B images of one bucket (H, W)):
    pixel_values   uint8 (B, 3, H, W): 4x less to ship from the loader's workers than float; `to_unit` on the
                   device turns them into the VAE's [-1, 1]. Absent when the latents are cached (nothing decoded)
    captions       list[str]         after caption dropout and tag shuffling
    original_size  int64 (B, 2)      (h, w) of the image as displayed (EXIF rotation applied), before resizing
    crop_top_left  int64 (B, 2)      (top, left) of the crop in the resized image (the mirrored one if flipped)
    target_size    int64 (B, 2)      (H, W), the bucket
    keys           list[str]         stable sample id: path relative to data_dir, or "<shard file>/<key>"
    flipped        bool (B,)
    masks          uint8 (B, 1, H, W) with --masked_loss: each image's mask, cropped and flipped as its image
and SDXL's micro-conditioning (Podell et al. 2023, "SDXL", section 2.2) is
`time_ids = original_size + crop_top_left + target_size`.

Flip and crop: the crop (top, left) is chosen in the resized, unflipped image; a flipped sample is that
crop mirrored, which is exactly the crop of the mirrored image at left' = resized_w - W - left, so that
is the crop_top_left it reports (`buckets.flipped_crop_offset`); SDXL conditions on what the UNet sees.

Each sample's crop, flip, caption dropout and tag order are a pure function of (seed, epoch, sample index),
drawn from their own numpy generators (`sample_rng`), never from global RNG state: what makes a resumed run
exact with any number of DataLoader workers.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from training.data.buckets import crop_geometry, crop_to_bucket
from training.data.captions import CaptionStyle
from training.data.captions import shuffle_tags as shuffle_caption_tags

# Independent random streams of one sample, seeded by (seed, epoch, index, stream).
CROP_STREAM, FLIP_STREAM, CAPTION_STREAM = 1, 2, 3


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], what the VAE encodes (on whatever device `pixels` are)."""
    return pixels.float() / 127.5 - 1.0


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
    captions: CaptionStyle = field(default_factory=CaptionStyle)  # their file extension, trigger words, separator


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample index, stream): no global RNG state involved."""
    return np.random.default_rng([seed % 2**64, epoch, index, stream])


def transform_caption(caption: str, rng: np.random.Generator, dropout: float, shuffle_tags: bool, keep: int,
                      separator: str = "") -> str:
    """Caption dropout (-> ""), then optionally shuffle comma-separated tags, the first `keep` (or those before
    `separator`) staying in place."""
    if rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    return shuffle_caption_tags(caption, rng, keep, separator)


@dataclass
class Example:
    """One sample before the flip: the unflipped crop and both crop offsets (a latent cache can store both flips)."""

    pixel_values: torch.Tensor | None  # uint8 (3, H, W), unflipped; None when not decoded
    caption: str
    key: str
    original_size: tuple[int, int]  # (h, w)
    crop_top_left: tuple[int, int]  # (top, left) of this crop in the resized image
    crop_top_left_flipped: tuple[int, int]  # the same for the mirrored crop in the mirrored resized image
    target_size: tuple[int, int]  # (H, W)
    flip: bool  # whether this (seed, epoch, index) trains on the mirrored crop
    mask: torch.Tensor | None = None  # uint8 (1, H, W) of --masked_loss: the same crop, unflipped (data/masks.py)

    def to_sample(self) -> dict:
        """The training sample: mirrored (pixels and crop offset) when `flip`."""
        return {
            "pixel_values": None if self.pixel_values is None else self.pixel_values.flip(-1) if self.flip
            else self.pixel_values,
            "caption": self.caption,
            "key": self.key,
            "original_size": self.original_size,
            "crop_top_left": self.crop_top_left_flipped if self.flip else self.crop_top_left,
            "target_size": self.target_size,
            "flipped": self.flip,
            **({} if self.mask is None else {"mask": self.mask.flip(-1) if self.flip else self.mask}),
        }


def make_example(
    image: Image.Image | None,
    original_size: tuple[int, int],
    bucket: tuple[int, int],
    caption: str,
    key: str,
    aug: Augmentation,
    epoch: int,
    index: int,
) -> Example:
    """Resize an upright RGB image to cover its bucket, crop, and draw flip and caption for (epoch, index).
    With `image` None, the same without pixels (when the latents are cached)."""
    crop_rng = None if aug.center_crop else sample_rng(aug.seed, epoch, index, CROP_STREAM)
    if image is None:
        crop, (_, top_left, top_left_flipped) = None, crop_geometry(original_size, bucket, crop_rng)
    else:
        crop, top_left, top_left_flipped = crop_to_bucket(image, original_size, bucket, crop_rng)
    flip = aug.random_flip and bool(sample_rng(aug.seed, epoch, index, FLIP_STREAM).random() < 0.5)
    caption_rng = sample_rng(aug.seed, epoch, index, CAPTION_STREAM)
    return Example(
        pixel_values=None if crop is None else to_tensor(crop),
        caption=transform_caption(caption, caption_rng, aug.caption_dropout, aug.shuffle_tags, aug.keep_tokens,
                                  aug.captions.separator),
        key=key,
        original_size=original_size,
        crop_top_left=top_left,
        crop_top_left_flipped=top_left_flipped,
        target_size=bucket,
        flip=flip,
    )


def collate(samples: list[dict]) -> dict:
    """Stack samples of one bucket into the batch dict described in the module docstring."""
    pixels = {} if samples[0]["pixel_values"] is None else {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples])}  # uint8 (B, 3, H, W)
    return {
        **pixels,
        "captions": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),  # (B, 2)
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),  # (B, 2)
        "target_size": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),  # (B, 2)
        "keys": [s["key"] for s in samples],
        "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),  # (B,)
        **({"masks": torch.stack([s["mask"] for s in samples])} if "mask" in samples[0] else {}),  # uint8 (B, 1, H, W)
        # (epoch, step, position in the step) of each sample (folder data): what its noise and time are drawn from
        **({"noise_keys": torch.tensor([s["noise_key"] for s in samples], dtype=torch.long)}  # (B, 3)
           if "noise_key" in samples[0] else {}),
    }


ORDER_STREAM = 0x0D3D  # the random stream of an epoch's order (folder batch plan, shard order)


def own_generator(seed: int, epoch: int) -> torch.Generator:
    """For a DataLoader's base seed, which it would otherwise draw from torch's global RNG each time an
    epoch starts (shifting LoRA dropout's random numbers, so a resumed run would differ)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)
