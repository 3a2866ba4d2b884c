"""The embedded tiny SDXL: an SDXL-shaped model small enough for a CPU, that draws the tiny world.

It has SDXL's block structure (3 levels, DownBlock2D first, cross-attention in levels 2-3, mid block,
text_time embedding, 8x VAE with 4 latent channels) at small widths, and locally built byte-level CLIP
tokenizers (every byte is a symbol, so any text, emoji included, tokenizes without unknown tokens). Its
UNet and VAE were pretrained on a CPU on the captioned coloured shapes of tools/tiny_world.py, purple held
back (`python -m tools.pretrain_tiny`); its two CLIP encoders are random and frozen. The weights ship in
sdxl/tiny_weights/ (17 MB: the UNet in fp16), so nothing is trained or downloaded.

`python -m sdxl.tiny OUT_DIR` writes it in diffusers' folder layout (unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, model_index.json; fp32 files), which diffusers'
`StableDiffusionXLPipeline.from_pretrained` also loads; `--random` writes the same model with freshly
initialised weights (what the pretraining starts from). `--pretrained_model tiny` anywhere calls
`tiny_model_path()` (through sdxl/loading.py), which builds it once into a cache. Two builds are
byte-identical; `TINY_VERSION` names the cache folder and changes whenever what is written changes.
"""

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from common.files import atomic_write, cache_dir, write_json
from diffusion.tiny_parts import load_text_encoder_weights, seeded, tiny_vae
from diffusion.tokenizers import build_clip_tokenizer, write_clip_vocab_files
from sdxl.configs import SDXL_SCHEDULER_CONFIG, unet_config_to_diffusers
from sdxl.unet import SDXLUNet, UNetConfig

TINY_VERSION = 3  # 1: random weights; 2: pretrained on full captions; 3: on partial captions
WEIGHTS = Path(__file__).resolve().parent / "tiny_weights"  # unet.fp16, vae, text_encoder, text_encoder_2

# 6.2 M parameters. Context 96 = tiny CLIP-L 32 + tiny bigG 64; pooled 32 + 6 time ids * 8 = 80.
TINY_UNET_CONFIG = UNetConfig(
    block_out_channels=(64, 96, 96),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 1),
    num_attention_heads=(2, 3, 3),
    cross_attention_dim=96,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)

TINY_VAE_CONFIG = {  # 1.0 M parameters; scaling_factor: scaled latents of the tiny world have unit std
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 128,
    "scaling_factor": 0.66897,
    "force_upcast": True,
}
TEXT_ENCODER_SEED = 2  # the random CLIP pair the shipped UNet was trained with (its weights ship too)

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}



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


def write_tiny_text_encoders(root: Path, seed: int = TEXT_ENCODER_SEED, weights: Path | None = None) -> None:
    """Write root/{text_encoder, text_encoder_2, tokenizer, tokenizer_2}: random from `seed`, or with the
    weights of `weights/text_encoder*.safetensors`; the same inputs give identical bytes."""
    root = Path(root)
    tokenizer, tokenizer_2 = build_clip_tokenizer("<|endoftext|>"), build_clip_tokenizer("!")
    config, config_2 = tiny_text_encoder_configs(tokenizer, tokenizer_2)
    text_encoder = seeded(seed, lambda: CLIPTextModel(config))
    text_encoder_2 = seeded(seed + 1, lambda: CLIPTextModelWithProjection(config_2))
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if weights is not None:
            load_text_encoder_weights(model, weights / f"{name}.safetensors")
        model.save_pretrained(root / name, safe_serialization=True)
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        tok.save_pretrained(root / name)
        # transformers 5 saves only tokenizer.json; vocab.json + merges.txt (as in SDXL's own folders)
        # keep the folder loadable by transformers 4's slow CLIPTokenizer too.
        write_clip_vocab_files(root / name)


# ---------------------------------------------------------------------------------------------------
# The model folder


def write_tiny_vae(root: Path, seed: int = 0, weights: Path | None = None) -> Path:
    """Write the SDXL-shaped tiny VAE (`TINY_VAE_CONFIG`) to root/vae/: random from `seed`, or with the
    weights of `weights/vae.safetensors`; byte-identical for the same inputs."""
    out = Path(root) / "vae"
    tiny_vae(TINY_VAE_CONFIG, seed, weights).save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_unet(root: Path, seed: int = 0, weights: Path | None = None) -> Path:
    """Write the tiny UNet (`TINY_UNET_CONFIG`) to root/unet/ in fp32: random from `seed`, or the weights of
    `weights/unet.fp16.safetensors` (exactly, fp16 -> fp32)."""
    if weights is None:
        sd = seeded(seed, lambda: SDXLUNet(TINY_UNET_CONFIG).state_dict())
    else:
        sd = load_file(weights / "unet.fp16.safetensors")
    out = Path(root) / "unet"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, out / "diffusion_pytorch_model.safetensors")
    write_json(out / "config.json", unet_config_to_diffusers(TINY_UNET_CONFIG))
    return out



def build(out_dir: Path, weights: Path | None = WEIGHTS) -> Path:
    """Write the tiny SDXL into `out_dir` (created; must be empty or absent): the pretrained weights of the
    folder `weights` (default: the shipped ones), or random weights with `weights=None`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_unet(out_dir, seed=0, weights=weights)
    write_tiny_vae(out_dir, seed=1, weights=weights)
    write_tiny_text_encoders(out_dir, seed=TEXT_ENCODER_SEED, weights=weights)
    write_json(out_dir / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER_CONFIG)
    write_json(out_dir / "model_index.json", MODEL_INDEX)
    return out_dir



def tiny_model_path() -> Path:
    """The tiny model's folder, built on first use, through a temporary folder renamed into place, so a crash
    or a concurrent process never leaves a half-written model behind."""
    final = cache_dir() / f"tiny-v{TINY_VERSION}"
    if not (final / "model_index.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(final, build, folder=True, replace=False)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the tiny SDXL (diffusers folder layout) to OUT_DIR.")
    p.add_argument("out_dir", type=Path, help="folder to create, e.g. ./weights/tiny-sdxl")
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="folder of pretrained weights, as "
                   "`python -m tools.pretrain_tiny` writes them (default: the shipped sdxl/tiny_weights)")
    p.add_argument("--random", action="store_true", help="random weights instead (what the pretraining starts from)")
    args = p.parse_args(argv)
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        print(f"error: {args.out_dir} already exists and is not an empty folder; choose a new path", file=sys.stderr)
        return 2
    build(args.out_dir, weights=None if args.random else args.weights)
    print(f"wrote the tiny SDXL ({'random' if args.random else 'pretrained'} weights) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
