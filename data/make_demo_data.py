"""Write the demo datasets: pictures of the colour the tiny model never saw (purple).

    python -m data.make_demo_data      # deterministic; the result is committed in the repository

Purple shapes of the tiny world (tools/tiny_world.py) at 64x64 with their captions ("a small purple star on a
gray background, top left"): the embedded tiny SDXL was pretrained on every other colour, so it draws none
of these purple until a LoRA teaches it.

- data/demo/purple: the demo's training set (`make demo`, configs/tiny_demo.yaml): 6 pictures on each of the 7
  backgrounds, 42 in all. Balanced, because the tiny model draws an unknown colour on a dark background as a
  white shape: a LoRA that saw few dark backgrounds draws purple on light ones only.
- data/demo/train (36 pictures, backgrounds at random) and data/demo/val (6): the small dataset the tests train on;
  val is also the demo's validation set.
"""

import shutil
from pathlib import Path

from tools.tiny_world import BACKGROUNDS, HELD_BACK, caption, render, sample_specs, write_folder

ROOT = Path(__file__).resolve().parent / "demo"


def write_balanced(out_dir: Path, per_background: int = 6, seed: int = 70) -> None:
    """`per_background` purple pictures on each background (background k drawn with seed + k)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    only = {"colour": [HELD_BACK]}
    specs = [spec for k, background in enumerate(BACKGROUNDS)
             for spec in sample_specs(per_background, seed + k, only=only | {"background": [background]})]
    for i, spec in enumerate(specs):
        render(spec, 64).save(out_dir / f"{i:05d}.png")
        (out_dir / f"{i:05d}.txt").write_text(caption(spec) + "\n")


def main() -> None:
    write_balanced(ROOT / "purple")
    for name, count, seed in (("train", 36, 7), ("val", 6, 8)):
        shutil.rmtree(ROOT / name, ignore_errors=True)
        write_folder(ROOT / name, count, seed, 64, only={"colour": [HELD_BACK]})
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
