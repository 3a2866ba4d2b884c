"""SDXL's two frozen CLIP text encoders.

SDXL conditions its UNet on two CLIP text encoders: CLIP ViT-L (transformers `CLIPTextModel`) and
OpenCLIP bigG (`CLIPTextModelWithProjection`). The prompt embedding is the penultimate hidden state of
each, concatenated on channels (768 + 1280 = 2048); the pooled embedding is encoder 2's `text_embeds`,
the projection of its final-norm EOS token (1280).

Reference: diffusers `StableDiffusionXLPipeline.encode_prompt`
(diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py); `encode` equals it with
`do_classifier_free_guidance=False` and no `clip_skip` (tests/test_text_encoders.py checks this).
"""

from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SUBFOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class SDXLTextEncoder(torch.nn.Module):
    """Both frozen CLIP encoders with their tokenizers: prompts -> (prompt_embeds, pooled)."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        super().__init__()
        self.tokenizer = tokenizer  # CLIP ViT-L tokenizer, pads with <|endoftext|>
        self.tokenizer_2 = tokenizer_2  # OpenCLIP bigG tokenizer, pads with "!"
        self.text_encoder = text_encoder  # CLIPTextModel
        self.text_encoder_2 = text_encoder_2  # CLIPTextModelWithProjection
        self.requires_grad_(False)
        self.eval()  # frozen; the trainer puts it in train mode only while a LoRA on it trains

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load from a diffusers SDXL folder (fp32 or fp16-variant safetensors); `sdxl.loading.load_text_encoder`
        also takes single files and the word "tiny"."""
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"SDXL model folder not found: {root} (run download_weights.sh, or pass 'tiny')"
            )
        if not root.is_dir():
            raise ValueError(
                f"{root} is a file; the text encoders load from a diffusers SDXL folder "
                f"with {', '.join(s + '/' for s in SUBFOLDERS)} (run download_weights.sh)"
            )
        missing = [name + "/" for name in SUBFOLDERS if not (root / name).is_dir()]
        if missing:
            raise ValueError(
                f"{root} is not a diffusers SDXL folder: missing {', '.join(missing)} "
                "(re-run download_weights.sh, or pass 'tiny')"
            )
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True)
        encoders = []
        for model_cls, name in (
            (CLIPTextModel, "text_encoder"),
            (CLIPTextModelWithProjection, "text_encoder_2"),
        ):
            folder = root / name
            encoders.append(
                model_cls.from_pretrained(
                    str(folder),
                    local_files_only=True,
                    use_safetensors=True,
                    variant=_weights_variant(folder),
                    dtype=dtype,
                )
            )
        return cls(tokenizer, tokenizer_2, *encoders).to(device)

    def token_limits(self) -> list[tuple[str, object, int]]:
        """(label, tokenizer, tokens): what a prompt is cut to (diffusion/prompt_limits.py); both CLIPs read 77."""
        return [("CLIP", self.tokenizer, self.tokenizer.model_max_length)]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, 77, C1 + C2) and pooled embeddings (B, projection_dim), without gradients."""
        return self(prompts)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `encode`, with gradients (to a trained text-encoder LoRA)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        hidden = []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids  # (B, 77)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, 77, C_i): penultimate layer, before the final norm
        prompt_embeds = torch.cat(hidden, dim=-1)  # (B, 77, C1 + C2)
        pooled = out.text_embeds  # (B, projection_dim): encoder 2's projected EOS token
        return prompt_embeds, pooled


def _weights_variant(folder: Path) -> str | None:
    """None when `folder` holds plain safetensors weights, "fp16" when only the fp16 variant is there."""
    for variant, names in (
        (None, ("model.safetensors", "model.safetensors.index.json")),
        ("fp16", ("model.fp16.safetensors", "model.safetensors.index.fp16.json")),
    ):
        if any((folder / name).is_file() for name in names):
            return variant
    raise ValueError(
        f"no model.safetensors or model.fp16.safetensors in {folder}; only safetensors weights are "
        "loaded, never pickle .bin files (re-run download_weights.sh)"
    )
