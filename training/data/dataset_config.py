"""`--dataset_config FILE.yaml`: several image folders trained together, each repeated `num_repeats` times per
epoch and with its own caption settings, like kohya-ss/sd-scripts' dataset subsets. For small classes:

    subsets:
      - image_dir: data/class_a        # relative to this file's folder
        num_repeats: 10                # each image 10 times per epoch (each repeat its own crop and flip)
        caption_prefix: "class_a"
      - image_dir: data/class_b
        num_repeats: 20
        caption_extension: .caption

Keys a subset leaves out take the command line's --caption_extension, --caption_prefix and --caption_suffix
(--keep_tokens_separator is the same for all). An unknown key, a missing folder or a bad value is a one-line
error.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from common.errors import ConfigError
from training.data.captions import CaptionStyle, finish_caption
from training.data.scan import ScanResult, scan_folder

SUBSET_KEYS = {"image_dir", "num_repeats", "caption_extension", "caption_prefix", "caption_suffix"}


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int
    style: CaptionStyle


def read_dataset_config(path, default: CaptionStyle) -> list[Subset]:
    """The subsets of a dataset config file, or a one-line ConfigError naming the file and the entry."""
    where = f"--dataset_config {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: cannot read it as YAML ({type(e).__name__}); give a YAML file with a "
                          "`subsets:` list") from None
    if not isinstance(data, dict) or set(data) != {"subsets"} or not isinstance(data["subsets"], list) \
            or not data["subsets"]:
        raise ConfigError(f"{where}: must hold one key, `subsets:`, a non-empty list of {{image_dir: DIR, "
                          "num_repeats: N}} entries")
    subsets = []
    for n, entry in enumerate(data["subsets"], start=1):
        at = f"{where}: subset {n}"
        if not isinstance(entry, dict) or "image_dir" not in entry:
            raise ConfigError(f"{at}: must be a mapping with an image_dir")
        if unknown := sorted(set(map(str, entry)) - SUBSET_KEYS):
            raise ConfigError(f"{at}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(SUBSET_KEYS))}")
        image_dir = (Path(path).parent / str(entry["image_dir"])).expanduser().resolve()
        if not image_dir.is_dir():
            raise ConfigError(f"{at}: image_dir {image_dir} is not a folder; give a folder of images (relative "
                              "paths start at the config file's folder)")
        repeats = entry.get("num_repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"{at}: num_repeats {repeats!r} must be an integer >= 1")
        texts = {k: entry.get(k, v) for k, v in (("caption_extension", default.extension), ("caption_prefix",
                 default.prefix), ("caption_suffix", default.suffix))}
        if bad := [k for k, v in texts.items() if not isinstance(v, str)]:
            raise ConfigError(f"{at}: {bad[0]} {texts[bad[0]]!r} must be a string (quote it)")
        if not texts["caption_extension"].startswith("."):
            raise ConfigError(f"{at}: caption_extension {texts['caption_extension']!r} must start with a dot, "
                              "e.g. .txt or .caption")
        subsets.append(Subset(image_dir, repeats, CaptionStyle(*texts.values(), default.separator)))
    return subsets


def scan_subsets(path, subsets: list[Subset], max_bad_fraction: float, shuffle_tags: bool) -> ScanResult:
    """Every subset scanned (training/data/scan.py) and its captions finished; each record `num_repeats` times, keyed
    `<subset number>/<path in its folder>`."""
    records, bad_files, missing, links, empty = [], [], [], [], []
    for n, subset in enumerate(subsets, start=1):
        scan = scan_folder(subset.image_dir, max_bad_fraction, subset.style.extension)
        for record in scan.records:
            finished = replace(record, key=f"{n}/{record.key}",
                               caption=finish_caption(record.caption, subset.style, shuffle_tags))
            records += [finished] * subset.num_repeats
        bad_files += scan.bad_files
        missing += scan.missing_captions
        links += scan.links_outside
        empty += scan.empty_captions
    return ScanResult(Path(path).resolve(), records, bad_files, missing, links, empty)
