"""captions.json: the output folder as a COCO captions file, for tools that read COCO (pycocotools, dataset
loaders), beside the numbered png/txt/json groups (sampling/writer.py).

    {"info": {"description": "...", "format_version": 1}, "licenses": [],
     "images":      [{"id": 0, "file_name": "00000.png", "width": 1024, "height": 1024}, ...],
     "annotations": [{"id": 0, "image_id": 0, "caption": "a red circle"}, ...]}

It lists exactly the complete groups of the folder (a .png with its .txt, the marker written last), each once,
in index order, with id = image_id = the image index and the caption = the .txt. It is only ever rewritten whole
(`atomic_write`), by one process (rank 0 under torchrun): at the start of a run from the complete groups on disk
less those the run is about to remake, as batches complete (every batch while the file is small, then once
the set has grown by 5%: a few hundred rewrites even for 100,000 images), and at the end from the groups on
disk, every rank's. So after a kill -9 it lists only complete images, perhaps not yet the last few,
and the next run of the folder (even one with nothing to make) brings it up to date.
"""

import json
from pathlib import Path

from PIL import Image

from common.files import atomic_write
from common.images import CAPTIONS_FILE

FORMAT_VERSION = 1
GROWTH = 0.05  # rewrite once the images not yet in the file are this fraction of those in it (or more)


def group_index(name: str) -> int | None:
    """The index of an output file's stem (`00012.txt` -> 12); None for any other name."""
    stem = name.rpartition(".")[0]
    return int(stem) if stem.isdigit() and stem == f"{int(stem):05d}" else None


class Captions:
    """captions.json of an output folder as the run knows it: index -> (width, height, caption)."""

    def __init__(self, out_dir, leave_out=()):
        """The complete groups on disk now, less the indices in `leave_out` (about to be remade)."""
        self.path = Path(out_dir) / CAPTIONS_FILE
        self.entries: dict[int, tuple[int, int, str]] = {}
        names = {p.name for p in Path(out_dir).iterdir()} if Path(out_dir).is_dir() else set()
        skip = set(leave_out)
        for name in names:
            index = group_index(name)
            if index is None or index in skip or not name.endswith(".txt") or name[:-4] + ".png" not in names:
                continue
            png, txt = Path(out_dir) / (name[:-4] + ".png"), Path(out_dir) / name
            try:
                with Image.open(png) as image:  # reads the header only
                    width, height = image.size
                caption = txt.read_bytes().decode("utf-8", errors="replace")
            except OSError:  # not an image after all: not a group a tool could use
                continue
            self.entries[index] = (width, height, caption)
        self.written = None if not self.path.is_file() else -1  # -1: a file from before, maybe stale

    def add(self, index: int, width: int, height: int, caption: str) -> None:
        """A group that is complete on disk."""
        self.entries[index] = (width, height, caption)

    def coco(self) -> dict:
        indices = sorted(self.entries)
        return {
            "info": {"description": "generate_images.py output: the complete images of this folder",
                     "format_version": FORMAT_VERSION},
            "licenses": [],
            "images": [{"id": i, "file_name": f"{i:05d}.png", "width": self.entries[i][0],
                        "height": self.entries[i][1]} for i in indices],
            "annotations": [{"id": i, "image_id": i, "caption": self.entries[i][2]} for i in indices],
        }

    def write(self, force: bool = False) -> None:
        """Rewrite the file if it lacks images: always with `force`, else once they are GROWTH of those in it."""
        if self.written is not None and self.written >= 0:
            new = len(self.entries) - self.written
            if new <= 0 or not (force or new >= max(1, GROWTH * self.written)):
                return
        text = dumps(self.coco())
        if self.written == -1 and self.path.read_text(encoding="utf-8", errors="replace") == text:
            self.written = len(self.entries)  # up to date already: not rewritten
            return
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.written = len(self.entries)


def dumps(coco: dict) -> str:
    """The file's text: JSON with one image or annotation per line (readable, and small for 100,000 images)."""
    def listed(key: str) -> str:
        items = [json.dumps(item, ensure_ascii=False) for item in coco[key]]
        return f'"{key}": [' + "".join(f"\n  {item}," for item in items).rstrip(",") + ("\n ]" if items else "]")

    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in coco.items()
                     if k not in ("images", "annotations"))
    return "{" + head + ",\n " + listed("images") + ",\n " + listed("annotations") + "}\n"
