"""Check that a model loads and that our UNet agrees with diffusers' on it.

Loads the UNet, both text encoders and the VAE through our loaders, encodes a prompt, runs one UNet
forward pass on seeded noise, compares it with diffusers' `UNet2DConditionModel` on the same weights
and inputs, and decodes the result with the VAE into a PNG (random weights give a noise picture).

    python -m sdxl.check --pretrained_model tiny                     # writes outputs/check.png
    python -m sdxl.check --pretrained_model ./weights/sdxl-base-1.0 --image_size 512
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl.loading import load_text_encoder, load_unet, load_vae, resolve_model_path, unet_folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model", default="tiny", help="diffusers SDXL folder, .safetensors file, or tiny")
    p.add_argument("--prompt", default="a watercolor painting of a lighthouse at dawn", help="prompt to encode")
    p.add_argument("--image_size", "--image-size", "--resolution", dest="image_size", type=int, default=256,
                   help="image side in pixels, a multiple of 8 (--resolution is the same flag)")
    p.add_argument("--output", type=Path, default=Path("outputs/check.png"), help="where to write the decoded image")
    p.add_argument("--no-diffusers", action="store_true", help="skip the comparison with diffusers' UNet")
    args = p.parse_args(argv)
    if args.image_size <= 0 or args.image_size % 8:
        p.error(f"--image_size {args.image_size} must be a positive multiple of 8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = resolve_model_path(args.pretrained_model)
        unet = load_unet(path)
        text_encoder = load_text_encoder(path)
        vae = load_vae(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"loaded {path} in {time.perf_counter() - t0:.1f}s: UNet {n_params / 1e6:.1f} M parameters")

    embeds, pooled = text_encoder.encode([args.prompt])  # (1, 77, ctx), (1, pooled)
    s = args.image_size
    latents = torch.randn(1, 4, s // 8, s // 8, generator=torch.Generator().manual_seed(0))
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32)}
    with torch.no_grad():
        pred = unet(latents, 999, embeds, cond)
    print(f"prompt embeddings {tuple(embeds.shape)}, pooled {tuple(pooled.shape)}, UNet output {tuple(pred.shape)}")

    if not args.no_diffusers and path.is_dir():
        from diffusers import UNet2DConditionModel

        ref = UNet2DConditionModel.from_pretrained(unet_folder(path), local_files_only=True).eval()
        with torch.no_grad():
            expected = ref(latents, 999, embeds, added_cond_kwargs=cond).sample
        err = ((pred - expected).norm() / expected.norm()).item()
        print(f"relative error vs diffusers' UNet2DConditionModel: {err:.2e} ({'ok' if err < 1e-5 else 'MISMATCH'})")
        if err >= 1e-5:
            return 1

    with torch.no_grad():
        image = vae.decode(latents - pred)[0]  # one crude denoising jump, just to exercise the VAE
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(args.output)
    print(f"decoded a {array.shape[1]}x{array.shape[0]} image to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
