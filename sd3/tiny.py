"""The embedded tiny SD 3.5: an SD 3.5 Medium-shaped model small enough to train on a CPU.

It has SD 3.5 Medium's structure (MMDiT-X: dual attention in the first blocks, RMS qk-norm, the pre-only last
block; patch 2 on 16 latent channels; a 16-channel 8x VAE with shift and scale; CLIP-L with an identity
projection, CLIP-G and a T5 encoder) at small widths, 1.4 M transformer parameters and about 3 M in all, with
locally built tokenizers (diffusion/tokenizers.py: byte-level CLIP BPE, a T5 Unigram over printable ASCII).
Its weights ship in sd3/tiny_weights/: pretrained on the tiny world (`python -m tools.pretrain_tiny sd3 OUT`, its
report in pretrain_report.json, measured in docs/tiny_model.md), used by default; `--random` writes the random
model (from fixed seeds) instead.

`python -m sd3.tiny OUT_DIR` writes it in diffusers' folder layout (transformer/, vae/, text_encoder/,
text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/, model_index.json; fp32
files), which diffusers' `StableDiffusion3Pipeline.from_pretrained` also loads. `--pretrained_model tiny-sd3`
calls `tiny_sd3_path()` (through sd3/loading.py), which builds it once into a cache. Two builds are
byte-identical; `TINY_VERSION` names the cache folder and changes whenever what is written changes.
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from common.files import atomic_write, cache_dir, write_json
from diffusion.tiny_parts import load_text_encoder_weights, seeded, tiny_vae
from diffusion.tokenizers import build_clip_tokenizer, build_t5_tokenizer, write_clip_vocab_files
from sd3.configs import SD3_SCHEDULER_CONFIG, config_to_diffusers
from sd3.mmdit import MMDiTConfig, SD3Transformer

TINY_VERSION = 3  # 1: random weights; 2: word pieces in the T5 tokenizer, T5 length 32; 3: pretrained
# The tiny model's T5 length, written as its tokenizer_3's model_max_length: sd3/loading.py's default T5 length is
# SD 3.5's 256 capped by it, so CPU training and sampling attend over 77 + 32 text tokens, not 77 + 256.
# StableDiffusion3Pipeline takes the length as a call argument (max_sequence_length=32 in the parity tests).
TINY_MAX_SEQUENCE_LENGTH = 32
WEIGHTS = Path(__file__).resolve().parent / "tiny_weights"  # transformer, vae, text_encoder{,_2,_3} .safetensors

# 1.4 M parameters. Text tokens: CLIP-L 32 + CLIP-G 64 channels zero-padded to T5's 128; pooled 32 + 64 = 96.
TINY_MMDIT_CONFIG = MMDiTConfig(
    num_layers=4, num_attention_heads=3, attention_head_dim=32, joint_attention_dim=128, caption_projection_dim=96,
    pooled_projection_dim=96, sample_size=32, pos_embed_max_size=32,  # images up to 512 px a side
    dual_attention_layers=(0, 1), qk_norm="rms_norm",
)  # fmt: skip

TINY_VAE_CONFIG = {  # 1.0 M parameters; SD3's VAE: 16 latent channels, no quant convs, shift and scale
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 16,
    "sample_size": 256,
    "scaling_factor": 1.5305,  # SD3's, until a pretrained tiny VAE brings its own (measured) values
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}

TINY_CLIP_L_CONFIG = dict(  # CLIP-L in SD3: 768 wide, 3072 MLP, 12 heads, 12 layers, identity projection
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, hidden_act="quick_gelu",
    projection_dim=32, max_position_embeddings=77,
)  # fmt: skip
TINY_CLIP_G_CONFIG = dict(  # CLIP-G (OpenCLIP bigG) in SD3: 1280 wide, 5120 MLP, 20 heads, 32 layers
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, hidden_act="gelu",
    projection_dim=64, max_position_embeddings=77,
)  # fmt: skip
TINY_T5_CONFIG = dict(  # T5 v1.1 XXL: d_model 4096, 64 heads of 64, d_ff 10240, 24 layers, gated GELU
    d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False,
)  # fmt: skip

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def default_weights() -> Path | None:
    """The shipped pretrained weights, or None (random) while none ship."""
    return WEIGHTS if (WEIGHTS / "transformer.safetensors").is_file() else None


def write_tiny_text_encoders(root: Path, seed: int = 2, weights: Path | None = None) -> None:
    """Write root/{text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3}: random from
    `seed`, or the weights of `weights/text_encoder*.safetensors`; the same inputs give identical bytes."""
    root = Path(root)
    tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer("<|endoftext|>"), build_clip_tokenizer("!"), \
        build_t5_tokenizer()
    for loader_key in ("is_local", "local_files_only"):  # how it was loaded, which transformers 5 would save
        tokenizer_3.init_kwargs.pop(loader_key, None)
    tokenizer_3.model_max_length = TINY_MAX_SEQUENCE_LENGTH
    models = {}
    for i, (name, sizes, tok) in enumerate((("text_encoder", TINY_CLIP_L_CONFIG, tokenizer),
                                            ("text_encoder_2", TINY_CLIP_G_CONFIG, tokenizer_2))):
        # eos_token_id must be the tokenizer's real one: with any value but 2, CLIP pools the hidden state at the
        # first position holding eos_token_id (the legacy value 2 means "argmax of ids").
        config = CLIPTextConfig(vocab_size=len(tok), **sizes, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        models[name] = seeded(seed + i, lambda config=config: CLIPTextModelWithProjection(config))
    with torch.no_grad():  # SD3's CLIP-L pools through the identity (SAI's single files store no projection)
        models["text_encoder"].text_projection.weight.copy_(torch.eye(TINY_CLIP_L_CONFIG["hidden_size"]))
    t5_config = T5Config(vocab_size=len(tokenizer_3), **TINY_T5_CONFIG, pad_token_id=tokenizer_3.pad_token_id,
                         eos_token_id=tokenizer_3.eos_token_id, decoder_start_token_id=tokenizer_3.pad_token_id)
    models["text_encoder_3"] = seeded(seed + 2, lambda: T5EncoderModel(t5_config))
    for name, model in models.items():
        if weights is not None:
            load_text_encoder_weights(model, weights / f"{name}.safetensors")
        model.save_pretrained(root / name, safe_serialization=True)
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2), ("tokenizer_3", tokenizer_3)):
        tok.save_pretrained(root / name)
    for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt keep transformers 4's slow tokenizer happy
        write_clip_vocab_files(root / name)


def write_tiny_vae(root: Path, seed: int = 1, weights: Path | None = None) -> Path:
    """Write the tiny 16-channel VAE to root/vae/: random from `seed`, or `weights/vae.safetensors` (whose metadata
    carries its measured scaling_factor and shift_factor)."""
    out = Path(root) / "vae"
    tiny_vae(TINY_VAE_CONFIG, seed, weights).save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_transformer(root: Path, seed: int = 0, weights: Path | None = None) -> Path:
    """Write the tiny MMDiT (`TINY_MMDIT_CONFIG`) to root/transformer/ in fp32: random from `seed`, or
    `weights/transformer.safetensors` (any float dtype, written as fp32)."""
    if weights is None:
        sd = seeded(seed, lambda: SD3Transformer(TINY_MMDIT_CONFIG).state_dict())
    else:
        sd = load_file(weights / "transformer.safetensors")
    out = Path(root) / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, out / "diffusion_pytorch_model.safetensors")
    write_json(out / "config.json", config_to_diffusers(TINY_MMDIT_CONFIG))
    return out


def build(out_dir: Path, weights: Path | None = None) -> Path:
    """Write the tiny SD 3.5 into `out_dir` (created; must be empty or absent): the weights of the folder
    `weights`, or random weights with `weights=None`. `tiny_sd3_path` builds it with `default_weights()`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_transformer(out_dir, seed=0, weights=weights)
    write_tiny_vae(out_dir, seed=1, weights=weights)
    write_tiny_text_encoders(out_dir, seed=2, weights=weights)
    write_json(out_dir / "scheduler" / "scheduler_config.json", SD3_SCHEDULER_CONFIG)
    write_json(out_dir / "model_index.json", MODEL_INDEX)
    return out_dir


def tiny_sd3_path() -> Path:
    """The tiny SD 3.5's folder, built on first use, through a temporary folder renamed into place, so a crash or a
    concurrent process never leaves a half-written model behind."""
    final = cache_dir() / f"tiny-sd3-v{TINY_VERSION}"
    if not (final / "model_index.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(final, lambda tmp: build(tmp, weights=default_weights()), folder=True, replace=False)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the tiny SD 3.5 (diffusers folder layout) to OUT_DIR.")
    p.add_argument("out_dir", type=Path, help="folder to create, e.g. ./weights/tiny-sd3")
    p.add_argument("--weights", type=Path, default=default_weights(),
                   help="folder of pretrained weights (transformer.safetensors, vae.safetensors, "
                        "text_encoder{,_2,_3}.safetensors); default: the shipped sd3/tiny_weights, if any")
    p.add_argument("--random", action="store_true", help="random weights (what a pretraining starts from)")
    args = p.parse_args(argv)
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        print(f"error: {args.out_dir} already exists and is not an empty folder; choose a new path", file=sys.stderr)
        return 2
    weights = None if args.random else args.weights
    build(args.out_dir, weights=weights)
    print(f"wrote the tiny SD 3.5 ({'random' if weights is None else 'pretrained'} weights) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
