"""Write a full-size SDXL base folder (diffusers layout) with random weights, for the GPU check's preset memory
runs: nothing to download, and the same shapes as the real model. UNet and text encoders are stored in fp16
(as SDXL's fp16 variant, half the disk), the VAE in fp32; the tokenizers are the local ones of sdxl/tiny.py
(a small BPE vocabulary whose ids fit CLIP's 49408-entry embedding).

    python benchmarks/random_sdxl.py /tmp/sdxl-random --device cuda     # ~7 GB; seconds on a GPU
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402

from common.files import (
    atomic_write,  # noqa: E402
    write_json,  # noqa: E402
)
from diffusion.tokenizers import build_clip_tokenizer  # noqa: E402
from sdxl.configs import (  # noqa: E402
    CLIP_L_CONFIG,
    OPENCLIP_BIGG_CONFIG,
    SDXL_SCHEDULER_CONFIG,  # noqa: E402
    SDXL_VAE_CONFIG,
    unet_config_to_diffusers,
)
from sdxl.tiny import MODEL_INDEX  # noqa: E402
from sdxl.unet import SDXL_CONFIG, SDXLUNet  # noqa: E402


def write(root: Path, device: str) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        sd = SDXLUNet(SDXL_CONFIG).half().state_dict()
    (root / "unet").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "unet" / "diffusion_pytorch_model.safetensors")
    write_json(root / "unet" / "config.json", unet_config_to_diffusers(SDXL_CONFIG))
    del sd
    with torch.device(device):
        AutoencoderKL(**SDXL_VAE_CONFIG).save_pretrained(root / "vae", safe_serialization=True)
    for name, cls, config in (("text_encoder", CLIPTextModel, CLIP_L_CONFIG),
                              ("text_encoder_2", CLIPTextModelWithProjection, OPENCLIP_BIGG_CONFIG)):
        with torch.device(device):
            cls(CLIPTextConfig(**config)).half().save_pretrained(root / name, safe_serialization=True)
    build_clip_tokenizer("<|endoftext|>").save_pretrained(root / "tokenizer")
    build_clip_tokenizer("!").save_pretrained(root / "tokenizer_2")
    write_json(root / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER_CONFIG)
    write_json(root / "model_index.json", MODEL_INDEX)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="folder to create (must not exist)")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn: cuda is much faster")
    args = p.parse_args(argv)
    if args.out_dir.exists():
        print(f"error: {args.out_dir} already exists; give a new folder", file=sys.stderr)
        return 2
    atomic_write(args.out_dir, lambda tmp: write(tmp, args.device), folder=True)
    print(f"wrote a random full-size SDXL to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
