"""--compile (diffusion/compile.py): the regionally compiled UNet computes what the eager one computes, output
and LoRA gradients, with gradient checkpointing on and off. Inductor on CPU reorders and fuses float ops,
so equality is to rounding: measured output 1.2e-6 and LoRA gradients up to 1.2e-5 relative (the smallest
gradients, through softmax and normalisations); asserted at 1e-5 and 1e-4."""

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import families
from diffusion.compile import compile_blocks
from lora.layer import LoRAConfig, lora_parameters
from sdxl.lora import apply_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXLUNet
from tests.test_unet import inputs, rel_err


def lora_unet(seed=0):
    torch.manual_seed(seed)
    unet = SDXLUNet(TINY_UNET_CONFIG)
    apply_lora(unet, LoRAConfig(rank=4, alpha=4, target_mode="all"))
    with torch.no_grad():  # lora_up starts at zero: give it values so its gradient paths are all exercised
        for p in lora_parameters(unet):
            p.normal_(0, 0.05)
    return unet


def output_and_grads(unet, x):
    unet.zero_grad(set_to_none=True)
    out = unet(**x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_equal_eager(checkpointing, one_thread):
    eager = lora_unet()
    compiled = copy.deepcopy(eager)
    for unet in (eager, compiled):
        unet.set_gradient_checkpointing(checkpointing)
    t0 = time.perf_counter()
    assert compile_blocks(families.get("sdxl").blocks(compiled)) == 17 + 11  # the tiny UNet: resnets + transformers
    x = inputs(TINY_UNET_CONFIG, b=2, h=8, w=8)
    out_a, grads_a = output_and_grads(eager, x)
    out_b, grads_b = output_and_grads(compiled, x)
    print(f"first compiled step {time.perf_counter() - t0:.1f} s")
    assert grads_a.keys() == grads_b.keys()
    worst = max(grads_a, key=lambda n: rel_err(grads_b[n], grads_a[n]))
    print(f"output {rel_err(out_b, out_a):.2e}, worst gradient {rel_err(grads_b[worst], grads_a[worst]):.2e} ({worst})")
    assert rel_err(out_b, out_a) < 1e-5
    assert rel_err(grads_b[worst], grads_a[worst]) < 1e-4, worst


ROOT = Path(__file__).resolve().parent.parent


def train(out: Path, steps: int, *extra) -> None:
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
           "--batch_size", "2", "--max_train_steps", str(steps), "--save_interval", "2", "--lr_scheduler", "constant",
           "--compile", "--validation_prompts", "--val_data_dir", "", "--output_dir", str(out), *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_a_compiled_run_resumes_exactly(tmp_path):
    """Stopped after 2 steps and resumed (compiling again), a compiled run ends bit for bit where an uninterrupted
    compiled run ends (inductor's kernels are deterministic on the same shapes; its cache makes the reruns quick)."""
    train(tmp_path / "whole", 4)
    train(tmp_path / "parts", 2)
    train(tmp_path / "parts", 4, "--resume_from", "latest")
    a, b = (load_file(tmp_path / run / "lora_final.safetensors") for run in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_generate_images_compile_draws_what_eager_draws(tmp_path, one_thread):
    """generate_images.py --compile: the same picture as eager, to rounding (at most 2 levels of 8 bits apart)."""
    import numpy as np
    from PIL import Image

    import generate_images

    argv = ["--pretrained-model", "tiny", "--image-size", "64", "--num-inference-steps", "3", "--prompt",
            "a small red circle on a white background", "--num-images", "2", "--batch-size", "2"]
    assert generate_images.main([*argv, "--output-dir", str(tmp_path / "eager")]) == 0
    assert generate_images.main([*argv, "--compile", "--output-dir", str(tmp_path / "compiled")]) == 0
    for name in ("00000.png", "00001.png"):
        a, b = (np.asarray(Image.open(tmp_path / run / name), dtype=np.int16) for run in ("eager", "compiled"))
        assert np.abs(a - b).max() <= 2, name
