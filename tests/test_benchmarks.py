"""The benchmarks run (smoke settings: tiny model, one round) and report what they claim; no timing is
asserted (timings are for benchmarks/RESULTS.md, not tests). gpu_check.sh's logic is checked on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def table(text: str) -> dict[str, list[str]]:
    """The printed markdown table: first cell -> the other cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return {row[0]: row[1:] for row in rows[1:]}


@pytest.mark.slow
def test_bench_train_smoke_computes_the_same_first_loss_as_diffusers_peft(capsys):
    """Same base tensors, LoRA values, batch, noise and timesteps: fp32 first losses agree to float rounding
    (1e-5 relative: the two UNets order some float sums differently)."""
    import bench_train

    bench_train.main(["--smoke"])
    rows = table(capsys.readouterr().out)
    assert set(rows) == {"diffusers+peft", "ours", "ratio ours / diffusers+peft"}
    assert rows["ours"][2] == rows["diffusers+peft"][2]  # the same number of LoRA parameters
    assert float(rows["ours"][3]) == pytest.approx(float(rows["diffusers+peft"][3]), rel=1e-5)


@pytest.mark.slow
def test_bench_unet_smoke_reports_each_model_and_the_ratio(capsys):
    import bench_unet

    bench_unet.main(["--smoke"])
    rows = table(capsys.readouterr().out)
    assert set(rows) == {"diffusers", "ours", "ratio ours / diffusers"}
    assert float(rows["ratio ours / diffusers"][2]) == pytest.approx(1.0, abs=0.01)  # same ops: same saved bytes


@pytest.mark.slow
def test_bench_sample_smoke_draws_the_same_images_as_diffusers(capsys):
    import bench_sample

    bench_sample.main(["--smoke"])
    out = capsys.readouterr().out
    assert set(table(out)) == {"diffusers", "ours", "ratio ours / diffusers"}
    assert int(re.search(r"outputs: (\d+)/255", out).group(1)) <= 1  # 8-bit rounding


def test_bench_data_smoke_loads_every_image_of_the_epoch(capsys, tmp_path):
    import bench_data

    bench_data.main(["--smoke", "--data_dir", str(tmp_path)])
    rows = table(capsys.readouterr().out)
    assert set(rows) == {"0", "1"} and len(list(tmp_path.glob("*.jpg"))) == 6
    assert all(float(cells[-2]) > 0 for cells in rows.values())


def test_compile_unet_compiles_exactly_the_resnet_and_transformer_blocks():
    """The bench's regional compilation: each ResNet / transformer block wrapped, nothing else (no compile run)."""
    from harness import compile_unet

    from sdxl.tiny import TINY_UNET_CONFIG
    from sdxl.unet import BasicTransformerBlock, ResnetBlock2D, SDXLUNet

    unet = compile_unet(SDXLUNet(TINY_UNET_CONFIG))
    compiled = [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    assert compiled == blocks and blocks


def test_compile_peer_compiles_the_same_blocks_of_diffusers_unet(tiny_random_dir):
    """The peer is compiled like ours: diffusers' ResnetBlock2D and BasicTransformerBlock (as many as ours has)."""
    from diffusers import UNet2DConditionModel
    from harness import compile_peer

    unet = compile_peer(UNet2DConditionModel.from_pretrained(tiny_random_dir, subfolder="unet"))
    compiled = [type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert set(compiled) == {"ResnetBlock2D", "BasicTransformerBlock"}
    from sdxl.tiny import TINY_UNET_CONFIG
    from sdxl.unet import BasicTransformerBlock, ResnetBlock2D, SDXLUNet

    ours = SDXLUNet(TINY_UNET_CONFIG).modules()
    assert len(compiled) == sum(isinstance(m, (ResnetBlock2D, BasicTransformerBlock)) for m in ours)


def test_random_sdxl_writes_a_folder_the_loaders_read(tmp_path, monkeypatch):
    """random_sdxl.py with tiny sizes patched in: the trainer's loaders read every part of what it writes."""
    import random_sdxl

    from sdxl import tiny
    from sdxl.loading import load_text_encoder, load_unet, load_vae

    clip = {**random_sdxl.CLIP_L_CONFIG, **tiny.TINY_TEXT_ENCODER_CONFIG}
    monkeypatch.setattr(random_sdxl, "SDXL_CONFIG", tiny.TINY_UNET_CONFIG)
    monkeypatch.setattr(random_sdxl, "SDXL_VAE_CONFIG", tiny.TINY_VAE_CONFIG)
    monkeypatch.setattr(random_sdxl, "CLIP_L_CONFIG", clip)
    monkeypatch.setattr(random_sdxl, "OPENCLIP_BIGG_CONFIG", {**clip, **tiny.TINY_TEXT_ENCODER_2_CONFIG})
    assert random_sdxl.main([str(tmp_path / "m")]) == 0
    assert load_unet(tmp_path / "m").config == tiny.TINY_UNET_CONFIG
    embeds, pooled = load_text_encoder(tmp_path / "m").encode(["a red circle"])
    assert embeds.shape == (1, 77, 96) and torch.isfinite(pooled).all()
    assert load_vae(tmp_path / "m") is not None
    assert random_sdxl.main([str(tmp_path / "m")]) == 2  # never overwrites


def test_gpu_summary_condenses_a_table_a_timeout_and_pytest():
    from gpu_summary import summary

    bench = "# header\n| model | ms | MiB |\n|---|---|---|\n| peer | 2.0 | 10 |\n| ours | 1.0 | 5 |\ncompile 3 s\n"
    assert summary(bench, 0, 60) == "header<br>model: ms / MiB<br>peer: 2.0 / 10<br>ours: 1.0 / 5<br>compile 3 s"
    assert summary("| a | b |\n", 124, 60).startswith("**timed out after 60 s**")
    assert summary("x\nTraceback\nValueError: bad\n", 1, 60) == "**failed (exit 1)**: ValueError: bad"
    assert summary("..\n==== 2 passed in 3.1s ====\n", 0, 60) == "2 passed in 3.1s"


def run_gpu_check(tmp_path, budget_s: int) -> str:
    env = {**os.environ, "CPU_SMOKE": "1", "BUDGET_S": str(budget_s), "LOG_DIR": str(tmp_path), "OUT": "",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return (tmp_path / "RESULTS.md").read_text()


PRESETS = len(list((ROOT / "configs").glob("sdxl_*.yaml")))
STEPS = 14 + PRESETS  # gpu_check.sh: GPU tests, 7 eager benches (SDXL, SD 3.5, FLUX.1), random model, the presets,
#                      2 compiled, data, 2 more


@pytest.mark.slow
def test_gpu_check_without_budget_skips_every_step_and_still_writes_the_table(tmp_path):
    """The script's frame: syntax, header, one row per step (all skipped with no budget), the output section.
    (`CPU_SMOKE=1 bash benchmarks/gpu_check.sh` runs every step on the tiny model: ~6 min on 2 cores.)"""
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    text = run_gpu_check(tmp_path, 0)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    assert len(rows) == STEPS and all("skipped" in row for row in rows)
    assert "## GPU check: no CUDA device (CPU smoke run)" in text and "<details>" in text
    assert text.endswith((tmp_path / "results_section.md").read_text())  # the copy that leaves the machine
