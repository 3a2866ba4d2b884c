"""LoRA files: the kohya and diffusers formats, and writing them (reading them: lora/reading.py).

Files are safetensors in two formats (docs/ARCHITECTURE.md, "LoRA files"):
- kohya: `lora_unet_<the vendor's module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha` (+ `.dora_scale`
  [out, 1(, 1, 1)], LyCORIS' DoRA magnitude) with kohya's `ss_*` and `modelspec.*` metadata; what ComfyUI,
  A1111/Forge and kohya read (diffusers reads it too, except DoRA: its SDXL loader drops `dora_scale`). Where the
  vendor's model fuses layers that diffusers keeps apart (SD 3.5's and FLUX.1's attention q/k/v), one kohya module
  covers several of ours: its down is their downs stacked and its up block-diagonal (or, for LoRAs that share a
  down, their ups stacked), so the fused layer gets exactly the sum of our updates (and a DoRA magnitude, being per
  output row, is ours stacked). Where the vendor's layer holds our output rows' two halves swapped (SD 3.5's
  final and pre-only adaLN), the up and magnitude are written and read swapped.
- diffusers: peft names `<prefix>.<diffusers module path>.lora_A.weight / .lora_B.weight` (+ `.lora_magnitude_vector`,
  DoRA; prefix `unet` or `transformer`), for diffusers' `load_lora_weights`; ComfyUI, A1111/Forge and kohya do NOT
  read this format. Its readers take no alpha from the tensors and apply lora_B @ lora_A at scale 1, so the writer
  folds alpha / rank into lora_B and records lora_alpha = r (rank_pattern/alpha_pattern for LoCon's other rank,
  use_dora) in diffusers' `lora_adapter_metadata`; every reader then applies the same update.
Training checkpoints store the LoRA unfolded (`peft_tensors`: lora_B as trained, lora_alpha = alpha in the
metadata), which is lossless for exact resume and still a diffusers file.

In memory a LoRA is `LoRAWeights`: module path -> (down [rank, in(, k, k)], up [out, rank(, 1, 1)], alpha), DoRA
magnitudes [out], plus the `LoRANames` of the base model its module paths refer to (its family makes them: every
adaptable layer with its shape, the kohya name of each, the peft prefix, the metadata naming the architecture).
Reading checks every key and shape against them, so a LoRA for another base model is an error naming the key,
never a silent partial load. What round-trips exactly (fp32): kohya to kohya, diffusers to diffusers, diffusers to
kohya; to diffusers, one multiplication by alpha / rank.
"""

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save, save_file
from torch import nn

from common.files import atomic_write
from lora.layer import LoRAConfig, lora_modules
from lora.text_encoders import is_text_encoder_name, text_encoder_lora_modules

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
KOHYA_TEXT_ENCODERS = {"lora_te_": "text_encoder.", "lora_te1_": "text_encoder.", "lora_te2_": "text_encoder_2."}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude"}
PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}
PEFT_PREFIXES = ("unet.", "transformer.")  # diffusers' names of the denoiser in a LoRA file
# kohya-format module prefixes: the vendor's names (`lora_unet_`), and a kohya-style spelling of diffusers' names
# some tools write for diffusers' transformers (`lora_transformer_<diffusers path>`, read through kohya_aliases)
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
FORMAT_VERSION = "1"  # of the `sdxl_lora.*` metadata we write
# Metadata that describes a file's format: written afresh for each output file, never copied from the input.
FORMAT_KEYS = {"sdxl_lora.format_version", "sdxl_lora.rank", "sdxl_lora.alpha", "sdxl_lora.target_mode",
               "sdxl_lora.conv_rank", "sdxl_lora.conv_alpha", "sdxl_lora.use_dora", "sdxl_lora.family",
               "ss_network_args", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
               "modelspec.architecture", "modelspec.sai_model_spec", "modelspec.implementation", "format",
               "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash"}


