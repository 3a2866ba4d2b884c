"""FLUX.1's two frozen text encoders: CLIP ViT-L for the pooled vector, T5-XXL for the token sequence.

FLUX.1 conditions its transformer on the T5 encoder's last hidden state (B, max_sequence_length, 4096; the
prompt padded or truncated to max_sequence_length tokens: 512 for dev, 256 for schnell) and on CLIP-L's pooled
output (B, 768: the final-norm hidden state at the EOS token, transformers' `pooler_output`, no projection).
No classifier-free guidance prompt: dev's guidance is an input of the transformer, schnell needs none.

Reference: diffusers `FluxPipeline.encode_prompt` (diffusers/pipelines/flux/pipeline_flux.py); `encode` equals it
with `prompt_2=None` and the same `max_sequence_length` (tests/test_flux_text.py checks this, bit for bit).
"""

from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from diffusion.t5 import t5_embeddings

SUBFOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxTextEncoder(torch.nn.Module):
    """CLIP-L and T5 with their tokenizers, frozen and in eval mode: prompts -> (prompt_embeds (B, L, 4096), pooled
    (B, 768)). A training loop calls `.train(True)` only while a LoRA on CLIP-L trains (lora/text_encoders.py)."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, max_sequence_length: int = 512):
        super().__init__()
        self.tokenizer = tokenizer  # CLIP BPE, 77 tokens
        self.tokenizer_2 = tokenizer_2  # T5 SentencePiece
        self.text_encoder = text_encoder  # CLIPTextModel (CLIP ViT-L/14)
        self.text_encoder_2 = text_encoder_2  # T5EncoderModel (T5 v1.1 XXL)
        self.max_sequence_length = max_sequence_length
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Only CLIP-L ever takes a LoRA. T5 stays in eval mode: FLUX.1's T5-XXL config has dropout_rate 0.1, which
        # train mode would switch on and so change the embeddings the transformer was trained with.
        super().train(mode)
        self.text_encoder_2.eval()
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", max_sequence_length: int = 512):
        """Load from a diffusers FLUX.1 folder (safetensors, plain, fp16 variant or sharded); flux.loading's
        `load_text_encoder` also takes "tiny-flux" and single files (with a folder for the encoders)."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder; the text encoders load from a diffusers FLUX.1 folder with "
                             f"{', '.join(s + '/' for s in SUBFOLDERS)}")
        missing = [name + "/" for name in SUBFOLDERS if not (root / name).is_dir()]
        if missing:
            raise ValueError(f"{root} is not a complete diffusers FLUX.1 folder: missing {', '.join(missing)}")
        if not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length {max_sequence_length} must be in 1..512 (FLUX.1 was trained "
                             "with 512 (dev) and 256 (schnell))")
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        tokenizer_2 = T5Tokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True)
        encoders = []
        for model_cls, name in ((CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")):
            folder = root / name
            encoders.append(model_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                      variant=_weights_variant(folder), dtype=dtype))
        return cls(tokenizer, tokenizer_2, *encoders, max_sequence_length=max_sequence_length).to(device)

    def token_limits(self) -> list[tuple[str, object, int]]:
        """(label, tokenizer, tokens): what a prompt is cut to (diffusion/prompt_limits.py): T5's
        max_sequence_length, and CLIP's 77 for the pooled vector."""
        return [("T5", self.tokenizer_2, self.max_sequence_length),
                ("CLIP", self.tokenizer, self.tokenizer.model_max_length)]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings (B, max_sequence_length, C_t5) and CLIP pooled (B, C_clip), without gradients."""
        return self(prompts)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `encode`, with gradients (to a trained CLIP-L LoRA)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # (B, 77)
        pooled = self.text_encoder(ids.to(self.text_encoder.device)).pooler_output  # (B, 768): EOS token, final norm
        embeds = t5_embeddings(self.tokenizer_2, self.text_encoder_2, prompts, self.max_sequence_length)  # (B, L, 4096)
        return embeds, pooled


def _weights_variant(folder: Path) -> str | None:
    """None when `folder` holds plain safetensors weights (one file or shards), "fp16" for the fp16 variant."""
    for variant, names in (
        (None, ("model.safetensors", "model.safetensors.index.json")),
        ("fp16", ("model.fp16.safetensors", "model.safetensors.index.fp16.json")),
    ):
        if any((folder / name).is_file() for name in names):
            return variant
    raise ValueError(f"no model.safetensors (or its fp16 variant or shards) in {folder}; only safetensors weights "
                     "are loaded, never pickle .bin files")
