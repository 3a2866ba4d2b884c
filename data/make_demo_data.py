"""Write the small demo dataset (data/demo/train, data/demo/val): coloured shapes with captions.

    python data/make_demo_data.py      # deterministic; the result is committed in the repository

Simple enough that a tiny model's LoRA can visibly learn it on a CPU in a minute.
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((128, 128), (160, 112), (112, 160))  # square, landscape, portrait: exercises bucketing


def draw(shape: str, colour, background, size, rng: random.Random) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, background)
    d = ImageDraw.Draw(image)
    r = rng.randint(min(w, h) // 4, min(w, h) // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def write(folder: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape, colour, bg = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        image = draw(shape, COLOURS[colour], BACKGROUNDS[bg], SIZES[i % len(SIZES)], rng)
        image.save(folder / f"{i:03d}.png", optimize=True)
        (folder / f"{i:03d}.txt").write_text(f"a {colour} {shape} on a {bg} background\n")


if __name__ == "__main__":
    root = Path(__file__).resolve().parent / "demo"
    write(root / "train", 36, seed=0)
    write(root / "val", 6, seed=1)
    print(f"wrote {root}")