@dataclass(frozen=True, eq=False)
class LoRANames:
    """What the names and shapes in a LoRA file refer to: one base model's adaptable layers, as its family names
    them (sdxl/lora.py `lora_names`, sd3/..., flux/...)."""

    family: str  # "sdxl", "sd3", "flux"
    base: str  # "sdxl", "tiny", a model folder, ...: what messages call it
    layers: Mapping[str, tuple[int, ...]]  # diffusers module path -> weight shape, every Linear/Conv2d of the denoiser
    kohya: Mapping[str, tuple[str, int, int]]  # module path -> (kohya module name, first row, rows) in its layer
    targets: Mapping[str, frozenset[str]]  # target mode -> the Linear module paths it adapts
    peft_prefix: str  # "unet" or "transformer"
    metadata: Mapping[str, str]  # ss_base_model_version, modelspec.architecture, modelspec.implementation
    kohya_aliases: Mapping[str, str] = field(default_factory=dict)  # other kohya spellings read -> module path
    # module paths whose vendor layer holds the two halves of our output rows swapped (SD 3.5's final and pre-only
    # adaLN: SAI's (shift, scale), diffusers' (scale, shift)); written and read swapped in kohya files
    kohya_swapped: frozenset[str] = frozenset()

    def fused_rows(self, kohya_name: str) -> int:
        """The output rows of the vendor's layer that `kohya_name` names (the sum of its parts)."""
        return max(row + rows for name, row, rows in self.kohya.values() if name == kohya_name)


@dataclass
class LoRAWeights:
    """A LoRA in memory, whatever it came from."""

    # diffusers module path -> (down, up, alpha); a trained text-encoder LoRA's modules are here too, as
    # `text_encoder(_2).text_model.<path>` (lora/text_encoders.py)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    metadata: dict[str, str]  # carried into a file written from it (format keys excluded)
    names: LoRANames  # the base model its module paths refer to
    source: str  # "kohya file", "diffusers file", "checkpoint LoRA", "checkpoint EMA", "model"
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: module path -> m [out]

    @property
    def base(self) -> str:
        return self.names.base

    def _counts(self, conv: bool, index: int) -> Counter:
        return Counter(down.shape[0] if index == 0 else alpha for down, _, alpha in self.modules.values()
                       if (down.ndim == 4) == conv)

    @property
    def ranks(self) -> Counter:
        return self._counts(False, 0) or self._counts(True, 0)

    @property
    def alphas(self) -> Counter:
        return self._counts(False, 2) or self._counts(True, 2)

    @property
    def target_mode(self) -> str:
        """As recorded by our trainer; else the smallest mode covering every module (metadata only)."""
        modes = list(self.names.targets)
        if self.metadata.get("sdxl_lora.target_mode") in modes:
            return self.metadata["sdxl_lora.target_mode"]
        linear = {name for name, (down, _, _) in self.modules.items()
                  if down.ndim == 2 and not is_text_encoder_name(name)}
        return next((m for m in modes if linear <= self.names.targets[m]), "all")

    def lora_config(self) -> LoRAConfig:
        """Rank and alpha for the file's metadata: the most common ones (our files have one of each)."""
        dropout = float(self.metadata.get("sdxl_lora.dropout", 0.0))
        conv_ranks, conv_alphas = self._counts(True, 0), self._counts(True, 2)
        conv = (conv_ranks.most_common(1)[0][0], conv_alphas.most_common(1)[0][0]) if conv_ranks else (0, 0.0)
        return LoRAConfig(self.ranks.most_common(1)[0][0], self.alphas.most_common(1)[0][0], dropout,
                          self.target_mode, *conv, bool(self.magnitudes))


