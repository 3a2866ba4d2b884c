"""The embedded tiny SDXL: deterministic, a real diffusers SDXL folder, SDXL-shaped, built once, and it draws
what it is told."""

import json
import subprocess
import sys

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from sdxl.tiny import build, tiny_model_path


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(tmp_path):
    a, b = tree(build(tmp_path / "a")), tree(build(tmp_path / "b"))
    assert a == b
    assert {"model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
            "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer_2/merges.txt"} <= set(a)
    assert tree(build(tmp_path / "c", weights=None))["unet/diffusion_pytorch_model.safetensors"] != a[
        "unet/diffusion_pytorch_model.safetensors"]  # --random


def test_cli(tmp_path):
    out = tmp_path / "tiny"
    run = subprocess.run([sys.executable, "-m", "sdxl.tiny", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (out / "model_index.json").is_file()
    again = subprocess.run([sys.executable, "-m", "sdxl.tiny", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_cached_once(tiny_dir):
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert tiny_model_path() == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp


def test_sdxl_structure_and_scheduler(tiny_dir):
    unet = json.loads((tiny_dir / "unet/config.json").read_text())
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert unet["addition_embed_type"] == "text_time"
    vae = json.loads((tiny_dir / "vae/config.json").read_text())
    assert len(vae["block_out_channels"]) == 4  # three downsamplings: 8x
    scheduler = EulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    c = scheduler.config
    assert (c.beta_schedule, c.beta_start, c.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (c.num_train_timesteps, c.timestep_spacing, c.steps_offset) == (1000, "leading", 1)


def test_diffusers_pipeline_loads_offline_and_renders(tiny_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    image = pipe("a red apple", num_inference_steps=2, height=64, width=96, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 96, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_it_draws_what_it_is_told(tiny_dir):
    """Our sampler (fixed seeds, 20 euler steps, CFG 5, 64x64) on captions of the tiny world: each colour is the
    dominant colour of >= 80% of its pictures, shapes are told apart far above chance (1/5), and the held-back
    colour is never drawn. Measured (16 pictures per colour): red, orange, yellow, blue, white, black 100%, green
    94%; shapes 70% (circle 91, square 72, triangle 87, ring 58, star 6); purple 0%."""
    from sampling.inference import ImageGenerator
    from tools import tiny_world as tw

    gen = ImageGenerator.from_pretrained(tiny_dir)
    shapes, shown = 0, 0
    for k, colour in enumerate(tw.COLOURS):
        specs = tw.sample_specs(16, 1000 + k, only={"colour": [colour]})
        images = gen.generate_unique_batch([tw.caption(s) for s in specs], list(range(16)), width=64, height=64,
                                           steps=20, guidance_scale=5.0)
        drawn = sum(tw.dominant_colour(image) == colour for image in images) / len(images)
        if colour == tw.HELD_BACK:
            assert drawn <= 1 / 16, drawn
            continue
        assert drawn >= 0.8, (colour, drawn)
        shapes += sum(tw.shape_of(image) == spec.shape for image, spec in zip(images, specs, strict=True))
        shown += len(images)
    assert shapes / shown >= 0.5, shapes / shown


def test_measure_tiny_prints_the_tables_of_the_docs(capsys):
    """`python -m tools.measure_tiny` (docs/tiny_model.md's numbers), one picture per prompt: every line is there,
    and the VAE keeps the world's colours (each within RGB distance 40 of itself) but not cyan."""
    from tools import measure_tiny

    assert measure_tiny.main(["--images", "1"]) == 0
    out = capsys.readouterr().out
    for start in ("full captions, asked colour drawn: red", "short prompts, asked colour drawn: 'a red circle'",
                  "seeds: mean pairwise MS-SSIM", "| colour in | colour out |", "striped and plain shapes"):
        assert start in out, start
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.count("|") == 5}
    for colour in ("red", "blue", "purple", "white", "black"):
        assert rows[colour][1] == colour and int(rows[colour][3].strip(" |")) < 40, rows[colour]
    assert rows["cyan"][1] != "cyan"
