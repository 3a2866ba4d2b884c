"""Reading image files the way training and evaluation both do: finding them in a folder, their captions,
and decoding any of them (EXIF rotation, 16-bit, CMYK, palette, transparency) to upright 8-bit RGB.
"""

import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

from common.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_FILE = "metadata.jsonl"
CAPTIONS_FILE = "captions.json"  # COCO captions, as generate_images.py writes (sampling/captions.py)


def link_outside(path, root) -> str | None:
    """Where `path` really is when a link takes it out of the folder `root` (the path a link leads to); None when it
    lies inside (links that stay inside are fine)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real if os.path.commonpath([top, real]) != top else None


def find_images(root: Path, links_outside: list | None = None) -> list[Path]:
    """Image files under `root`, recursively (symlinked folders followed once), sorted by relative path. Folder
    links that leave `root` are skipped with a warning (and added to `links_outside` as (path, target))."""
    found, seen_dirs, top = [], set(), os.path.realpath(root)
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs or os.path.commonpath([top, real]) != top:  # a loop, a folder linked twice, or out
            if real not in seen_dirs:
                logger.warning("skipping %s: a link to %s, outside %s (the scan stays inside the data folder)",
                               folder, real, root)
                if links_outside is not None:
                    links_outside.append((folder, real))
            elif os.path.islink(folder):
                logger.warning("skipping %s: a link to %s, which is scanned already (a link loop or a second link)",
                               folder, real)
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


def read_coco_captions(folder: Path) -> dict[str, str] | None:
    """Captions from folder/captions.json (COCO: `images` with id and file_name, `annotations` with image_id and
    caption), keyed by file_name (relative to the folder; an image's first caption); None without such a file, or
    when it is not a COCO captions file (a warning)."""
    path = Path(folder) / CAPTIONS_FILE
    if not path.is_file():
        return None
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        names = {image["id"]: PurePosixPath(str(image["file_name"]).replace("\\", "/")).as_posix()
                 for image in coco["images"]}
        captions: dict[str, str] = {}
        for annotation in coco["annotations"]:
            name = names.get(annotation["image_id"])
            if name is not None and isinstance(annotation.get("caption"), str):
                captions.setdefault(name, annotation["caption"].strip())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        logger.warning("ignoring %s: not a COCO captions file (%s: %s)", path, type(error).__name__, error)
        return None
    return captions


def read_caption(path: Path, metadata: dict[str, str | None] | None, key: str, extension: str = ".txt") -> str | None:
    """The caption of an image: metadata.jsonl first, then the same-stem caption file (`extension`, e.g. .txt or
    .caption); None if neither has one."""
    if metadata is not None and metadata.get(key) is not None:
        return metadata[key].strip()
    text_file = path.with_suffix(extension)
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8", errors="replace").strip()
    return None


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