def weights_of(model: nn.Module, names: LoRANames, metadata: dict[str, str] | None = None,
               text_encoder: nn.Module | None = None) -> LoRAWeights:
    """The LoRA layers of a model (and of its text encoders, when they trained one) (detached) as LoRAWeights."""
    layers = lora_modules(model) | text_encoder_lora_modules(text_encoder)
    modules = {name: (m.lora_down.weight.detach(), m.lora_up.weight.detach(), m.alpha) for name, m in layers.items()}
    if not modules:
        raise ValueError("this model has no LoRA layers to save; add a LoRA first")
    magnitudes = {name: m.magnitude.detach() for name, m in layers.items() if m.magnitude is not None}
    return LoRAWeights(modules, dict(metadata or {}), names, "model", magnitudes)


def adaptable_layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every Linear and Conv2d layer of a model (it may be on the meta device): module path -> its weight's shape."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def lora_shapes(weight_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes of a rank-1 LoRA on a layer with this weight shape; rank goes in down[0] and up[1]."""
    out, n_in, *kernel = weight_shape
    return (1, n_in, *kernel), (out, 1, *[1] * len(kernel))


def describe(weight_shape) -> str:
    out, n_in, *kernel = weight_shape
    return f"Conv2d({n_in}, {out}, kernel {tuple(kernel)})" if kernel else f"Linear({n_in}, {out})"


def fits(weight_shape, down, up, magnitude=None) -> bool:
    """Do these LoRA (and DoRA magnitude) tensors fit a layer with this weight shape?"""
    want_down, want_up = lora_shapes(weight_shape)
    rank = down.shape[0] if down.ndim else 0
    return (tuple(down.shape) == (rank, *want_down[1:]) and tuple(up.shape) == (want_up[0], rank, *want_up[2:])
            and (magnitude is None or magnitude.numel() == weight_shape[0]))


def check_fits(weights: LoRAWeights) -> None:
    """Every module of `weights` is a Linear or Conv2d layer of its base model, with matching shapes; else a
    ValueError naming it."""
    layers = weights.names.layers
    for name, (down, up, _) in weights.modules.items():
        if is_text_encoder_name(name):  # trained by us on the encoders; load_lora checks them against the models
            continue
        if name not in layers:
            raise ValueError(f"LoRA layer {name} ({weights.source}) is not a Linear or Conv2d layer of the "
                             f"{weights.base} model; the LoRA was made for another base model (e.g. SD 1.5) or "
                             "config")
        magnitude = weights.magnitudes.get(name)
        if not fits(layers[name], down, up, magnitude):
            extra = "" if magnitude is None else f", magnitude {tuple(magnitude.shape)}"
            raise ValueError(f"LoRA layer {name} ({weights.source}) has shapes down {tuple(down.shape)}, up "
                             f"{tuple(up.shape)}{extra} but the {weights.base} model's layer is "
                             f"{describe(layers[name])}; the LoRA was made for another base model or config")
    stray = sorted(set(weights.magnitudes) - set(weights.modules))
    if stray:
        raise ValueError(f"DoRA magnitude of {stray[0]} ({weights.source}) has no LoRA weights; the file is incomplete")


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """`key K holds 1 NaN and 2 Inf values (of 4096)` (and how many more keys do) for the first tensor with NaN or
    Inf values, or None when every value is finite. A LoRA with one such value makes black images."""
    bad = []
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            t = tensor if tensor.dtype.itemsize > 1 else tensor.float()  # fp8: no isfinite of its own
            if not torch.isfinite(t).all():
                bad.append((key, t))
    if not bad:
        return None
    key, t = bad[0]
    nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
    counts = " and ".join(f"{n} {what}" for what, n in (("NaN", nan), ("Inf", inf)) if n)
    more = f" (and {len(bad) - 1} more key{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
    return f"key {key} holds {counts} value{'s' * (nan + inf > 1)} (of {t.numel()}){more}"


