"""Reading LoRA files of any kind (ours, kohya's, LyCORIS', diffusers/peft) into `LoRAWeights`, and merging one
into a model (and its text encoders): `read_lora`, `read_lora_file`, `load_lora`. Names are read through the base
model's `LoRANames` (its family's); a kohya module the vendor's model fuses (SD 3.5's, FLUX.1's q/k/v) is split
into our layers: each gets the shared down and its rows of the up (and of a DoRA magnitude). Every key and shape
is checked against the model, so a LoRA for another base model is an error naming the key, never a silent partial
load.
The formats are described in lora/files.py, which writes them.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lora.base_weights import StoredLinear
from lora.files import (
    KOHYA_PREFIXES,
    KOHYA_SUFFIXES,
    KOHYA_TEXT_ENCODERS,
    PEFT_SUFFIXES,
    TEXT_ENCODER_PREFIXES,
    LoRANames,
    LoRAWeights,
    check_finite,
    check_fits,
    describe,
    fits,
    swap_halves,
)
from lora.layer import LoRALayer
from lora.text_encoders import file_name, is_text_encoder_name


def _kohya_names(names: LoRANames) -> dict[str, list[tuple[str, int, int]]]:
    """kohya module name -> [(our module path, first row, rows)]: one entry, or several for a fused layer; the
    aliases (e.g. SDXL's diffusers-style kohya names) map to a whole layer."""
    kohya = {}
    for module, (name, row, rows) in names.kohya.items():
        kohya.setdefault(name, []).append((module, row, rows))
    for alias, module in names.kohya_aliases.items():
        kohya.setdefault(alias, [(module, 0, names.layers[module][0])])
    return kohya


def _text_encoder_names(text_encoder: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """(kohya name, peft module path) -> module path in an SDXLTextEncoder, for every Linear of both encoders:
    `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` (lora_te2_..., old lora_te_...) and
    `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. Both spellings, with and without `text_model.`,
    are accepted: transformers 5's CLIPTextModel has no `text_model` level, the files (kohya, diffusers) do."""
    kohya, peft = {}, {}
    for path, module in text_encoder.named_modules():
        if isinstance(module, (nn.Linear, LoRALayer)):
            component = _component(path)
            rest = path.removeprefix(component).removeprefix("text_model.")
            for spelling in (f"text_model.{rest}", rest):
                peft[component + spelling] = path
                for prefix, of in KOHYA_TEXT_ENCODERS.items():
                    if of == component:
                        kohya[prefix + spelling.replace(".", "_")] = path
    return kohya, peft


def _kohya_clip_name(name: str) -> str | None:
    """`lora_te2_text_model_encoder_layers_0_self_attn_q_proj` -> `text_encoder_2.text_model.encoder.layers.0.
    self_attn.q_proj` (self-attention and MLP Linear layers of CLIP; None for anything else)."""
    match = re.fullmatch(r"(lora_te[12]?_)text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+_proj|fc[12])", name)
    if match is None:
        return None
    prefix, layer, block, linear = match.groups()
    return f"{KOHYA_TEXT_ENCODERS[prefix]}text_model.encoder.layers.{layer}.{block}.{linear}"


def _component(module: str, prefix: str = "unet.") -> str:
    """Which model a module path belongs to: the denoiser (`prefix`) or one of the text encoders."""
    return next((c for c in ("text_encoder_2.", "text_encoder.") if module.startswith(c)), prefix)


def _peft_alpha(metadata: dict[str, str], path, component: str = "unet.") -> tuple:
    """(lora_alpha or None, alpha_pattern, use_rslora) from diffusers' `lora_adapter_metadata`, one model's part."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: lora_adapter_metadata is not valid JSON ({e})") from e
    if any(k.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")) for k in config):
        config = {k.removeprefix(component): v for k, v in config.items() if k.startswith(component)}
    return config.get("lora_alpha"), config.get("alpha_pattern") or {}, bool(config.get("use_rslora"))


def _parse(path, names: LoRANames, text_encoder: nn.Module | None = None, text_encoder_names: bool = False
           ) -> tuple[dict[str, dict], dict[str, str]]:
    """Module path -> {"down", "up", "alpha", "key"} and the file's metadata; see read_lora_file. With the model's
    text encoder, text-encoder keys are read too, as `text_encoder.<path>` / `text_encoder_2.<path>`; with
    `text_encoder_names` (no encoders at hand), those of CLIP's self-attention and MLP layers in the file spelling
    `text_encoder(_2).text_model.encoder.layers.N...` (what a text-encoder LoRA we train writes)."""
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    te_kohya, te_peft = _text_encoder_names(text_encoder) if text_encoder is not None else ({}, {})
    kohya = _kohya_names(names) | {name: [(module, 0, None)] for name, module in te_kohya.items()}
    groups = _group_keys(path, tensors, names, kohya, te_peft, text_encoder is not None, text_encoder_names)
    entries = {}
    prefix = names.peft_prefix + "."
    for group, entry in groups.items():
        if "down" not in entry or "up" not in entry:
            raise ValueError(f"{path}: key {entry['key']} has no matching {'up' if 'down' in entry else 'down'} "
                             "weight; the file is incomplete")
        is_kohya = _comfy_key(entry["key"]).startswith((*KOHYA_PREFIXES, *KOHYA_TEXT_ENCODERS))
        entry["alpha"] = _alpha(entry, group, is_kohya, metadata, path, prefix)
        if not math.isfinite(entry["alpha"]):  # peft's lora_alpha / alpha_pattern in the metadata (JSON allows NaN)
            raise ValueError(f"{path}: the alpha of key {entry['key']} is {entry['alpha']}, not a finite number; the "
                             "LoRA is damaged (it would make black images): use another LoRA file")
        entries.update(_our_layers(path, group, entry, kohya[group] if is_kohya else [(group, 0, None)], names))
    return entries, metadata


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata; a folder, a missing or damaged file, or a non-finite weight is an
    error naming the file."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a LoRA file; give a .safetensors LoRA file (for a training "
                         "checkpoint folder, its lora.safetensors or ema.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read LoRA file {path}: {e}; it is not a complete .safetensors file "
                         "(pickled .pt/.ckpt LoRAs are not loaded; re-download or convert it)") from e
    check_finite(tensors, path)  # one NaN makes black images: name it before anything else
    return tensors, metadata


def _group_keys(path: Path, tensors: dict, names: LoRANames, kohya: dict, te_peft: dict, with_text_encoder: bool,
                text_encoder_names: bool) -> dict[str, dict]:
    """The file's keys grouped by layer: a kohya module name (in `kohya`, which learns the CLIP names a file
    spells with `text_encoder_names`) or one of our module paths -> {"key": its first key, "down", "up", "alpha",
    "magnitude"}."""
    prefix = names.peft_prefix + "."
    groups: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES) and not with_text_encoder and not text_encoder_names:
            raise ValueError(f"{path}: key {key} is a text-encoder LoRA weight; here only the {names.peft_prefix} "
                             "takes a LoRA (generate_images.py applies both; remove the lora_te*/text_encoder* keys "
                             "otherwise)")
        spelling = _comfy_key(key)  # ComfyUI's diffusion_model.<path> as kohya's lora_unet_<path>
        if spelling.startswith((*KOHYA_PREFIXES, *KOHYA_TEXT_ENCODERS)):
            group, _, suffix = spelling.partition(".")
            if suffix not in KOHYA_SUFFIXES:
                raise ValueError(f"{path}: key {key} is not a LoRA, LoCon or DoRA weight (LoHa/LoKr/IA3 are not "
                                 "supported)")
            if group not in kohya and text_encoder_names and (module := _kohya_clip_name(group)):
                kohya[group] = [(module, 0, None)]
            if group not in kohya:
                raise ValueError(f"{path}: key {key} names no module of the model or its text encoders; the LoRA "
                                 "was made for another base model (e.g. SD 1.5) or another config")
            part = KOHYA_SUFFIXES[suffix]
        else:  # peft: text-encoder module paths keep their text_encoder(_2). prefix
            stripped = key.removeprefix(prefix)
            suffix = next((s for s in PEFT_SUFFIXES if stripped.endswith(s)), None)
            if suffix is None:
                raise ValueError(f"{path}: key {key} is neither a kohya (lora_unet_*) nor a diffusers/peft "
                                 f"({prefix}*.lora_A/lora_B.weight/lora_magnitude_vector) LoRA weight of the "
                                 f"{names.base} model")
            group, part = stripped.removesuffix(suffix), PEFT_SUFFIXES[suffix]
            group = te_peft.get(group, group)
            if text_encoder_names and is_text_encoder_name(group):
                group = file_name(group)  # with or without transformers 4's `text_model.` level
        entry = groups.setdefault(group, {"key": key})
        if part in entry:
            raise ValueError(f"{path}: key {key} repeats the {part} weight of {entry['key']}")
        if part == "alpha" and tensor.numel() != 1:
            raise ValueError(f"{path}: key {key} should be one number (alpha), not shape {tuple(tensor.shape)}")
        if part == "magnitude":  # one number per output channel: [out], [out, 1(, 1, 1)] or peft's [1, out, 1, 1]
            if tensor.shape[0] != tensor.numel() and not (tensor.ndim == 4 and tensor.shape[1] == tensor.numel()):
                raise ValueError(f"{path}: key {key} has shape {tuple(tensor.shape)}: a DoRA magnitude per input "
                                 "channel (LyCORIS wd_on_out=False) is not supported, only per output channel")
            tensor = tensor.flatten()
        entry[part] = tensor
    return groups


def _our_layers(path: Path, group: str, entry: dict, targets: list, names: LoRANames) -> dict[str, dict]:
    """One file layer's entry as our layers': itself (a vendor's swapped row halves put back), or, for a vendor's
    fused layer (e.g. q, k, v in one), a part per layer of ours (`targets`: (module, first row, rows))."""
    if len(targets) == 1:  # a layer of its own (its shapes are checked against the model later)
        module = targets[0][0]
        if module in names.kohya_swapped and names.kohya[module][0] == group \
                and entry["up"].shape[0] == names.layers[module][0]:  # the vendor's row halves swapped
            entry = {**entry, **{k: swap_halves(entry[k]) for k in ("up", "magnitude") if k in entry}}
        return {module: entry}
    total = names.fused_rows(group)
    magnitude = entry.get("magnitude")
    if entry["up"].shape[0] != total or (magnitude is not None and magnitude.numel() != total):
        raise ValueError(f"{path}: key {entry['key']} has up {tuple(entry['up'].shape)} but {group} of the "
                         f"{names.base} model has {total} output rows")
    parts = {}
    for module, row, rows in targets:  # DoRA's magnitude is per output row: each part takes its rows
        up = entry["up"][row : row + rows]
        if magnitude is None and not up.any():  # rows a writer left zero (a layer it did not adapt): no LoRA
            continue
        # each part owns its tensors (a file written from them must not share storage)
        parts[module] = {**entry, "down": entry["down"].clone(), "up": up.clone()}
        if magnitude is not None:
            parts[module]["magnitude"] = magnitude[row : row + rows].clone()
    return parts


COMFY_SUFFIXES = {".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight", ".alpha": "alpha",
                  ".dora_scale": "dora_scale", ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}


def _comfy_key(key: str) -> str:
    """ComfyUI's own LoRA layout, `diffusion_model.<vendor module path>.lora_down.weight` (or lora_A / lora_B), as
    kohya's `lora_unet_<vendor module path with _>.lora_down.weight` (diffusers reads it so too); other keys as
    they are."""
    if not key.startswith("diffusion_model."):
        return key
    suffix = next((s for s in COMFY_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return key
    module = key.removeprefix("diffusion_model.").removesuffix(suffix)
    return f"lora_unet_{module.replace('.', '_')}.{COMFY_SUFFIXES[suffix]}"


def _alpha(entry: dict, module: str, is_kohya: bool, metadata: dict, path, prefix: str) -> float:
    """A module's alpha: kohya's `.alpha` (its rank when missing), or peft's lora_alpha (alpha_pattern, rsLoRA)."""
    rank = entry["down"].shape[0]
    if "alpha" in entry:  # kohya
        return float(entry["alpha"].float().item())
    if is_kohya:  # kohya without .alpha means alpha = rank
        return float(rank)
    component = _component(module, prefix)  # peft: alpha / r (rsLoRA: sqrt r)
    lora_alpha, alpha_pattern, rslora = _peft_alpha(metadata, path, component)
    local = module.removeprefix(component) if component != prefix else module
    pattern = next((p for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", local)), None)
    alpha = alpha_pattern[pattern] if pattern else lora_alpha
    return rank if alpha is None else float(alpha) * (math.sqrt(rank) if rslora else 1.0)


def read_lora_file(path, names: LoRANames):
    """Parse a LoRA file of any supported format into diffusers module path -> (down, up, alpha).

    down is [rank, in], up is [out, rank]; the update to apply is alpha / rank * up @ down. `names`: the base
    model's (its family's `lora_names`). Returns that dict and the file's metadata."""
    entries, metadata = _parse(path, names)
    return {m: (e["down"], e["up"], e["alpha"]) for m, e in entries.items()}, metadata


def magnitudes_of(entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {m: e["magnitude"] for m, e in entries.items() if "magnitude" in e}


@torch.no_grad()
def load_lora(model: nn.Module, path, names: LoRANames, scale: float = 1.0, text_encoder: nn.Module | None = None
              ) -> dict[str, str]:
    """Merge a LoRA file into the model's Linear and Conv2d weights: W += scale * alpha / rank * up @ down, and
    for DoRA W <- m * (W + dW) / ||W + dW|| (per output channel; `scale` inside dW, as peft's adapter scale).

    Accepts kohya (the vendor's names, SDXL's diffusers-style names too, fused layers, LoCon, LyCORIS
    `dora_scale`) and diffusers/peft files, read through `names` (the model's family's). Wrapped layers (LoRALayer)
    take the update in their frozen base. With `text_encoder` (the family's text encoder), the file's text-encoder
    part (kohya lora_te1_/lora_te2_, peft text_encoder./text_encoder_2.) goes into its CLIP models; without it, such
    keys are an error. Every key is checked before any weight changes; loading two files applies both, in order.
    Returns the file's metadata."""
    entries, metadata = _parse(path, names, text_encoder)
    modules = dict(model.named_modules()) | (dict(text_encoder.named_modules()) if text_encoder is not None else {})
    plan = []
    for name, e in entries.items():
        key, module = e["key"], modules.get(name)
        if module is None:
            raise ValueError(f"{path}: key {key} names module {name}, which this model does not have; the LoRA "
                             "was made for another base model or config")
        layer = module.base if isinstance(module, LoRALayer) else module
        if isinstance(layer, StoredLinear):  # its `weight` is a cast-up copy: writing to it would change nothing
            raise ValueError(f"{path}: key {key} adapts {name}, whose base weight is stored as "
                             f"{layer.weight_stored.dtype}; load the LoRA into a bf16 or fp32 model, then store it")
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{path}: key {key} adapts {name}, a {type(layer).__name__}; only LoRAs on Linear and "
                             "Conv2d layers are supported")
        down, up, magnitude = e["down"], e["up"], e.get("magnitude")
        if not fits(layer.weight.shape, down, up, magnitude):
            extra = "" if magnitude is None else f", magnitude {tuple(magnitude.shape)}"
            raise ValueError(f"{path}: key {key} has shapes down {tuple(down.shape)}, up {tuple(up.shape)}{extra} but "
                             f"{name} is {describe(layer.weight.shape)}; the LoRA was made for another base model "
                             "(e.g. SD 1.5) or config")
        plan.append((layer.weight, down, up, magnitude, scale * e["alpha"] / down.shape[0]))
    for weight, down, up, magnitude, s in plan:
        to32 = dict(device=weight.device, dtype=torch.float32)
        merged = weight.float() + s * (up.to(**to32).flatten(1) @ down.to(**to32).flatten(1)).view(weight.shape)
        if magnitude is not None:
            gain = magnitude.to(**to32) / LoRALayer.row_norm(merged)
            merged *= gain.view(-1, *[1] * (weight.ndim - 1))
        weight.copy_(merged.to(weight.dtype))
    return metadata


def file_format(path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return "kohya" if any(_comfy_key(k).startswith(KOHYA_PREFIXES) for k in f.keys()) else "diffusers"


def read_lora(path, candidates: list[LoRANames]) -> LoRAWeights:
    """A LoRA file of any format `load_lora` reads, checked against the first of the `candidates` base models it
    fits (every family's known bases, or the one named: families.py `lora_names`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        source = f"{file_format(path)} file"
    except Exception as e:  # safetensors raises its own types for files that are not safetensors
        raise ValueError(f"cannot read LoRA file {path}: {e}; it is not a complete .safetensors file") from e
    errors = {}
    for names in candidates:
        try:
            entries, metadata = _parse(path, names, text_encoder_names=True)  # key names
            if not entries:
                raise ValueError(f"{path} holds no LoRA weights (no lora_unet_* or *.lora_A/B.weight keys)")
            modules = {m: (e["down"], e["up"], e["alpha"]) for m, e in entries.items()}
            weights = LoRAWeights(modules, metadata, names, source, magnitudes_of(entries))
            check_fits(weights)  # and every module and shape here
            return weights
        except ValueError as e:
            errors[names.base] = str(e)
    if len(set(errors.values())) == 1:  # e.g. a module none has: say it once
        tried = "" if len(candidates) == 1 else f" (tried {', '.join(errors)})"
        raise ValueError(next(iter(errors.values())) + tried)
    raise ValueError(f"{path} fits no known base model: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
                     + " (give --base if it was made for another model of the same family)")
