"""One batched pass over a set of images: Inception features, CLIP cosines and small square thumbnails.

Each image is decoded once (on a thread pool, PIL releases the GIL) and turned into what each metric needs:
- Inception-v3: the whole image resized to 299x299 (`inception.inception_input`), run in batches;
- CLIP: the PIL image and its prompt, through the CLIP folder's own processor (`clip.ClipScorer`);
- SSIM, MS-SSIM, LPIPS: a thumbnail, the largest centered square resized to `thumbnail_size` with PIL's
  antialiased bicubic filter (`square_thumbnail`), kept in memory as uint8: 3 * size^2 bytes per image
  (192 KiB at 256 px; 1 GiB per 5,500 images), so that pairs can be compared without decoding again.
Images that cannot be decoded are skipped, each named in one warning, and left out of `kept`.
"""

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation.clip import ClipScorer
from evaluation.inception import InceptionFeatures, inception_input


@dataclass
class Extracted:
    """What one pass found, row i belonging to input image kept[i]."""

    kept: list[int]  # indices of the decodable inputs
    features: torch.Tensor | None  # (N, D) float32 Inception features, on the CPU
    thumbnails: torch.Tensor | None  # (N, 3, S, S) uint8, on the CPU
    cosines: torch.Tensor | None  # (N,) float32 CLIP cosines; NaN where an image has no prompt
    skipped: list[tuple[int, str]]  # (input index, reason)


def square_thumbnail(image: Image.Image, size: int) -> torch.Tensor:
    """8-bit RGB PIL image -> uint8 (3, size, size): the centered square crop, bicubic-resized."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.crop((left, top, left + side, top + side)) if (w, h) != (side, side) else image
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def extract(
    load: Callable[[int], Image.Image | str],
    count: int,
    prompts: Sequence[str | None] | None = None,
    inception: InceptionFeatures | None = None,
    clip: ClipScorer | None = None,
    thumbnail_size: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    description: str = "images",
    on_skip: Callable[[int, str], None] | None = None,
) -> Extracted:
    """Run `load(i)` (a PIL RGB image, or why it cannot be used) for i < count through the requested networks."""
    features, thumbnails, cosines, kept, skipped = [], [], [], [], []
    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=count, desc=description, unit="img") as bar:
        for start in range(0, count, batch_size):
            indices = list(range(start, min(start + batch_size, count)))
            batch = []
            for i, image in zip(indices, pool.map(load, indices), strict=True):
                if isinstance(image, str):
                    skipped.append((i, image))
                    if on_skip is not None:
                        on_skip(i, image)
                else:
                    batch.append((i, image))
            bar.update(len(indices))
            if not batch:
                continue
            kept += [i for i, _ in batch]
            images = [image for _, image in batch]
            if inception is not None:
                pixels = torch.stack(list(pool.map(inception_input, images)))  # (B, 3, 299, 299) uint8
                features.append(inception(pixels.to(device)).cpu())
            if thumbnail_size is not None:
                thumbnails.append(torch.stack([square_thumbnail(image, thumbnail_size) for image in images]))
            if clip is not None and prompts is not None:
                cosines.append(_clip_cosines(clip, images, [prompts[i] for i, _ in batch]))
    return Extracted(
        kept=kept,
        features=torch.cat(features) if inception is not None and features else None,
        thumbnails=torch.cat(thumbnails) if thumbnails else None,
        cosines=torch.cat(cosines) if cosines else None,
        skipped=skipped,
    )


def _clip_cosines(clip: ClipScorer, images: list[Image.Image], prompts: list[str | None]) -> torch.Tensor:
    """CLIP cosines of a batch; NaN for images without a prompt."""
    out = torch.full((len(images),), float("nan"))
    have = [j for j, p in enumerate(prompts) if p]
    if have:
        out[have] = clip.cosines([images[j] for j in have], [prompts[j] for j in have])
    return out
