"""What a tiny model draws and what its VAE keeps: the tables of docs/tiny_model.md, from one command.

    python -m tools.measure_tiny                       # the tiny SDXL (tiny); a minute or two on a CPU
    python -m tools.measure_tiny --model tiny-sd3      # another tiny model, or a diffusers folder of one

1. Drawn (tools/pretrain_tiny.py `measure`, 20 steps, the family's guidance): per colour, the share of pictures of
   full tiny-world captions whose dominant colour is the one asked; the share of right shapes; for short prompts
   ("a red circle", ...), the share of the asked colour; for one short prompt, the mean pairwise MS-SSIM of 8
   seeds next to that of 8 real tiny-world pictures of it (how much the seed matters).
2. The VAE's colour table: shapes of each colour (the tiny world's and others a user may train: pink, cyan, brown,
   ...) encoded and decoded; per colour in, the colour out (the nearest named colour to the decoded shape's mean
   pixel, most common over 8 pictures), how often it is kept, the mean RGB distance of in and out; and the mean
   absolute error on pictures a third of which have stripes.
"""

import argparse

import families
from common.console import quiet_libraries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a tiny name or a diffusers folder (default: tiny)")
    p.add_argument("--images", type=int, default=16, help="pictures per colour and per short prompt (default 16)")
    args = p.parse_args(argv)
    quiet_libraries()
    from diffusers import AutoencoderKL

    from sampling.inference import ImageGenerator
    from tools.pretrain_tiny import RECIPES, colour_table, measure

    family = families.of(args.model)
    drawn = measure(ImageGenerator.from_pretrained(args.model), args.images, RECIPES[family.NAME]["guidance"])
    print("full captions, asked colour drawn: " + ", ".join(f"{c} {v:.0%}" for c, v in drawn["colour"].items()))
    print(f"full captions, asked shape drawn: {drawn['shape_overall']:.0%} ("
          + ", ".join(f"{s} {v:.0%}" for s, v in drawn["shape"].items()) + ")")
    short = drawn["short_prompts"]
    print("short prompts, asked colour drawn: " + "; ".join(f"{p!r} {v:.0%}" for p, v in short.items()))
    seeds = drawn["seed_diversity"]
    print(f"seeds: mean pairwise MS-SSIM of 8 seeds of {seeds['prompt']!r} {seeds['ms_ssim_generated']:.3f}, of 8 "
          f"real pictures of it {seeds['ms_ssim_real']:.3f} (lower: more varied)\n")

    table = colour_table(AutoencoderKL.from_pretrained(family.resolve(args.model) / "vae").eval())
    textures = table.pop("textures_l1")
    print("| colour in | colour out | kept | RGB distance |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['out']} | {row['kept']:.0%} | {row['rgb_distance']:.0f} |")
    print(f"\nstriped and plain shapes through the VAE: mean absolute error {textures:.3f} (pixels in [-1, 1])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