def check_finite(tensors: Mapping[str, torch.Tensor], path) -> None:
    """A ValueError naming the file and the first key holding NaN or Inf values (see `nonfinite`)."""
    if problem := nonfinite(tensors):
        raise ValueError(f"{path}: {problem}; the LoRA is damaged or its training diverged (it would make black "
                         "images): use another LoRA file or an earlier checkpoint")


# ---------------------------------------------------------------------------------------------------
# Writing


def _check_metadata(metadata: dict | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"LoRA file metadata must map str to str; {bad[0]!r} -> {metadata[bad[0]]!r} does not")
    return metadata


def kohya_dora_problem(names: LoRANames, mode: str) -> str | None:
    """Why a DoRA of target mode `mode` cannot be written in kohya format for this base model, or None: a kohya
    layer that fuses several of ours (FLUX.1's single-block linear1 = q, k, v, MLP in) needs a magnitude for every
    row, and the rows of a layer the LoRA does not adapt are the base weights' norms, which a LoRA file lacks."""
    targets = names.targets.get(mode, frozenset())
    fused = {}
    for module, (key, _, _) in names.kohya.items():
        fused.setdefault(key, []).append(module)
    for key, modules in fused.items():
        adapted = [m for m in modules if m in targets]
        if adapted and len(adapted) < len(modules):
            missing = ", ".join(m.rpartition(".")[2] for m in modules if m not in targets)
            return (f"the {names.family} model fuses {', '.join(a.rpartition('.')[2] for a in adapted)} with "
                    f"{missing} into one layer ({key}), which target mode {mode} adapts only in part")
    return None


