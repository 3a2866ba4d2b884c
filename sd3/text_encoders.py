"""SD3's three frozen text encoders: CLIP-L and CLIP-G (both transformers `CLIPTextModelWithProjection`) and T5-XXL
(`T5EncoderModel`, optional).

The text tokens the MMDiT attends to are the CLIP tokens, each encoder's penultimate hidden state concatenated on
channels (768 + 1280) and zero-padded to T5's width (4096), followed by the T5 tokens (diffusion/t5.py):
(B, 77 + max_sequence_length, 4096). The pooled vector is both CLIPs' projected EOS tokens, concatenated
(768 + 1280). Without T5 (`t5=False`, SD3's "--no_t5") the T5 tokens are zeros, as the pipeline without
text_encoder_3. CLIP-L pads with <|endoftext|>, CLIP-G with "!" (their tokenizer configs; SAI's reference
tokenizers: `pad_with_end` true for CLIP-L, false for CLIP-G).

Reference: diffusers `StableDiffusion3Pipeline.encode_prompt` (pipelines/stable_diffusion_3/
pipeline_stable_diffusion_3.py) with prompt_2 = prompt_3 = prompt, no classifier-free guidance and no clip_skip;
`encode` equals it exactly (tests/test_sd3_text.py).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from diffusion.t5 import t5_embeddings

CLIP_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
MAX_SEQUENCE_LENGTH = 256  # the pipeline's default number of T5 tokens (SD 3.5 was trained with 256)


class SD3TextEncoder(torch.nn.Module):
    """The frozen CLIP-L, CLIP-G and (optional) T5 encoders with their tokenizers: prompts -> (embeds, pooled)."""

    def __init__(self, tokenizer, tokenizer_2, tokenizer_3, text_encoder, text_encoder_2, text_encoder_3=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, joint_attention_dim: int = 4096):
        super().__init__()
        self.tokenizer = tokenizer  # CLIP-L, pads with <|endoftext|>
        self.tokenizer_2 = tokenizer_2  # CLIP-G, pads with "!"
        self.tokenizer_3 = tokenizer_3  # T5 (None without T5)
        self.text_encoder = text_encoder  # CLIPTextModelWithProjection (CLIP-L, identity projection)
        self.text_encoder_2 = text_encoder_2  # CLIPTextModelWithProjection (CLIP-G)
        self.text_encoder_3 = text_encoder_3  # T5EncoderModel, or None: zero T5 tokens
        self.max_sequence_length = max_sequence_length
        # the T5 tokens' width; without T5, the zeros' (the transformer's joint_attention_dim)
        self.joint_attention_dim = text_encoder_3.config.d_model if text_encoder_3 is not None else joint_attention_dim
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Train mode (for a LoRA on the CLIPs: its dropout, checkpointing) reaches only the CLIPs: T5 never trains,
        so it stays in eval mode (its dropout off), as in diffusers' SD3 LoRA example."""
        super().train(mode)
        if self.text_encoder_3 is not None:
            self.text_encoder_3.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", t5: bool = True,
                        max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> "SD3TextEncoder":
        """Load from a diffusers SD3 folder (plain, fp16-variant or sharded safetensors); `t5=False` leaves T5 out
        (zeros). `sd3.loading.load_text_encoder` also takes single files and "tiny-sd3"."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a diffusers SD3 folder (with text_encoder/, tokenizer/, ...)")
        missing = [n + "/" for n in CLIP_PARTS + (T5_PARTS if t5 else ()) if not (root / n).is_dir()]
        if missing:
            hint = "; leave T5 out (--no_t5) or" if set(missing) <= {"text_encoder_3/", "tokenizer_3/"} else ";"
            raise ValueError(f"{root} is not a complete diffusers SD3 folder: missing {', '.join(missing)}{hint} "
                             "give a complete folder")
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True)
        encoders = [load_pretrained(CLIPTextModelWithProjection, root / name, dtype)
                    for name in ("text_encoder", "text_encoder_2")]
        tokenizer_3 = text_encoder_3 = None
        if t5:
            tokenizer_3 = T5TokenizerFast.from_pretrained(str(root / "tokenizer_3"), local_files_only=True)
            text_encoder_3 = load_pretrained(T5EncoderModel, root / "text_encoder_3", dtype)
        return cls(tokenizer, tokenizer_2, tokenizer_3, *encoders, text_encoder_3, max_sequence_length,
                   read_joint_attention_dim(root)).to(device)

    def token_limits(self) -> list[tuple[str, object, int]]:
        """(label, tokenizer, tokens): what a prompt is cut to (diffusion/prompt_limits.py): CLIP's 77, T5's
        max_sequence_length (none without T5)."""
        t5 = [("T5", self.tokenizer_3, self.max_sequence_length)] if self.text_encoder_3 is not None else []
        return [("CLIP", self.tokenizer, self.tokenizer.model_max_length), *t5]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, 77 + max_sequence_length, T5 width) and pooled (B, proj_L + proj_G), no gradients."""
        return self(prompts)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `encode`, with gradients (to a trained text-encoder LoRA on the CLIPs)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        dtype, length = self.text_encoder.dtype, self.tokenizer.model_max_length  # the pipeline uses CLIP-L's 77
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                            return_tensors="pt").input_ids  # (B, 77)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(dtype))  # (B, 77, C_i): penultimate layer, before the final norm
            pooled.append(out.text_embeds)  # (B, proj_i): projected EOS token
        clip = torch.cat(hidden, dim=-1)  # (B, 77, C_L + C_G)
        t5 = t5_embeddings(self.tokenizer_3, self.text_encoder_3, prompts, self.max_sequence_length,
                           width=self.joint_attention_dim, dtype=dtype, device=self.device)  # (B, L_t5, 4096)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero channels up to T5's width
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)  # (B, 77 + L_t5, 4096), (B, 2048)


def read_joint_attention_dim(root: Path) -> int:
    """The transformer's text width (what zero T5 tokens must have), from transformer/config.json; 4096 if absent."""
    config = root / "transformer" / "config.json"
    return int(json.loads(config.read_text()).get("joint_attention_dim", 4096)) if config.is_file() else 4096


def weights_variant(folder: Path) -> str | None:
    """None when `folder` holds plain safetensors weights (one file or shards), "fp16" when only the fp16 variant."""
    for variant, names in (
        (None, ("model.safetensors", "model.safetensors.index.json")),
        ("fp16", ("model.fp16.safetensors", "model.safetensors.index.fp16.json")),
    ):
        if any((folder / name).is_file() for name in names):
            return variant
    raise ValueError(f"no model.safetensors or model.fp16.safetensors (or their shard index) in {folder}; only "
                     "safetensors weights are loaded, never pickle .bin files")


def load_pretrained(model_cls, folder: Path, dtype):
    """A transformers model from its diffusers subfolder, safetensors only, offline."""
    return model_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                     variant=weights_variant(folder), dtype=dtype)
