"""The start-up scan of a data source: every image of a folder (or metadata.jsonl) found, checked and captioned,
and the unusable ones named, before any model loads; and the shard list of a WebDataset source.

Sources, detected from `data_dir` (see training/data/datasets.py, `build_dataset`):
- a folder of .jpg/.jpeg/.png/.webp images (any letter case, recursive; hidden files and folders are
  skipped) with same-stem .txt captions, or with a `metadata.jsonl` ({"file_name": "sub/a.png",
  "text": "..."} per line) whose captions take precedence over .txt files;
- WebDataset .tar shards (a folder holding *.tar, a single .tar, or a brace pattern "data-{000..099}.tar")
  with jpg|jpeg|png|webp + txt members (streamed; their samples are checked as they are decoded).

Folder sources are scanned once (`scan_folder`): every image header is read and every image checked for
truncation, so broken files are reported, with their paths, before training starts; more than
`max_bad_fraction` of them stops the run.

Nothing outside the data folder is read: a link (to a folder, an image, a caption file or metadata.jsonl) that leads
out of it is skipped with a warning naming it and where it leads, and counted (`links_outside`); an image whose
caption file is such a link is skipped too (rather than trained without the caption it was meant to have), so a
caption linked to e.g. /etc/passwd never reaches the LoRA's `ss_tag_frequency` metadata. Links that stay inside
the folder are followed. Empty captions are counted and noted once.
"""

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.errors import DataError
from common.images import (
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    exif_orientation,
    find_images,
    link_outside,
    read_caption,
    read_metadata,
)

logger = logging.getLogger(__name__)

MAX_CAPTION_WARNINGS = 50  # "no caption" warnings printed one by one; the rest are summed up in one line
PROGRESS_MIN_FILES = 500  # show a progress bar for scans of at least this many files


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
    links_outside: list[tuple[str, str]] = field(default_factory=list)  # (path, target) skipped: leaving the folder
    empty_captions: list[str] = field(default_factory=list)  # paths of images whose caption is there but empty

    @property
    def num_images(self) -> int:
        return len(self.records)


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


def scan_folder(data_dir: str | Path, max_bad_fraction: float = 0.05, caption_extension: str = ".txt") -> ScanResult:
    """Check every image under data_dir before training; raise DataError if too many are unusable. Captions come
    from metadata.jsonl or same-stem `caption_extension` files. Links out of data_dir are skipped (module doc)."""
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data_dir {root} does not exist or is not a folder; pass a folder of images or .tar shards")
    links: list[tuple[str, str]] = []  # (path, target): links out of root, skipped
    found = find_images(root, links)
    paths = [p for p in found if not _outside(p, root, links)]
    metadata = None if _outside(root / METADATA_FILE, root, links) else read_metadata(root)
    if not paths:
        skipped = f" ({len(links)} links leading outside it were skipped: give the folder they lead to, or copy the " \
                  "files in)" if links else ""
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}{skipped}; check the data_dir "
                        "path")

    def check(path: Path) -> tuple[tuple[int, int] | str, str | None, str | None]:
        key = path.relative_to(root).as_posix()
        text_file = path.with_suffix(caption_extension)
        if (metadata is None or metadata.get(key) is None) and (target := link_outside(text_file, root)) \
                and text_file.exists():
            return "", None, target  # its caption would be read from outside the folder: not read, image skipped
        return probe_image(path), read_caption(path, metadata, key, caption_extension), None

    records, bad_files, missing_captions, empty_captions = [], [], [], []
    for path, (size, caption, target) in zip(paths, map_in_threads(check, paths, "scanning images"), strict=True):
        if target is not None:
            text_file = path.with_suffix(caption_extension)
            logger.warning("skipping %s: its caption %s is a link to %s, outside %s (the scan stays inside the data "
                           "folder; copy the caption in)", path, text_file, target, root)
            links.append((str(text_file), target))
            continue
        if isinstance(size, str):
            logger.warning("bad image, excluded from training: %s (%s)", path, size)
            bad_files.append((str(path), size))
            continue
        if caption is None:
            if len(missing_captions) < MAX_CAPTION_WARNINGS:
                logger.warning("no caption: %s (training it with an empty caption)", path)
            missing_captions.append(str(path))
        elif not caption:
            empty_captions.append(str(path))
        records.append(ImageRecord(str(path), path.relative_to(root).as_posix(), caption or "", *size))
    if len(missing_captions) > MAX_CAPTION_WARNINGS:
        logger.warning("... and %d more images have no caption", len(missing_captions) - MAX_CAPTION_WARNINGS)
    if empty_captions:
        shown = ", ".join(empty_captions[:3]) + (", ..." if len(empty_captions) > 3 else "")
        logger.warning("note: %d of %d images have an empty caption (%s); they train with an empty caption",
                       len(empty_captions), len(records), shown)
    listed = {p.relative_to(root).as_posix() for p in found}  # links skipped above are not "missing"
    for key in sorted(set(metadata or {}) - listed):
        problem = "is not a .jpg/.jpeg/.png/.webp image" if (root / key).exists() else "does not exist"
        reason = f"listed in {METADATA_FILE} but {problem}"
        logger.warning("bad image, excluded from training: %s (%s)", root / key, reason)
        bad_files.append((str(root / key), reason))
    check_bad_fraction(root, bad_files, len(records) + len(bad_files), max_bad_fraction)
    if not records:
        raise DataError(f"none of the images under {root} can be used; see the warnings above")
    return ScanResult(root, records, bad_files, missing_captions, links, empty_captions)


def _outside(path: Path, root: Path, links: list[tuple[str, str]]) -> bool:
    """Whether a file under the data folder is a link out of it: then it is named (a warning) and counted."""
    if not path.exists() or (target := link_outside(path, root)) is None:
        return False
    logger.warning("skipping %s: a link to %s, outside %s (the scan stays inside the data folder)", path, target, root)
    links.append((str(path), target))
    return True


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
