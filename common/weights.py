"""Reading model weights: safetensors files only (memory-mapped), never pickles, and a strict load whose error
names the offending keys. Every family's loader uses these (sdxl/loading.py, sd3/loading.py, flux/loading.py).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def find_weights(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one component: `stem.safetensors`, its fp16 variant, or their shards."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    hint = f" (found {', '.join(pickles)}: pickle files are not loaded; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"no {stem}.safetensors in {folder}{hint}")


def read_safetensors(files, dtype=None) -> dict[str, torch.Tensor]:
    """Every tensor of these safetensors files in one dict (cast to `dtype` if given); a damaged file is one line."""
    sd = {}
    for f in files:
        try:
            part = load_file(f)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"cannot read {f}: {e}; the file is corrupt or truncated, download it again") from e
        sd.update(part if dtype is None else {k: v.to(dtype) for k, v in part.items()})
    return sd


def load_state_dict_checked(model: torch.nn.Module, sd: dict, source, device="cpu", dtype=None) -> None:
    """Strict load with an error that names the offending keys; assigns tensors (model may be on meta)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            detail = keys[:3]
            if label == "mis-shaped":
                detail = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}" for k in detail]
            problems.append(f"{len(keys)} {label} keys: {', '.join(detail)}{more}")
    if problems:
        raise ValueError(f"{source} does not match the model: {'; '.join(problems)}")
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
