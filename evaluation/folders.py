"""The two image folders of an evaluation: finding their images, reading prompts, decoding, and grouping.

A folder is any tree of .jpg/.jpeg/.png/.webp files (any letter case, recursive, hidden files and folders
skipped: the same scan as training, `common.images.find_images`), for example our COCO-style output
(00000.png + 00000.txt prompt + 00000.json sidecar, see `sampling/writer.py`) or a class-folder dataset
(`real/wound/a.png`, `real/healthy/b.png`).

The prompt of an image is, in this order: its caption in a captions.json (COCO captions, as generate_images.py
writes; the nearest one in its folder or above it that lists the image), the "prompt" of its same-stem .json
sidecar, its caption in the folder's metadata.jsonl, its same-stem .txt file; None if it has none.

Decoding is training's (`common.images.open_rgb`): EXIF rotation applied, then 8-bit RGB
(16-bit scaled down, transparency composited on white, CMYK/gray/palette converted). A file that cannot be
decoded is skipped with one warning that names it and says why, as training does.

Groups (`make_groups`): always the whole set ("all"), plus
- by "folder": one group per top-level subfolder of GENERATED, compared with REAL's subfolder of the same
  name (images directly in the folder form the group "(top level)");
- by "prompt": one group per prompt of GENERATED, compared with the REAL images of the same prompt when REAL
  has any, else with all of REAL.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.errors import EvalError
from common.images import IMAGE_EXTENSIONS, find_images, open_rgb, read_caption, read_coco_captions, read_metadata

logger = logging.getLogger(__name__)

ALL = "all"
TOP_LEVEL = "(top level)"
NO_PROMPT = "(no prompt)"


@dataclass(frozen=True)
class ImageFile:
    path: Path
    key: str  # path relative to the folder, posix separators
    prompt: str | None

    @property
    def folder(self) -> str:
        """The top-level subfolder this image is in (its class, in a class-folder dataset)."""
        parts = self.key.split("/")
        return parts[0] if len(parts) > 1 else TOP_LEVEL


@dataclass
class ImageFolder:
    """The images found under `root` (sorted by key); `skipped` collects (path, reason) of undecodable ones."""

    root: Path
    files: list[ImageFile]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_prompt(path: Path, metadata: dict[str, str | None] | None, key: str, coco: str | None = None) -> str | None:
    """The prompt of one image: `coco` (its caption in a captions.json), else the .json sidecar's "prompt", then
    metadata.jsonl, then the .txt file."""
    if coco is not None:
        return coco
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            prompt = json.loads(sidecar.read_text(encoding="utf-8")).get("prompt")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            prompt = None  # not one of our sidecars: fall back to the captions
        if isinstance(prompt, str):
            return prompt.strip()
    return read_caption(path, metadata, key)


def scan_folder(path: str | Path, flag: str) -> ImageFolder:
    """The images under `path` with their prompts; EvalError (naming `flag`) if it is not a folder of images."""
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise EvalError(f"{flag} {root} {what}; give a folder of images (searched recursively)")
    paths = find_images(root)
    if not paths:
        raise EvalError(f"{flag} {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively); "
                        "check the path")
    metadata, coco = read_metadata(root), {}
    files = []
    for p in paths:
        key = p.relative_to(root).as_posix()
        files.append(ImageFile(p, key, read_prompt(p, metadata, key, _coco_caption(p, root, coco))))
    return ImageFolder(root, files)


def _coco_caption(path: Path, root: Path, found: dict[Path, dict[str, str] | None]) -> str | None:
    """The caption of `path` in the nearest captions.json from its folder up to `root` that lists it (`found`:
    the files read so far)."""
    for folder in [path.parent, *path.parent.parents]:
        if folder not in found:
            found[folder] = read_coco_captions(folder)
        name = path.relative_to(folder).as_posix()
        if found[folder] is not None and name in found[folder]:
            return found[folder][name]
        if folder == root:
            return None
    return None


def decode(path: Path) -> Image.Image | str:
    """The image as upright 8-bit RGB, or the reason it cannot be used (the wording of training's scan)."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return open_rgb(path)[0]
    except UnidentifiedImageError:
        return "not an image (PIL cannot identify the file)"
    except Exception as error:
        return f"corrupt or truncated: {type(error).__name__}: {error}".replace("\n", " ")


def warn_skipped(path: Path, reason: str) -> None:
    logger.warning("unreadable image, skipped: %s (%s)", path, reason)


# ---------------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class Group:
    """One row of the report: generated images and the real images they are compared with (indices)."""

    name: str
    real: list[int]
    generated: list[int]
    compared_with: str  # which real images, in words
    whole_real_set: bool = False  # compared with all real images for want of its own (a prompt REAL lacks)


def make_groups(real: list[ImageFile], generated: list[ImageFile], by: str) -> tuple[list[Group], list[str]]:
    """The whole set plus the groups of `by` ("folder", "prompt" or "none"), and notes about unmatched ones."""
    everything = Group(ALL, list(range(len(real))), list(range(len(generated))), "all real images")
    if by == "none":
        return [everything], []
    if by not in ("folder", "prompt"):
        raise ValueError(f"groups must be folder, prompt or none, got {by!r}")

    def key(f: ImageFile) -> str:
        return f.folder if by == "folder" else (f.prompt if f.prompt else NO_PROMPT)

    real_by, gen_by = _index_by(real, key), _index_by(generated, key)
    groups, notes = [everything], []
    for name in sorted(gen_by):
        shown = name if name != ALL else f"{name} ({by})"  # the row "all" is the whole set's
        if name in real_by:
            same = "real subfolder of the same name" if by == "folder" else "real images of the same prompt"
            groups.append(Group(shown, real_by[name], gen_by[name], same))
        elif by == "folder":
            groups.append(Group(shown, [], gen_by[name], "none: REAL has no subfolder of this name"))
        else:
            groups.append(Group(shown, everything.real, gen_by[name], "all real images (none has this prompt)",
                                whole_real_set=True))
    if by == "folder":
        missing = sorted(set(real_by) - set(gen_by))
        if missing:
            notes.append(f"real subfolders without generated images: {', '.join(missing)}")
        if set(gen_by) == {TOP_LEVEL}:
            notes.append("GENERATED has no subfolders: --groups folder gives only the whole set")
            groups = [everything]
    return groups, notes


def _index_by(files: list[ImageFile], key) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        out.setdefault(key(f), []).append(i)
    return out
