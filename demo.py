"""The tiny demo: teach the embedded tiny SDXL a colour it never saw, then count it in what it draws.

    python demo.py                     # = make demo; CPU, about two minutes

1. trains a LoRA with configs/tiny_demo.yaml: 36 pictures of purple shapes (data/demo/train) on the tiny
   model, which was pretrained on every other colour of the tiny world (tools/tiny_world.py);
2. draws 32 new purple prompts (shapes, places and backgrounds the training pictures may not have) without
   and with the LoRA, same seeds, 20 euler steps, CFG 5;
3. counts the pictures whose dominant colour is purple (`tools.tiny_world.dominant_colour`) and writes
   OUTPUT_DIR/before_after.png (top row without the LoRA, bottom row with it).
"""

from pathlib import Path

from PIL import Image, ImageDraw

import train_sdxl
from common.cli import Parser, add_verbose, run_script
from common.console import quiet_libraries
from tools.tiny_world import HELD_BACK, caption, dominant_colour, sample_specs

CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_demo.yaml"
PROMPTS_SEED = 500  # held-out prompts: not the specs of data/demo (seeds 7 and 8)
Pictures = list[Image.Image]


def held_out_prompts(n: int = 32) -> list[str]:
    return [caption(spec) for spec in sample_specs(n, PROMPTS_SEED, only={"colour": [HELD_BACK]})]


def draw(lora: Path | None, prompts: list[str]) -> list[Image.Image]:
    """The tiny model's pictures of `prompts` (image i seeded i), with the LoRA file merged if given."""
    from sampling.inference import ImageGenerator  # here: --help needs no torch

    gen = ImageGenerator.from_pretrained("tiny", loras=[(str(lora), 1.0)] if lora else [])
    return gen.generate_unique_batch(prompts, list(range(len(prompts))), width=64, height=64, steps=20,
                                     guidance_scale=5.0)


def share(images: list[Image.Image], colour: str = HELD_BACK) -> float:
    return sum(dominant_colour(image) == colour for image in images) / len(images)


def before_after_grid(before: list[Image.Image], after: list[Image.Image], columns: int = 8) -> Image.Image:
    """Two labelled rows of `columns` pictures: without the LoRA, with it."""
    side, label = before[0].width, 72
    grid = Image.new("RGB", (label + columns * side, 2 * side), "white")
    draw_ = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate((("base", before), ("+ LoRA", after))):
        draw_.text((4, row * side + side // 2 - 6), name, fill="black")
        for i, image in enumerate(images[:columns]):
            grid.paste(image, (label + i * side, row * side))
    return grid


def run_demo(output_dir: Path, num_images: int = 32, verbose: bool = False) -> tuple[Pictures, Pictures] | int:
    """Train, then draw the held-out purple prompts without and with the LoRA: (before, after), or the trainer's
    exit status if it failed."""
    status = train_sdxl.main(["--config", str(CONFIG), "--output_dir", str(output_dir), "--overwrite_output_dir",
                              *(["--verbose"] if verbose else [])])
    if status != 0:
        return status
    prompts = held_out_prompts(num_images)
    before, after = draw(None, prompts), draw(Path(output_dir) / "lora_final.safetensors", prompts)
    before_after_grid(before, after).save(Path(output_dir) / "before_after.png")
    return before, after


def main(argv=None) -> int:
    p = Parser(prog="demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", type=Path, default=Path("outputs/tiny_demo"),
                   help="where the run goes (default: outputs/tiny_demo)")
    p.add_argument("--num_images", type=int, default=32, help="pictures drawn before and after (default: 32)")
    add_verbose(p)
    args = p.parse_args(argv)
    quiet_libraries(args.verbose)
    result = run_demo(args.output_dir, args.num_images, args.verbose)
    if isinstance(result, int):
        return result
    before, after = result
    print(f"purple in {share(before):.0%} of {len(before)} pictures of purple prompts without the LoRA, "
          f"{share(after):.0%} with it; the first 8 of each: {args.output_dir / 'before_after.png'}")
    return 0


if __name__ == "__main__":
    run_script(main)
