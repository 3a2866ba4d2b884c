"""The embedded tiny FLUX (`tiny-flux`): a FLUX.1-dev-shaped model small enough for a CPU.

It has FLUX.1-dev's structure (double- then single-stream blocks, qk RMSNorm, 3-axis RoPE, guidance embedding,
64 input channels = 16 latent channels x 2x2 packing, a 16-channel 8x VAE with shift and scale, CLIP-L pooled +
T5 sequence conditioning) at small widths, and locally built tokenizers (diffusion/tokenizers.py). Its weights
ship in flux/tiny_weights/: pretrained on the tiny world (`python -m tools.pretrain_tiny flux OUT`, its report
in pretrain_report.json, measured in docs/tiny_model.md); `--random` builds the random model instead.

`python -m flux.tiny OUT_DIR` writes it in diffusers' folder layout (transformer/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, model_index.json; fp32 files), which diffusers'
`FluxPipeline.from_pretrained` also loads. `tiny-flux` anywhere calls `tiny_flux_path()` (through
flux/loading.py), which builds it once into a cache. Two builds are byte-identical; `TINY_FLUX_VERSION` names the
cache folder and changes whenever what is written changes.
"""

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from common.files import atomic_write, cache_dir, write_json
from diffusion.tiny_parts import load_text_encoder_weights, seeded, tiny_vae
from diffusion.tokenizers import build_clip_tokenizer, build_t5_tokenizer, write_clip_vocab_files
from flux.configs import FLUX_DEV_SCHEDULER, config_to_diffusers
from flux.transformer import FluxConfig, FluxTransformer

# 1: random; 2: T5 length 32 (tokenizer_2's model_max_length); 3: T5 word pieces; 4: pretrained; 5: pretrained
# longer (7000 steps)
TINY_FLUX_VERSION = 5
WEIGHTS = Path(__file__).resolve().parent / "tiny_weights"  # transformer, vae, text_encoder{,_2} .safetensors
# The tiny model's T5 length, written as its tokenizer_2's model_max_length: flux/loading.py's default T5 length is
# the model's (512 dev, 256 schnell) capped by it, so CPU training and sampling attend over 32 text tokens, not 512.
# FluxPipeline takes the length as a call argument (max_sequence_length=32 in the parity tests).
TINY_MAX_SEQUENCE_LENGTH = 32

# 0.55 M parameters. Heads of 16 = RoPE axes 4 + 6 + 6; context 48 = tiny T5 width, pooled 32 = tiny CLIP width
# (different on purpose, so a swapped input fails loudly).
TINY_TRANSFORMER_CONFIG = FluxConfig(
    num_layers=2,
    num_single_layers=3,
    num_attention_heads=4,
    attention_head_dim=16,
    joint_attention_dim=48,
    pooled_projection_dim=32,
    in_channels=64,
    out_channels=64,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

TINY_VAE_CONFIG = {  # 1.0 M parameters; FLUX.1's VAE: 16 latent channels, no quant convs, shift and scale
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 16,
    "sample_size": 128,
    "scaling_factor": 0.3611,  # FLUX.1's values, until a pretrained tiny VAE measures its own
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}

TINY_CLIP_CONFIG = dict(  # CLIP ViT-L in FLUX.1: 768 wide, 3072 MLP, 12 heads, 12 layers
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
    hidden_act="quick_gelu", projection_dim=32, max_position_embeddings=77,
)  # fmt: skip
TINY_T5_CONFIG = dict(  # T5 v1.1 XXL in FLUX.1: 4096 wide, 10240 gated-GELU MLP, 64 heads of 64, 24 layers
    d_model=48, d_ff=96, d_kv=12, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
)  # fmt: skip

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_tiny_text_encoders(root: Path, seed: int = 2, weights: Path | None = None) -> None:
    """Write root/{text_encoder, text_encoder_2, tokenizer, tokenizer_2}: random from `seed`, or with the weights
    of `weights/text_encoder*.safetensors`; the same inputs give identical bytes."""
    root = Path(root)
    tokenizer, tokenizer_2 = build_clip_tokenizer("<|endoftext|>"), build_t5_tokenizer()
    tokenizer_2.model_max_length = TINY_MAX_SEQUENCE_LENGTH
    # eos_token_id must be the tokenizer's real one: with any value but 2, CLIP pools the hidden state at the
    # first position holding eos_token_id (the legacy value 2 means "argmax of ids").
    clip = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_CLIP_CONFIG)
    t5 = T5Config(vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id,
                  eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0, **TINY_T5_CONFIG)
    text_encoder = seeded(seed, lambda: CLIPTextModel(clip))
    text_encoder_2 = seeded(seed + 1, lambda: T5EncoderModel(t5))
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if weights is not None:
            load_text_encoder_weights(model, weights / f"{name}.safetensors")
        model.save_pretrained(root / name, safe_serialization=True)
    tokenizer.save_pretrained(root / "tokenizer")
    write_clip_vocab_files(root / "tokenizer")  # vocab.json + merges.txt, as in FLUX.1's own folder
    tokenizer_2.save_pretrained(root / "tokenizer_2")


