"""LoRA `.pt` files of the original scripts (a pickled dict of tensors) -> `LoRAWeights`, for conversion only.

    python extract_lora_weights.py old_lora.pt -o old_lora.safetensors        # then use the .safetensors

The file is read with `torch.load(weights_only=True)` alone: a pickle holding anything but tensors and plain
containers is refused before any of its code could run, and anything but a flat dict of name -> tensor is
refused after. Key names accepted (a `unet.` prefix is optional), with `X` a diffusers module path:
- `X.lora_down.weight` / `X.lora_up.weight` (+ `X.alpha`): a LoRA state dict as the original scripts saved it;
- `X.processor.to_q_lora.down.weight` / `.up.weight` (to_k, to_v, to_out): diffusers' old attention processors;
- kohya (`lora_unet_*`) and peft (`X.lora_A.weight` / `X.lora_B.weight`) names, as in LoRA files.
A layer without an alpha (kohya names aside, where alpha = rank) gets `alpha` (default: its rank, i.e. the update
up @ down at scale 1). The tensors then go through the same reader and checks as a `.safetensors` LoRA file
(lora/files.py `read_lora`).
"""

import json
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora.files import LoRAWeights, check_finite
from lora.reading import read_lora

PT_SUFFIXES = (".pt", ".pth")
OLD_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def read_pt_tensors(path) -> dict[str, torch.Tensor]:
    """The flat dict of tensors a .pt file holds; anything else is a ValueError naming the file."""
    try:
        with warnings.catch_warnings():  # torch warns before it refuses an unsafe pickle
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects other than tensors (refused unrun), or no pickle at all
        raise ValueError(f"{path} does not load with torch.load(weights_only=True): it holds Python objects other "
                         "than tensors (never loaded: a pickle can run code) or is not a torch file; only a .pt "
                         "file holding a dict of tensors is converted") from e
    except Exception as e:  # EOFError/RuntimeError: a truncated or damaged file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} does not load as a torch file ({reason}); it is damaged or incomplete") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} holds a {type(data).__name__}, not a dict of LoRA tensors")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; only a flat dict of "
                             "name -> tensor is converted")
    check_finite(data, path)
    return data


def to_file_names(tensors: dict[str, torch.Tensor], alpha: float | None) -> tuple[dict, dict]:
    """(tensors under kohya or peft names, safetensors metadata with their alphas) of a .pt file's dict."""
    out, alphas = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix("unet.")
        if key.startswith("lora_unet_") or name.endswith((".lora_A.weight", ".lora_B.weight")):
            out[key] = value
        elif match := OLD_PROCESSOR.fullmatch(name):
            module = f"{match[1]}.{match[2]}" + (".0" if match[2] == "to_out" else "")
            out[f"unet.{module}.lora_{'A' if match[3] == 'down' else 'B'}.weight"] = value
        elif name.endswith((".lora_down.weight", ".lora_up.weight")):
            module, _, part = name.rpartition(".lora_")
            out[f"unet.{module}.lora_{'A' if part == 'down.weight' else 'B'}.weight"] = value
        elif name.endswith(".alpha") and value.numel() == 1:
            alphas[re.escape(name.removesuffix(".alpha"))] = float(value.float().item())
        else:
            raise ValueError(f"key {key} is not a LoRA weight (X.lora_down.weight / X.lora_up.weight / X.alpha, "
                             "lora_unet_*, X.lora_A.weight / X.lora_B.weight)")
    peft = {"alpha_pattern": alphas} | ({"lora_alpha": alpha} if alpha is not None else {})
    return {k: v.contiguous() for k, v in out.items()}, {"lora_adapter_metadata": json.dumps(peft)}


def read_pt_lora(path, candidates: list, alpha: float | None = None) -> LoRAWeights:
    """A .pt LoRA of the original scripts, checked against the `candidates` base models (`LoRANames`) like any LoRA
    file (see the module doc)."""
    path = Path(path)
    try:
        tensors, metadata = to_file_names(read_pt_tensors(path), alpha)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e
    with tempfile.TemporaryDirectory() as tmp:  # the one reader of LoRA files checks it, as for any file
        file = Path(tmp) / "lora.safetensors"
        save_file(tensors, str(file), metadata=metadata)
        try:
            weights = read_lora(file, candidates)
        except ValueError as e:
            raise ValueError(str(e).replace(str(file), str(path))) from e
    weights.source = "original .pt file"
    return weights
