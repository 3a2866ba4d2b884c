"""The tiny demo: teach a tiny model a colour it never saw, then count it in what it draws.

    python demo.py                                   # = make demo: tiny SDXL, CPU, a few minutes
    python demo.py --family sd3                      # the same on tiny-sd3 (or flux: tiny-flux), about a minute
    python demo.py --report                          # the README's numbers: training seeds 0-4 x 1, 2, 4 threads

1. trains a LoRA with configs/tiny_demo.yaml (tiny_demo_sd3.yaml, tiny_demo_flux.yaml): 42 pictures of purple
   shapes, 6 on each background (data/demo/purple), on the tiny model, pretrained on every other colour of the
   tiny world (tools/tiny_world.py);
2. draws 32 new purple prompts (shapes, places and backgrounds the training pictures may not have) without and
   with the LoRA, the same seeds, 20 steps, the family's guidance;
3. counts the pictures whose dominant colour is purple (`tools.tiny_world.dominant_colour`) and writes
   OUTPUT_DIR/before_after.png (top row without the LoRA, bottom row with it).

`--report` trains once per (training seed, thread count) in a fresh process (the thread count changes the order
of float sums, and with it every later step) and prints each share, their mean and their range.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from common.cli import Parser, add_verbose, run_script
from common.console import quiet_libraries

ROOT = Path(__file__).resolve().parent
CONFIGS = {"sdxl": ROOT / "configs/tiny_demo.yaml", "sd3": ROOT / "configs/tiny_demo_sd3.yaml",
           "flux": ROOT / "configs/tiny_demo_flux.yaml"}
PROMPTS_SEED = 500  # held-out prompts: not the specs of data/demo (data/make_demo_data.py's seeds)
GUIDANCE = 5.0  # the demo's drawing guidance (FLUX.1-dev-style tiny-flux: its embedded guidance)


def held_out_prompts(n: int = 32) -> list[str]:
    from tools.tiny_world import HELD_BACK, caption, sample_specs

    return [caption(spec) for spec in sample_specs(n, PROMPTS_SEED, only={"colour": [HELD_BACK]})]


def draw(model: str, lora: Path | None, prompts: list[str]):
    """The tiny model's pictures of `prompts` (image i seeded i), with the LoRA file merged if given."""
    from sampling.inference import ImageGenerator

    gen = ImageGenerator.from_pretrained(model, loras=[(str(lora), 1.0)] if lora else [])
    return gen.generate_unique_batch(prompts, list(range(len(prompts))), width=64, height=64, steps=20,
                                     guidance_scale=GUIDANCE)


def share(images, colour: str = "purple") -> float:
    from tools.tiny_world import dominant_colour

    return sum(dominant_colour(image) == colour for image in images) / len(images)


def before_after_grid(before, after, columns: int = 8):
    """Two labelled rows of `columns` pictures: without the LoRA, with it."""
    from PIL import Image, ImageDraw

    side, label = before[0].width, 72
    grid = Image.new("RGB", (label + columns * side, 2 * side), "white")
    draw_ = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate((("base", before), ("+ LoRA", after))):
        draw_.text((4, row * side + side // 2 - 6), name, fill="black")
        for i, image in enumerate(images[:columns]):
            grid.paste(image, (label + i * side, row * side))
    return grid


def train(family: str, output_dir: Path, seed: int = 0, verbose: bool = False) -> int:
    """The demo's training run (configs/tiny_demo*.yaml) into output_dir; the trainer's exit status."""
    from training.cli import main

    return main(["--config", str(CONFIGS[family]), "--output_dir", str(output_dir), "--overwrite_output_dir",
                 "--seed", str(seed), *(["--verbose"] if verbose else [])], family)


def run_demo(output_dir: Path, num_images: int = 32, family: str = "sdxl", seed: int = 0, verbose: bool = False):
    """Train, then draw the held-out purple prompts without and with the LoRA: (before, after), or the trainer's
    exit status if it failed."""
    status = train(family, output_dir, seed, verbose)
    if status != 0:
        return status
    model = "tiny" if family == "sdxl" else f"tiny-{family}"
    prompts = held_out_prompts(num_images)
    before, after = draw(model, None, prompts), draw(model, Path(output_dir) / "lora_final.safetensors", prompts)
    before_after_grid(before, after).save(Path(output_dir) / "before_after.png")
    return before, after


def one_run(family: str, output_dir: Path, seed: int, threads: int, num_images: int) -> dict:
    """`python demo.py --family F --seed S` in a fresh process with `threads` threads: its shares and final loss."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = output_dir / f"seed{seed}_threads{threads}"
    cmd = [sys.executable, str(ROOT / "demo.py"), "--family", family, "--seed", str(seed), "--output_dir", str(out),
           "--num_images", str(num_images), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(family: str, output_dir: Path, seeds: list[int], threads: list[int], num_images: int) -> int:
    """Each (seed, threads) run's purple share with the LoRA, the base model's, their mean and range."""
    rows = []
    print(f"{'seed':>4} {'threads':>7} {'base':>5} {'LoRA':>5} {'final loss':>10}")
    for seed in seeds:
        for n in threads:
            result = one_run(family, output_dir, seed, n, num_images)
            rows.append(result)
            print(f"{seed:>4} {n:>7} {result['before']:>5.0%} {result['after']:>5.0%} {result['final_loss']:>10.4f}",
                  flush=True)
    after = [r["after"] for r in rows]
    print(f"purple with the LoRA: mean {sum(after) / len(after):.0%}, range {min(after):.0%}-{max(after):.0%} over "
          f"{len(rows)} runs (training seeds {seeds}, threads {threads}); without it: at most "
          f"{max(r['before'] for r in rows):.0%} ({num_images} held-out purple prompts each)")
    return 0


def main(argv=None) -> int:
    p = Parser(prog="demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=list(CONFIGS), default="sdxl", help="which tiny model (default: sdxl)")
    p.add_argument("--output_dir", type=Path, help="where the run goes (default: outputs/tiny_demo[_FAMILY])")
    p.add_argument("--num_images", type=int, default=32, help="pictures drawn before and after (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (default: 0)")
    p.add_argument("--report", action="store_true", help="measure: one run per --seeds x --threads (fresh "
                   "processes); print each share, the mean and the range")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="--report's seeds (default 0-4)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="--report's thread counts "
                   "(default: 1 2 4)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (what --report reads)")
    add_verbose(p)
    args = p.parse_args(argv)
    quiet_libraries(args.verbose)
    output_dir = args.output_dir or Path("outputs") / ("tiny_demo" + ("" if args.family == "sdxl" else
                                                                        f"_{args.family}"))
    if args.report:
        return report(args.family, output_dir, args.seeds, args.threads, args.num_images)
    result = run_demo(output_dir, args.num_images, args.family, args.seed, args.verbose)
    if isinstance(result, int):
        return result
    before, after = result
    if args.json:
        metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"before": share(before), "after": share(after),
                          "final_loss": [m["loss"] for m in metrics if "loss" in m][-1]}))
        return 0
    print(f"purple in {share(before):.0%} of {len(before)} pictures of purple prompts without the LoRA, "
          f"{share(after):.0%} with it; the first 8 of each: {output_dir / 'before_after.png'}")
    return 0


if __name__ == "__main__":
    run_script(main)
