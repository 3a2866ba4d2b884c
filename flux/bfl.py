"""Key maps between Black Forest Labs' single-file FLUX.1 names and diffusers' names, both directions.

BFL's release files (`flux1-dev.safetensors`, `flux1-schnell.safetensors`) hold the state dict of their `Flux`
module (github.com/black-forest-labs/flux, `model.py` + `modules/layers.py`); ComfyUI saves the same names under
`model.diffusion_model.`. The other side is diffusers' `FluxTransformer2DModel` (= our flux/transformer.py).
Apart from renames, three layouts differ:

- a double block fuses q, k, v of each stream (`img_attn.qkv`, `txt_attn.qkv`: [q; k; v] on dim 0);
- a single block fuses q, k, v and the MLP input (`linear1`: [q; k; v; mlp]) and names the output `linear2`;
- the final adaLN projection (`final_layer.adaLN_modulation.1`) is (shift, scale) in BFL, (scale, shift) in
  diffusers' AdaLayerNormContinuous: the halves are swapped.

`module_names` gives, per BFL module, the diffusers modules concatenated into it (what a LoRA name map also
needs); `bfl_to_diffusers` and `diffusers_to_bfl` convert state dicts through it. diffusers' own conversion is
`convert_flux_transformer_checkpoint_to_diffusers` (diffusers/loaders/single_file_utils.py); tests compare.
"""

import torch
from torch import Tensor

PREFIX = "model.diffusion_model."  # ComfyUI's (and the original scripts' checkpoint) prefix
FINAL = "final_layer.adaLN_modulation.1"  # halves swapped
NORM_PARAMS = (("scale", "weight"),)  # BFL's RMSNorm calls its weight `scale`
LINEAR_PARAMS = (("weight", "weight"), ("bias", "bias"))


def module_names(num_layers: int, num_single_layers: int, guidance: bool) -> dict[str, tuple[str, ...]]:
    """BFL module -> the diffusers modules whose outputs it concatenates (one for a plain rename), in BFL's order."""
    names = {
        "img_in": ("x_embedder",), "txt_in": ("context_embedder",),
        "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
        "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
        "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
        "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    }  # fmt: skip
    if guidance:
        names["guidance_in.in_layer"] = ("time_text_embed.guidance_embedder.linear_1",)
        names["guidance_in.out_layer"] = ("time_text_embed.guidance_embedder.linear_2",)
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        names |= {
            f"{b}.img_mod.lin": (f"{d}.norm1.linear",), f"{b}.txt_mod.lin": (f"{d}.norm1_context.linear",),
            f"{b}.img_attn.qkv": (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"),
            f"{b}.txt_attn.qkv": (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"),
            f"{b}.img_attn.norm.query_norm": (f"{d}.attn.norm_q",),
            f"{b}.img_attn.norm.key_norm": (f"{d}.attn.norm_k",),
            f"{b}.txt_attn.norm.query_norm": (f"{d}.attn.norm_added_q",),
            f"{b}.txt_attn.norm.key_norm": (f"{d}.attn.norm_added_k",),
            f"{b}.img_attn.proj": (f"{d}.attn.to_out.0",), f"{b}.txt_attn.proj": (f"{d}.attn.to_add_out",),
            f"{b}.img_mlp.0": (f"{d}.ff.net.0.proj",), f"{b}.img_mlp.2": (f"{d}.ff.net.2",),
            f"{b}.txt_mlp.0": (f"{d}.ff_context.net.0.proj",), f"{b}.txt_mlp.2": (f"{d}.ff_context.net.2",),
        }  # fmt: skip
    for i in range(num_single_layers):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        names |= {
            f"{b}.modulation.lin": (f"{d}.norm.linear",),
            f"{b}.linear1": (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
            f"{b}.norm.query_norm": (f"{d}.attn.norm_q",), f"{b}.norm.key_norm": (f"{d}.attn.norm_k",),
            f"{b}.linear2": (f"{d}.proj_out",),
        }  # fmt: skip
    names["final_layer.linear"] = ("proj_out",)
    names[FINAL] = ("norm_out.linear",)
    return names


def _params(module: str):
    return NORM_PARAMS if module.endswith("_norm") else LINEAR_PARAMS


def swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) on dim 0."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def strip_prefix(sd: dict) -> dict:
    """The transformer's tensors without ComfyUI's `model.diffusion_model.` prefix; a file that has the prefix may
    also hold text encoders and a VAE under other prefixes, which are left out."""
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return sd


def layout(keys) -> tuple[int, int, bool]:
    """(double blocks, single blocks, guidance embedding) of a BFL-named state dict, from its keys."""
    def count(prefix):
        return len({int(k.split(".")[1]) for k in keys if k.startswith(prefix)})

    return count("double_blocks."), count("single_blocks."), any(k.startswith("guidance_in.") for k in keys)


def param_names(keys) -> dict[str, tuple[str, ...]]:
    """BFL tensor name -> the diffusers tensor names it holds, for the layout these keys (prefix stripped) have.
    A missing or unknown key is a ValueError naming it."""
    names = {f"{module}.{src}": tuple(f"{t}.{dst}" for t in targets)
             for module, targets in module_names(*layout(keys)).items() for src, dst in _params(module)}
    missing, unknown = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
    for label, found in (("missing", missing), ("unknown", unknown)):
        if found:
            more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
            raise ValueError(f"{label} keys for a FLUX.1 transformer in Black Forest Labs' names: "
                             f"{', '.join(found[:3])}{more}")
    return names


def convert_tensor(key: str, t: Tensor, targets: tuple[str, ...], hidden: int) -> dict[str, Tensor]:
    """One BFL tensor -> its diffusers tensors: renamed, split (views) on dim 0 into q, k, v (, mlp) of width
    `hidden` each (the MLP takes the rest), or with its halves swapped (the final adaLN)."""
    if len(targets) == 1:
        return {targets[0]: swap_halves(t) if key.startswith(FINAL) else t}
    sizes = [hidden] * 3 + ([t.shape[0] - 3 * hidden] if len(targets) == 4 else [])
    return dict(zip(targets, t.split(sizes, dim=0), strict=True))


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A FLUX.1 transformer state dict in BFL names (ComfyUI's prefix optional) -> diffusers names. A missing or
    unknown key is a ValueError naming it. Fused tensors are split into views, no copies."""
    sd = strip_prefix(sd)
    if "img_in.weight" not in sd:
        raise ValueError("not a FLUX.1 transformer in Black Forest Labs' names: no img_in.weight")
    names, hidden = param_names(sd), sd["img_in.weight"].shape[0]
    out = {}
    for key, t in sd.items():
        out |= convert_tensor(key, t, names[key], hidden)
    return out


def diffusers_to_bfl(sd: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """diffusers names -> BFL names (fused q/k/v(/mlp) concatenated, final adaLN halves swapped), each key with
    `prefix` (e.g. `PREFIX` for ComfyUI's layout)."""
    num_layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    num_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in sd)
    out = {}
    for module, sources in module_names(num_layers, num_single, guidance).items():
        for dst, src in _params(module):
            parts = [sd[f"{s}.{src}"] for s in sources]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            out[f"{prefix}{module}.{dst}"] = swap_halves(t) if module == FINAL else t
    return out
