"""LoRA on a family's CLIP text encoders (`--train_text_encoder`), as kohya's and diffusers' trainers train it:
SDXL's and SD 3.5's CLIP-L (`text_encoder`) and CLIP-G (`text_encoder_2`), FLUX.1's CLIP-L (never T5).

The LoRA layer is lora/layer.py's `LoRALayer` (fp32 over the frozen base Linear), put on the self-attention
projections q/k/v/out_proj of every encoder layer of the family's CLIP models, and on the MLP's fc1/fc2 too with
target mode `all` (peft's usual CLIP target set; kohya's `lora_te1_`/`lora_te2_` modules). Names:
`text_encoder.text_model.encoder.layers.N.self_attn.q_proj` whatever transformers' module tree
(transformers 5's CLIPTextModel has no `text_model.` level; files, diffusers' and kohya's, have it), so the
state dict, EMA, checkpoints and files all use the file spelling (`file_name`).
"""

import torch
from torch import nn

from lora.layer import LoRALayer

COMPONENTS = ("text_encoder.", "text_encoder_2.")
TARGETS = {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")}
TARGETS["all"] = (*TARGETS["attention"], "mlp.fc1", "mlp.fc2")


def file_name(path: str) -> str:
    """`text_encoder.encoder.layers.0...` (a module or parameter path) -> `text_encoder.text_model.encoder...`."""
    component = next(c for c in COMPONENTS[::-1] if path.startswith(c))
    return component + "text_model." + path.removeprefix(component).removeprefix("text_model.")


def is_text_encoder_name(name: str) -> bool:
    return name.startswith(COMPONENTS)


def apply_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                            mode: str = "attention", gradient_checkpointing: bool = False,
                            components: tuple[str, ...] = ("text_encoder", "text_encoder_2")) -> dict[str, LoRALayer]:
    """Wrap the `mode` Linear layers of the CLIP models `components` (the text encoder's attributes; the family
    says which) in LoRALayers (fp32, trainable, the base frozen). The caller puts the encoder in train mode while
    it trains (LoRA dropout; transformers checkpoints only in train mode)."""
    if mode not in TARGETS:
        raise ValueError(f"text-encoder LoRA target mode {mode!r} is not one of {', '.join(TARGETS)}")
    wrapped = {}
    for name, module in list(text_encoder.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith(tuple(c + "." for c in components)) \
                and name.endswith(TARGETS[mode]):
            parent, _, child = name.rpartition(".")
            wrapped[file_name(name)] = LoRALayer(module, rank, alpha, dropout)
            setattr(text_encoder.get_submodule(parent), child, wrapped[file_name(name)])
    for component in components:
        if gradient_checkpointing:  # non-reentrant: the LoRA weights get gradients though the ids need none
            getattr(text_encoder, component).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    return wrapped


def text_encoder_lora_modules(text_encoder: nn.Module | None) -> dict[str, LoRALayer]:
    """File name -> LoRALayer of both encoders (empty when none or not trained)."""
    if text_encoder is None:
        return {}
    return {file_name(n): m for n, m in text_encoder.named_modules() if isinstance(m, LoRALayer)}


def text_encoder_lora_parameters(text_encoder: nn.Module | None) -> dict[str, nn.Parameter]:
    """File name -> trainable parameter (`....lora_down.weight` / `.lora_up.weight`), the keys of the state dict."""
    layers = text_encoder_lora_modules(text_encoder)
    return {f"{name}.{part}.weight": getattr(m, part).weight for name, m in layers.items()
            for part in ("lora_down", "lora_up")}


def text_encoder_lora_state_dict(text_encoder: nn.Module | None) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in text_encoder_lora_parameters(text_encoder).items()}


@torch.no_grad()
def load_text_encoder_lora_state_dict(text_encoder: nn.Module | None, sd: dict[str, torch.Tensor]) -> None:
    """Copy a `text_encoder_lora_state_dict` back; keys and shapes must match exactly."""
    params = text_encoder_lora_parameters(text_encoder)
    wrong = sorted(set(params) ^ set(sd)) or [k for k in params if params[k].shape != sd[k].shape]
    if wrong:
        raise ValueError(f"text-encoder LoRA weights do not match this run's (first: {wrong[0]}); was it saved with "
                         "another --train_text_encoder, --text_encoder_target_mode or --lora_rank?")
    for k, p in params.items():
        p.copy_(sd[k])
