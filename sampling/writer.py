"""The COCO-style output folder: one group of files per image index (docs/ARCHITECTURE.md, "Generation output").

    OUTPUT_DIR/00000.png    the image
    OUTPUT_DIR/00000.json   prompt, negative_prompt, seed, num_inference_steps, guidance_scale, sampler,
                            width, height, base_model, vae_model, loras [{path, scale}], precision
                            (left out with --no-save-metadata)
    OUTPUT_DIR/00000.txt    the prompt; written last, it marks the group complete
    OUTPUT_DIR/captions.json  every complete group as COCO captions (sampling/captions.py)

Every file is first written under a hidden temporary name (`.00000.png.tmp-PID`) and fsync'd, then renamed
into place (common/files.py) in the order png, json, txt, the old `.txt` removed first. A crash at any point
leaves either a complete group or one without its `.txt`, which counts as missing and is regenerated (its
leftovers replaced).
Complete groups are never touched again unless `--overwrite`; one made with other settings than the
current run is an error (`SettingsMismatch`), so a folder never mixes two runs silently.
"""

import json
from pathlib import Path

from common.errors import SettingsMismatch
from common.files import atomic_write
from sampling.prompts import ImageJob

FORMAT_VERSION = 1  # of the .json sidecar
CHECKED = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "sampler", "width",
           "height", "base_model", "vae_model", "loras", "precision")


def stem(index: int) -> str:
    return f"{index:05d}"


def metadata(job: ImageJob, settings: dict) -> dict:
    """The .json sidecar of one image: its own prompt and seed plus the run's settings (see CHECKED)."""
    return {"format_version": FORMAT_VERSION, "index": job.index, "file_name": stem(job.index) + ".png",
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed, **settings}


def is_complete(out_dir: Path, index: int) -> bool:
    return (out_dir / f"{stem(index)}.txt").is_file() and (out_dir / f"{stem(index)}.png").is_file()


def missing_jobs(out_dir: Path, jobs: list[ImageJob], settings: dict, overwrite: bool = False) -> list[ImageJob]:
    """The jobs whose group is not complete (all of them under `overwrite`). Raises SettingsMismatch when a
    complete group's .json (or, without one, its .txt prompt) disagrees with what this run would write."""
    out_dir = Path(out_dir)
    if overwrite or not out_dir.is_dir():
        return list(jobs)
    missing = []
    for job in jobs:
        if not is_complete(out_dir, job.index):
            missing.append(job)
            continue
        meta_path = out_dir / f"{stem(job.index)}.json"
        if meta_path.is_file():
            _check(meta_path, _read_json(meta_path), metadata(job, settings))
        else:  # made with --no-save-metadata: only the prompt is on record
            prompt = (out_dir / f"{stem(job.index)}.txt").read_text(encoding="utf-8")
            _check(out_dir / f"{stem(job.index)}.txt", {"prompt": prompt}, {"prompt": job.prompt})
    return missing


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingsMismatch(f"{path} is not readable JSON ({e}); delete that image's files to regenerate it, "
                               "or pass --overwrite") from None


def _check(path: Path, found: dict, expected: dict) -> None:
    for key in CHECKED:
        if key in found and found[key] != expected[key]:
            raise SettingsMismatch(f"{path} was made with {key} {found[key]!r} but this run has {expected[key]!r}; "
                                   "use another --output-dir, the same settings, or --overwrite to regenerate")


def write_group(out_dir: Path, index: int, image, prompt: str, meta: dict | None) -> None:
    """Write index's png (+ json) + txt so that the group appears complete or not at all."""
    out_dir = Path(out_dir)
    (out_dir / f"{stem(index)}.txt").unlink(missing_ok=True)  # an old group (--overwrite) stops counting first
    atomic_write(out_dir / f"{stem(index)}.png", lambda tmp: image.save(tmp, format="PNG"))
    if meta is None:
        (out_dir / f"{stem(index)}.json").unlink(missing_ok=True)
    else:
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        atomic_write(out_dir / f"{stem(index)}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write(out_dir / f"{stem(index)}.txt", lambda tmp: tmp.write_bytes(prompt.encode("utf-8")))  # the marker
