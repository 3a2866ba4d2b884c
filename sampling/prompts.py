"""Prompt files and the image plan: which prompt, negative prompt and seed each image index gets.

Prompt files (one prompt per image, cycled when more images are asked for):
- `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped.
- `.jsonl`: one JSON object per line, `{"prompt": "...", "negative_prompt": "...", "seed": 7}`;
  `negative_prompt` and `seed` are optional, blank lines are skipped.

Image `i` takes prompt `order[i % P]` of the P prompts (`order` is the file order, or one
permutation drawn from `random.Random(seed)` under `--shuffle-prompts`). Its seed is
`base_seed + i` (docs/ARCHITECTURE.md, "Seeds"), unless its JSONL line gives one: then the line's
seed on the first pass over the prompts, seed + 1 on the second, and so on, so cycled images differ.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from common.errors import PromptError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int64; ours must stay >= 0


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str | None = None  # None: the run's --negative-prompt
    seed: int | None = None  # None: base_seed + image index


@dataclass(frozen=True)
class ImageJob:
    index: int
    prompt: str
    negative_prompt: str
    seed: int


def read_prompt_file(path) -> list[PromptSpec]:
    """The prompts of a `.txt` or `.jsonl` file, in file order; PromptError if it holds none."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise PromptError(f"--prompt-file {path}: unknown kind {path.suffix or '(no extension)'!r}; give a .txt "
                          "file (one prompt per line) or a .jsonl file ({\"prompt\": ...} per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptError(f"--prompt-file {path}: the file does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"--prompt-file {path}: cannot read it ({getattr(e, 'strerror', None) or e}); give a "
                          "readable UTF-8 text file") from None
    if path.suffix.lower() == ".jsonl":
        specs = [_jsonl_spec(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        specs = [PromptSpec(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise PromptError(f"--prompt-file {path}: the file holds no prompts; write one per line (blank lines and "
                          "lines starting with # are skipped)")
    return specs


def _jsonl_spec(line: str, path: Path, n: int) -> PromptSpec:
    where = f"--prompt-file {path}, line {n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptError(f"{where}: not valid JSON ({e.msg}); write one object per line, e.g. "
                          '{"prompt": "a photo of a cat", "seed": 7}') from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise PromptError(f'{where}: needs a "prompt" string, e.g. {{"prompt": "a photo of a cat"}}')
    unknown = sorted(set(obj) - {"prompt", "negative_prompt", "seed"})
    if unknown:
        raise PromptError(f"{where}: unknown key {unknown[0]!r}; the keys are prompt, negative_prompt, seed")
    negative, seed = obj.get("negative_prompt"), obj.get("seed")
    if negative is not None and not isinstance(negative, str):
        raise PromptError(f'{where}: "negative_prompt" must be a string, got {negative!r}')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise PromptError(f'{where}: "seed" must be an integer in [0, 2^63), got {seed!r}')
    return PromptSpec(obj["prompt"], negative, seed)


def plan_images(specs: list[PromptSpec], num_images: int, base_seed: int, negative_prompt: str = "",
                shuffle: bool = False) -> list[ImageJob]:
    """One ImageJob per index 0..num_images-1 (see the module docstring for the rules)."""
    order = list(range(len(specs)))
    if shuffle:
        random.Random(base_seed).shuffle(order)
    jobs = []
    for i in range(num_images):
        spec = specs[order[i % len(specs)]]
        seed = base_seed + i if spec.seed is None else spec.seed + i // len(specs)
        negative = negative_prompt if spec.negative_prompt is None else spec.negative_prompt
        jobs.append(ImageJob(i, spec.prompt, negative, seed))
    return jobs
