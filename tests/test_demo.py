"""make demo (demo.py) end to end on a CPU: a LoRA teaches the pretrained tiny SDXL the colour it never saw, whatever
the training seed and the number of threads.

Each run is `python demo.py --seed S --json` in a fresh process with S training seed and OMP_NUM_THREADS threads
(the thread count changes the order of float sums, and with it every later step: the runs differ from the first
step on). Measured by `python demo.py --report` (docs/tiny_model.md's table): 75-97% purple with the LoRA over
training seeds 0-4 on 1, 2 and 4 threads (15 runs; these four runs 94%, 88%, 97%, 97%), 0% without. Held here:
>= 60% with it, at most 1 of 32 without. KID to the 42 purple training pictures, with a colour histogram of the
shapes as the feature network (the Inception file cannot be downloaded here): the LoRA's pictures are closer to
them than the base model's.
"""

from pathlib import Path

import pytest
import torch

import demo

RUNS = [(0, 1), (0, 2), (1, 1), (1, 2)]  # (training seed, threads): two seeds, two thread counts
LOWEST = 0.6  # the purple share with the LoRA that every run must reach (measured 75-97%)


class ColourHistogram(torch.nn.Module):
    """A TorchScript feature network for KID that sees the shapes' colour: the share of the picture's pixels that
    are saturated (the shape, not the white, gray or black background) in each of 4 x 4 x 4 RGB bins, x 10
    (called like the Inception file: uint8-range (N, 3, H, W), return_features=True -> (N, 64))."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = x.to(torch.float32)
        saturated = (x.amax(dim=1) - x.amin(dim=1) > 64).flatten(1).to(torch.float32)  # (N, H*W)
        q = (x / 64.0).floor().clamp(0, 3).to(torch.int64)  # (N, 3, H, W) in 0..3
        bins = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)  # (N, H*W)
        one_hot = torch.nn.functional.one_hot(bins, 64).to(torch.float32)  # (N, H*W, 64)
        return 10.0 * (one_hot * saturated[:, :, None]).mean(dim=1)  # (N, 64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """(seed, threads) -> (the run's result: shares and final loss, its output folder)."""
    root = tmp_path_factory.mktemp("demo")
    return {(seed, threads): (demo.one_run("sdxl", root, seed, threads, 32), root / f"seed{seed}_threads{threads}")
            for seed, threads in RUNS}


@pytest.mark.slow
@pytest.mark.parametrize("seed,threads", RUNS)
def test_demo_teaches_the_held_back_colour(runs, seed, threads):
    result, out = runs[seed, threads]
    print(f"seed {seed}, {threads} threads: base {result['before']:.0%}, LoRA {result['after']:.0%}")
    assert result["before"] <= 1 / 32 and result["after"] >= LOWEST, result
    assert (out / "before_after.png").is_file() and (out / "lora_final.safetensors").is_file()


@pytest.mark.slow
def test_the_lora_draws_closer_to_the_training_pictures(runs):
    """KID (a colour histogram as the features) to the demo's training pictures: the LoRA's pictures of the held-out
    prompts, drawn again here from the run's file, against the base model's. Measured: 0.0441 vs 0.0508 (the
    histogram also sees the dark backgrounds, which both draw; the shares above are the sharper measure)."""
    from evaluation import load_inception, reference_features, score_images

    _, out = runs[0, 1]
    prompts = demo.held_out_prompts(32)
    before, after = demo.draw("tiny", None, prompts), demo.draw("tiny", out / "lora_final.safetensors", prompts)
    net = out / "net.pt"
    torch.jit.script(ColourHistogram()).save(str(net))
    inception = load_inception(net)
    real = reference_features(Path(demo.__file__).parent / "data" / "demo" / "purple", inception)
    kid_before = score_images(before, real, inception)["kid_mean"]
    kid_after = score_images(after, real, inception)["kid_mean"]
    print(f"KID to the purple pictures: base {kid_before:.4f}, with the LoRA {kid_after:.4f}")
    assert kid_after < 0.95 * kid_before  # measured 0.87 x (0.0441 vs 0.0508)
