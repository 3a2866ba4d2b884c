"""The optimizers of --optimizer (training/loop/optim.py): each is its library's class with the flags' settings;
schedule-free's eval weights are what is validated and saved, and switching modes never changes training."""

import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora.layer import LoRAConfig, lora_modules
from sdxl.loading import load_unet
from sdxl.lora import apply_lora
from training.loop.optim import OPTIMIZERS, eval_weights, lr_schedule, make_optimizer

ROOT = Path(__file__).resolve().parent.parent


def settings(optimizer, **kw):
    return Namespace(**{**dict(optimizer=optimizer, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99,
                                adam_epsilon=1e-8, weight_decay=0.01, warmup_steps=3, lr_scheduler="cosine",
                                prodigy_d_coef=2.0, prodigy_use_bias_correction=True,
                                prodigy_safeguard_warmup=True), **kw})


def test_each_optimizer_is_its_library_class_with_the_flags():
    from prodigyopt import Prodigy
    from schedulefree import AdamWScheduleFree
    from transformers.optimization import Adafactor

    params = [torch.nn.Parameter(torch.randn(4, 3))]
    expected = {"adamw": (torch.optim.AdamW, dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)),
                "prodigy": (Prodigy, dict(d_coef=2.0, use_bias_correction=True, safeguard_warmup=True)),
                "adamw_schedulefree": (AdamWScheduleFree, dict(warmup_steps=3, train_mode=True, betas=(0.9, 0.99))),
                "adafactor": (Adafactor, dict(lr=1e-3, relative_step=False, scale_parameter=False))}
    assert set(expected) == set(OPTIMIZERS) - {"adamw8bit"}
    for name, (cls, group) in expected.items():
        optimizer = make_optimizer(params, settings(name))
        assert isinstance(optimizer, cls), name
        assert {k: optimizer.param_groups[0][k] for k in group} == group, name
    # schedule-free has no LR schedule (its warmup is inside the optimizer); the others follow --lr_scheduler
    assert lr_schedule(settings("adamw_schedulefree"), 10)(0) == 1.0
    assert lr_schedule(settings("adamw"), 10)(0) == pytest.approx(1 / 3)


def test_schedule_free_eval_weights_are_upstreams_and_training_weights_come_back_exactly():
    """Inside eval_weights: upstream schedulefree's eval() weights x (same steps, bit for bit); after it: y, bit for
    bit (upstream's train() lerps back, exact only where the rounding happens to cancel)."""
    import schedulefree

    torch.manual_seed(0)
    ours_p, ref_p = torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.empty(64, 8))
    ref_p.data.copy_(ours_p)
    ours = make_optimizer([ours_p], settings("adamw_schedulefree"))
    ref = schedulefree.AdamWScheduleFree([ref_p], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                                         warmup_steps=3)
    ref.train()
    target = torch.randn(64, 8)
    for _ in range(5):
        for p, opt in ((ours_p, ours), (ref_p, ref)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    y = ours_p.detach().clone()
    torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=0)
    ref.eval()
    with eval_weights(ours):
        torch.testing.assert_close(ours_p, ref_p, rtol=0, atol=0)
        assert not torch.equal(ours_p, y)
    assert torch.equal(ours_p, y)


def test_schedule_free_run_saves_its_eval_weights(tmp_path):
    """A run's checkpoint and final LoRA hold x = lerp(y, z, 1 - 1/beta1) of its optimizer state, not y."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
           "--output_dir", str(out), "--max_train_steps", "3", "--optimizer", "adamw_schedulefree",
           "--validation_prompts", "--save_interval", "3", "--save_format", "diffusers"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lora = load_file(out / "checkpoints/step_000003/lora.safetensors")
    final = load_file(out / "lora_final.safetensors")
    state = torch.load(out / "checkpoints/step_000003/training_state.pt", weights_only=True)["optimizer"]
    beta1 = state["param_groups"][0]["betas"][0]
    unet = load_unet("tiny")
    apply_lora(unet, LoRAConfig(8, 8.0, 0.0, "all"))  # the tiny_demo preset's LoRA: the optimizer's order
    names = [f"unet.{n}.lora_{ab}.weight" for n in lora_modules(unet) for ab in "AB"]
    assert len(names) == len(state["state"]) == len(lora)
    moved = 0
    for i, name in enumerate(names):
        y, z = state["state"][i]["y"], state["state"][i]["z"]
        torch.testing.assert_close(lora[name], y.lerp(z, 1 - 1 / beta1), rtol=0, atol=0)
        torch.testing.assert_close(final[name], lora[name], rtol=0, atol=0)  # alpha = rank: nothing folded
        moved += not torch.equal(lora[name], y)
    assert moved > len(names) // 2