def default_weights() -> Path | None:
    """The shipped pretrained weights, or None (random) while none ship."""
    return WEIGHTS if (WEIGHTS / "transformer.safetensors").is_file() else None


def write_tiny_vae(root: Path, seed: int = 1, weights: Path | None = None) -> Path:
    """Write the tiny 16-channel VAE (`TINY_VAE_CONFIG`) to root/vae/: random from `seed`, or the weights of
    `weights/vae.safetensors` (whose metadata carries its measured scaling_factor and shift_factor);
    byte-identical for the same inputs."""
    out = Path(root) / "vae"
    tiny_vae(TINY_VAE_CONFIG, seed, weights).save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_transformer(root: Path, seed: int = 0, weights: Path | None = None) -> Path:
    """Write the tiny transformer (`TINY_TRANSFORMER_CONFIG`) to root/transformer/ in fp32: random from `seed`,
    or the weights of `weights/transformer.safetensors` (any float dtype, written as fp32)."""
    if weights is None:
        sd = seeded(seed, lambda: FluxTransformer(TINY_TRANSFORMER_CONFIG).state_dict())
    else:
        sd = load_file(weights / "transformer.safetensors")
    out = Path(root) / "transformer"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, out / "diffusion_pytorch_model.safetensors")
    write_json(out / "config.json", config_to_diffusers(TINY_TRANSFORMER_CONFIG))
    return out


def build(out_dir: Path, weights: Path | None = None) -> Path:
    """Write the tiny FLUX into `out_dir` (created; must be empty or absent): the pretrained weights of the folder
    `weights`, or random weights with `weights=None`. `tiny_flux_path` builds it with `default_weights()`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_transformer(out_dir, weights=weights)
    write_tiny_vae(out_dir, weights=weights)
    write_tiny_text_encoders(out_dir, weights=weights)
    write_json(out_dir / "scheduler" / "scheduler_config.json", FLUX_DEV_SCHEDULER)
    write_json(out_dir / "model_index.json", MODEL_INDEX)
    return out_dir


def tiny_flux_path() -> Path:
    """The tiny FLUX's folder, built on first use, through a temporary folder renamed into place, so a crash or a
    concurrent process never leaves a half-written model behind."""
    final = cache_dir() / f"tiny-flux-v{TINY_FLUX_VERSION}"
    if not (final / "model_index.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(final, lambda out: build(out, default_weights()), folder=True, replace=False)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the tiny FLUX (diffusers folder layout) to OUT_DIR.")
    p.add_argument("out_dir", type=Path, help="folder to create, e.g. ./weights/tiny-flux")
    p.add_argument("--weights", type=Path, default=None, help="folder of pretrained weights (transformer, vae, "
                   "text_encoder, text_encoder_2 .safetensors); default: the shipped flux/tiny_weights, if any")
    p.add_argument("--random", action="store_true", help="random weights even if --weights is given")
    args = p.parse_args(argv)
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        print(f"error: {args.out_dir} already exists and is not an empty folder; choose a new path", file=sys.stderr)
        return 2
    weights = None if args.random else (args.weights or default_weights())
    build(args.out_dir, weights=weights)
    print(f"wrote the tiny FLUX ({'random' if weights is None else 'pretrained'} weights) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
