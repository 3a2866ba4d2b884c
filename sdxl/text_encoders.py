"""SDXL's two frozen CLIP text encoders, and a tiny random pair for tests.

SDXL conditions its UNet on two CLIP text encoders: CLIP ViT-L (transformers `CLIPTextModel`) and
OpenCLIP bigG (`CLIPTextModelWithProjection`). The prompt embedding is the penultimate hidden state of
each, concatenated on channels (768 + 1280 = 2048); the pooled embedding is encoder 2's `text_embeds`,
the projection of its final-norm EOS token (1280).

Reference: diffusers `StableDiffusionXLPipeline.encode_prompt`
(diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py); `encode` equals it with
`do_classifier_free_guidance=False` and no `clip_skip` (tests/test_text_encoders.py checks this).

The tiny pair uses CLIP BPE tokenizers built locally from a byte-level vocabulary (every byte is a
symbol, so any text, emoji included, tokenizes without unknown tokens) and nothing is downloaded.
"""

import json
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
        self.eval()

    def train(self, mode: bool = True):
        # Frozen: a parent module's .train() must not switch the encoders out of eval mode.
        return super().train(False)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load from a diffusers SDXL folder (fp32 or fp16-variant safetensors), or the word "tiny"."""
        if str(path) == "tiny":
            from sdxl.tiny import tiny_model_path  # lazy: tiny.py imports this module

            path = tiny_model_path()
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

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings (B, 77, C1 + C2) and pooled embeddings (B, projection_dim)."""
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


# ---------------------------------------------------------------------------------------------------
# Locally built CLIP BPE tokenizer (no download)

# A few merges so the BPE path is exercised; CLIP's real merges.txt has 48894.
TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"))


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's byte -> printable symbol table, in vocabulary order (printable bytes first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    # Printable bytes map to themselves; the others to 256, 257, ... so no symbol is whitespace/control.
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _write_vocab_files(folder: Path) -> None:
    """Write CLIP-style vocab.json and merges.txt: bytes, bytes + "</w>", merges, then the special tokens."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in TINY_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")


def build_clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a byte-level vocabulary, built locally.

    SDXL's tokenizer 1 pads with "<|endoftext|>", tokenizer 2 with "!".
    """
    with tempfile.TemporaryDirectory() as tmp:
        _write_vocab_files(Path(tmp))
        # vocab.json + merges.txt is the layout both transformers 4 (slow tokenizer) and 5 (converted
        # to a `tokenizers` BPE on load) read; once loaded the tokenizer needs no files.
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            local_files_only=True,
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token=pad_token,
        )
    # transformers 5 records how it was loaded and would write it into tokenizer_config.json.
    for loader_key in ("is_local", "local_files_only", "vocab_file", "merges_file"):
        tokenizer.init_kwargs.pop(loader_key, None)
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# The tiny random text encoders (same structure as SDXL's, small widths)

TINY_TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L in SDXL: 768 wide, 3072 MLP, 12 heads, 12 layers
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
    hidden_act="quick_gelu", projection_dim=32, max_position_embeddings=77,
)  # fmt: skip
TINY_TEXT_ENCODER_2_CONFIG = dict(  # OpenCLIP bigG in SDXL: 1280 wide, 5120 MLP, 20 heads, 32 layers
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
    hidden_act="gelu", projection_dim=32, max_position_embeddings=77,
)  # fmt: skip


def tiny_text_encoder_configs(tokenizer, tokenizer_2) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """CLIPTextConfigs of the tiny encoders, with vocab size and special-token ids from the tokenizers."""
    configs = []
    for sizes, tok in ((TINY_TEXT_ENCODER_CONFIG, tokenizer), (TINY_TEXT_ENCODER_2_CONFIG, tokenizer_2)):
        # eos_token_id must be the tokenizer's real one: with any value but 2, CLIP pools the hidden
        # state at the first position holding eos_token_id (the legacy value 2 means "argmax of ids").
        ids = dict(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        configs.append(CLIPTextConfig(vocab_size=len(tok), **sizes, **ids))
    return configs[0], configs[1]


def write_tiny_text_encoders(root: Path, seed: int = 0) -> None:
    """Write root/{text_encoder, text_encoder_2, tokenizer, tokenizer_2}; same seed -> identical bytes."""
    root = Path(root)
    tokenizer, tokenizer_2 = build_clip_tokenizer("<|endoftext|>"), build_clip_tokenizer("!")
    config, config_2 = tiny_text_encoder_configs(tokenizer, tokenizer_2)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(config)
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(config_2)
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        tok.save_pretrained(root / name)
        # transformers 5 saves only tokenizer.json; vocab.json + merges.txt (as in SDXL's own folders)
        # keep the folder loadable by transformers 4's slow CLIPTokenizer too.
        _write_vocab_files(root / name)
