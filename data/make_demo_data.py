"""Write the demo dataset (data/demo/train, data/demo/val): pictures of the colour the tiny model never saw.

    python data/make_demo_data.py      # deterministic; the result is committed in the repository

Purple shapes of the tiny world (tools/tiny_world.py) at 64x64 with their captions ("a small purple star on a
gray background, top left"): the embedded tiny SDXL was pretrained on every other colour, so it draws none
of these purple until a LoRA teaches it (`make demo`).
"""

import shutil
from pathlib import Path

from tools.tiny_world import HELD_BACK, write_folder

ROOT = Path(__file__).resolve().parent / "demo"


def main() -> None:
    for name, count, seed in (("train", 36, 7), ("val", 6, 8)):
        shutil.rmtree(ROOT / name, ignore_errors=True)
        write_folder(ROOT / name, count, seed, 64, only={"colour": [HELD_BACK]})
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