def fuse(parts: list[tuple[int, int, torch.Tensor, torch.Tensor, float]], rows: int
         ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One kohya module (down, up, alpha) for several of ours that the vendor's model fuses into one layer of `rows`
    output rows; parts: (first row, rows, down, up, alpha) each. LoRAs that share one down (as read from a fused
    file) keep it, their ups stacked; else the downs are stacked and the up is block-diagonal. The fused alpha keeps
    the first part's alpha / rank; a part with another one has it folded into its up (exact for equal scales)."""
    _, _, down0, up0, alpha0 = parts[0]
    scale = alpha0 / down0.shape[0]
    shared = all(torch.equal(down, down0) for _, _, down, _, _ in parts)
    rank = down0.shape[0] if shared else sum(down.shape[0] for _, _, down, _, _ in parts)
    up = torch.zeros((rows, rank, *up0.shape[2:]), dtype=up0.dtype)
    col = 0
    for row, n, down, part_up, alpha in parts:
        r = down.shape[0]
        factor = (alpha / r) / scale
        block = part_up if factor == 1.0 else (part_up.float() * factor).to(part_up.dtype)
        up[row : row + n, (0 if shared else col) : (0 if shared else col) + r] = block
        col += r
    down = down0 if shared else torch.cat([down for _, _, down, _, _ in parts])
    return down, up, scale * rank


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0; its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def kohya_tensors(weights: LoRAWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kohya-format tensors of `weights`: vendor module names, fused where the vendor's model fuses layers (a
    DoRA magnitude too: it is per output row, so the fused layer's is ours stacked, when DoRA covers all its rows),
    row halves swapped where the vendor's layer swaps them."""
    groups = {}  # kohya module name -> [(first row, rows, our module path)]
    for name, (_, up, _) in weights.modules.items():
        key, row, rows = ((kohya_text_encoder_key(name), 0, up.shape[0]) if is_text_encoder_name(name)
                          else weights.names.kohya[name])
        groups.setdefault(key, []).append((row, rows, name))
    tensors = {}
    for key, parts in groups.items():
        parts = sorted(parts)
        total = parts[0][1] if is_text_encoder_name(parts[0][2]) else weights.names.fused_rows(key)
        name = parts[0][2]
        if len(parts) == 1 and parts[0][1] == total:  # a layer of its own
            down, up, alpha = weights.modules[name]
        else:
            down, up, alpha = fuse([(row, rows, *weights.modules[n]) for row, rows, n in parts], total)
        magnitudes = [weights.magnitudes.get(n) for _, _, n in parts]
        magnitude = None
        if any(m is not None for m in magnitudes):
            if any(m is None for m in magnitudes) or sum(rows for _, rows, _ in parts) != total:
                raise ValueError(f"DoRA on {name}: the vendor's model fuses it into {key}, whose other rows have no "
                                 "DoRA magnitude; adapt every part of the fused layer, or write this LoRA in "
                                 "diffusers format")
            magnitude = torch.cat([m.flatten() for m in magnitudes])
        if name in weights.names.kohya_swapped:
            up, magnitude = swap_halves(up), None if magnitude is None else swap_halves(magnitude)
        tensors |= {f"{key}.lora_down.weight": down.to(dtype), f"{key}.lora_up.weight": up.to(dtype),
                    f"{key}.alpha": torch.tensor(float(alpha), dtype=dtype)}
        if magnitude is not None:  # LyCORIS' layout: [out, 1] / [out, 1, 1, 1] (the output axis)
            tensors[f"{key}.dora_scale"] = magnitude.reshape(-1, *[1] * (down.ndim - 1)).to(dtype)
    return tensors


def write_lora(weights: LoRAWeights, path, format: Literal["kohya", "diffusers"] = "kohya",
               dtype: torch.dtype = torch.float32) -> Path:
    """Write `weights` to a `.safetensors` LoRA file in kohya or diffusers (peft) format, atomically."""
    check_fits(weights)
    config = weights.lora_config()
    meta = {k: v for k, v in _check_metadata(weights.metadata).items() if k not in FORMAT_KEYS}
    meta |= format_metadata(config, weights.names.family)
    if format == "kohya":
        tensors = kohya_tensors(weights, dtype)
        meta |= {
            # kohya's networks.lora reads plain LoRA and LoCon (conv_dim); DoRA is LyCORIS' (dora_wd)
            "ss_network_module": "lycoris.kohya" if config.use_dora else "networks.lora",
            "ss_network_args": json.dumps(network_args(config)),
            "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(float(config.alpha)),
            "modelspec.sai_model_spec": "1.0.0",
        } | dict(weights.names.metadata)
    elif format == "diffusers":
        prefix, tensors = weights.names.peft_prefix, {}
        for name, (down, up, alpha) in weights.modules.items():
            key = peft_module_key(name, prefix)
            tensors[f"{key}.lora_A.weight"] = down.to(dtype)
            tensors[f"{key}.lora_B.weight"] = (up.float() * (alpha / down.shape[0])).to(dtype)  # folded
            if name in weights.magnitudes:  # peft's shapes: [out] for Linear, [1, out, 1, 1] for Conv2d
                m = weights.magnitudes[name].flatten()
                tensors[f"{key}.lora_magnitude_vector"] = (m.view(1, -1, 1, 1) if down.ndim == 4 else m).to(dtype)
        # diffusers builds its peft LoraConfig from this (prefix stripped) instead of guessing it; alpha is folded,
        # so lora_alpha = r for every layer (the text encoders' parts: diffusers infers r from the shapes and
        # lora_alpha = r)
        modules = [name for name in weights.modules if not is_text_encoder_name(name)]
        peft_config = {f"{prefix}.r": config.rank, f"{prefix}.lora_alpha": config.rank,
                       f"{prefix}.use_dora": config.use_dora, f"{prefix}.target_modules": modules}
        peft_config |= peft_patterns(weights, config.rank, fold=True)
        peft_config |= text_encoder_peft_config(weights.modules, config.rank, config.rank)
        meta |= {"format": "pt", "lora_adapter_metadata": json.dumps(peft_config, sort_keys=True)}
    else:
        raise ValueError(f"unknown LoRA file format {format!r}; use 'kohya' or 'diffusers'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if format == "kohya":
        meta.setdefault("ss_output_name", path.stem)
        meta.setdefault("modelspec.title", path.stem)
        meta |= kohya_hashes(tensors, meta)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def kohya_text_encoder_key(name: str) -> str:
    """`text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj` -> `lora_te2_text_model_encoder_layers_0_...`."""
    component, _, rest = name.partition(".")
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + rest.replace(".", "_")


def peft_module_key(name: str, prefix: str = "unet") -> str:
    """peft's key of a module: `<prefix>.<path>` for the denoiser; text-encoder names already start
    `text_encoder(_2).`."""
    return name if is_text_encoder_name(name) else f"{prefix}.{name}"


def text_encoder_peft_config(names, rank: int, alpha: float) -> dict:
    """diffusers' `lora_adapter_metadata` entries of a text-encoder LoRA (`text_encoder(_2).r`, `.lora_alpha`,
    `.target_modules`: the layer names, e.g. q_proj), from module names or state-dict keys. diffusers builds each
    encoder's peft LoraConfig from these whenever the file has this metadata at all."""
    config = {}
    for component in ("text_encoder", "text_encoder_2"):
        layers = {n.removesuffix(".lora_down.weight").removesuffix(".lora_up.weight").rpartition(".")[2]
                  for n in names if n.startswith(component + ".")}
        if layers:
            config |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                       f"{component}.target_modules": sorted(layers)}
    return config


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash / sshs_legacy_hash as kohya's train_util.precalculate_safetensors_hashes computes them for
    A1111 (modules/hashes.py addnet_hash_safetensors): the SHA-256 of the tensor bytes after the safetensors
    header, and the first 8 hex digits of the SHA-256 of bytes 0x100000..0x110000 of the file written with only
    the ss_* metadata (empty for a file under 1 MiB, as kohya's)."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def network_args(config: LoRAConfig) -> dict[str, str]:
    """kohya's `ss_network_args` (strings, as its trainer writes them): LoCon's conv_dim/alpha, LyCORIS' DoRA."""
    args = {"conv_dim": str(config.conv_rank), "conv_alpha": str(float(config.conv_alpha or config.conv_rank))} \
        if config.conv_rank else {}
    return args | ({"algo": "locon", "dora_wd": "True"} if config.use_dora else {})


def format_metadata(config: LoRAConfig, family: str = "sdxl") -> dict[str, str]:
    """Our `sdxl_lora.*` description of a LoRA's layout (every format, and training checkpoints)."""
    return {"sdxl_lora.format_version": FORMAT_VERSION, "sdxl_lora.family": family, "sdxl_lora.rank": str(config.rank),
            "sdxl_lora.alpha": str(float(config.alpha)), "sdxl_lora.target_mode": config.target_mode,
            "sdxl_lora.conv_rank": str(config.conv_rank), "sdxl_lora.conv_alpha": str(float(config.conv_alpha)),
            "sdxl_lora.use_dora": str(config.use_dora).lower()}


def peft_patterns(weights: LoRAWeights, rank: int, fold: bool) -> dict:
    """peft's rank_pattern / alpha_pattern (`<prefix>.` keys) for the layers whose rank or alpha differ from the
    main ones (LoCon's convs); with `fold`, alpha / rank is in lora_B, so each layer's lora_alpha is its rank."""
    main_alpha = rank if fold else weights.lora_config().alpha
    ranks, alphas = {}, {}
    for name, (down, _, alpha) in weights.modules.items():
        if is_text_encoder_name(name):
            continue
        alpha = down.shape[0] if fold else alpha
        if down.shape[0] != rank:
            ranks[name] = down.shape[0]
        if alpha != main_alpha:
            alphas[name] = alpha
    prefix = weights.names.peft_prefix
    return ({f"{prefix}.rank_pattern": ranks} if ranks else {}) | \
        ({f"{prefix}.alpha_pattern": alphas} if alphas else {})


def save_lora(model, path, config: LoRAConfig, names: LoRANames, format: Literal["kohya", "diffusers"] = "kohya",
              metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
              text_encoder: nn.Module | None = None) -> Path:
    """Write the model's LoRA layers (and the text encoders', if given and trained) to a LoRA file (see
    `write_lora`); `names`: its family's names of the base model; `metadata`: extra str -> str entries stored in
    the file (e.g. the training settings)."""
    weights = weights_of(model, names, {**_check_metadata(metadata), "sdxl_lora.target_mode": config.target_mode},
                         text_encoder)
    return write_lora(weights, path, format=format, dtype=dtype)


def peft_tensors(sd: dict[str, torch.Tensor], config: LoRAConfig, prefix: str = "unet", family: str = "sdxl"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `lora_state_dict` as a lossless peft file: `<prefix>.<path>.lora_A/B.weight` as trained (alpha not
    folded, DoRA's `lora_magnitude_vector` in peft's shape), lora_alpha (and LoCon's rank/alpha patterns) in
    diffusers' `lora_adapter_metadata`. Returns (tensors, metadata)."""
    tensors, convs = {}, set()
    for key, value in sd.items():
        name, _, part = key.rpartition(".")
        if part == "magnitude":  # peft's shapes: [out] for Linear, [1, out, 1, 1] for Conv2d
            conv = sd[f"{name}.lora_down.weight"].ndim == 4
            tensors[f"{peft_module_key(name, prefix)}.lora_magnitude_vector"] = \
                value.view(1, -1, 1, 1) if conv else value.contiguous()
            continue
        name, _, part = key.rpartition(".lora_")
        tensors[f"{peft_module_key(name, prefix)}.lora_{'A' if part == 'down.weight' else 'B'}.weight"] = \
            value.contiguous()
        if value.ndim == 4:
            convs.add(name)
    modules = sorted({k.rpartition(".lora_")[0] for k in sd if ".lora_" in k and not is_text_encoder_name(k)})
    peft_config = {f"{prefix}.r": config.rank, f"{prefix}.lora_alpha": config.alpha,
                   f"{prefix}.use_dora": config.use_dora, f"{prefix}.target_modules": modules}
    if convs and config.conv_rank != config.rank:
        peft_config[f"{prefix}.rank_pattern"] = {name: config.conv_rank for name in sorted(convs)}
    if convs and (config.conv_alpha or config.conv_rank) != config.alpha:
        peft_config[f"{prefix}.alpha_pattern"] = {name: config.conv_alpha or config.conv_rank for name in sorted(convs)}
    peft_config |= text_encoder_peft_config(sd, config.rank, config.alpha)  # a trained text-encoder LoRA: unfolded
    metadata = format_metadata(config, family) | {"sdxl_lora.dropout": str(float(config.dropout)), "format": "pt",
                                                  "lora_adapter_metadata": json.dumps(peft_config, sort_keys=True)}
    return tensors, metadata


def state_dict_from_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `peft_tensors`: back to `lora_state_dict` keys (exact, no arithmetic)."""
    sd = {}
    for key, value in tensors.items():
        prefix = next((p for p in PEFT_PREFIXES if key.startswith(p)), "")
        stripped = key.removeprefix(prefix)
        suffix = next((s for s in PEFT_SUFFIXES if stripped.endswith(s)), None)
        if suffix is None or (not prefix and not is_text_encoder_name(key)):
            raise ValueError(f"key {key} is not a unet.*/transformer.*.lora_A/lora_B.weight/lora_magnitude_vector "
                             "key of a training checkpoint")
        part = {"down": "lora_down.weight", "up": "lora_up.weight", "magnitude": "magnitude"}[PEFT_SUFFIXES[suffix]]
        sd[f"{stripped.removesuffix(suffix)}.{part}"] = value.flatten() if part == "magnitude" else value
    return sd
