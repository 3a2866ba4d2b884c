"""Masked loss (training/data/masks.py): the mask follows its image's resize, crop and flip; the loss ignores what it
masks out and equals the plain loss under a mask of ones."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.ddpm import DDPMObjective, alphas_cumprod
from training.data.datasets import build_dataset
from training.data.masks import MaskSource, latent_mask
from training.loop.loss import diffusion_loss

ROOT = Path(__file__).resolve().parent.parent


def noise_image(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def masked_folder(tmp_path):
    """Three images of other aspect ratios whose mask is their own red channel, one without a mask."""
    tmp_path = tmp_path / "data"
    tmp_path.mkdir()
    for i, (w, h) in enumerate([(150, 96), (96, 170), (128, 128)]):
        pixels = noise_image(w, h, i)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        Image.fromarray(pixels[..., 0]).save(tmp_path / f"img{i}_mask.png")
        (tmp_path / f"img{i}.txt").write_text(f"image {i}")
    Image.fromarray(noise_image(100, 100, 9)).save(tmp_path / "plain.png")
    return tmp_path


def test_mask_gets_its_images_resize_crop_and_flip(masked_folder):
    """Red channel == mask after bucketing, random crops and flips, over epochs (LANCZOS per band: exact)."""
    data = build_dataset(masked_folder, 128, 1, random_flip=True, seed=3, masks=MaskSource())
    assert "img0_mask.png" not in [Path(r.path).name for r in data.records]  # masks are not training images
    flips = set()
    for epoch in range(4):
        for batch in data.iter_epoch(epoch):
            red, mask = batch["pixel_values"][:, :1], batch["masks"]  # uint8 (B, 1, H, W)
            if batch["keys"][0] == "plain.png":
                assert torch.all(mask == 255)
            else:
                assert torch.equal(mask, red), batch["keys"]
            flips.add(bool(batch["flipped"][0]))
    assert flips == {True, False}


def test_masks_come_with_cached_latents_too(masked_folder):
    """Once the latents are cached nothing is decoded, but each sample still gets its mask, the same as decoded."""
    data = build_dataset(masked_folder, 128, 1, random_flip=True, center_crop=True, seed=3, masks=MaskSource())
    decoded = [b["masks"] for b in data.iter_epoch(1)]
    data.decode = False
    cached = list(data.iter_epoch(1))
    assert "pixel_values" not in cached[0]
    assert all(torch.equal(a, b["masks"]) for a, b in zip(decoded, cached, strict=True))


def test_alpha_and_mask_dir_give_the_same_mask_as_a_file_beside_the_image(tmp_path):
    pixels = noise_image(150, 96, 4)
    alpha = np.random.default_rng(5).integers(0, 256, (96, 150), dtype=np.uint8)
    for name in ("a", "b", "c", "c_masks"):
        (tmp_path / name).mkdir()
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(tmp_path / "a" / "x.png")
    Image.fromarray(pixels).save(tmp_path / "b" / "x.png")
    Image.fromarray(alpha).save(tmp_path / "b" / "x_mask.png")
    Image.fromarray(pixels).save(tmp_path / "c" / "x.png")
    Image.fromarray(alpha).save(tmp_path / "c_masks" / "x.png")
    sources = {"a": MaskSource(alpha=True), "b": MaskSource(), "c": MaskSource(mask_dir=tmp_path / "c_masks")}
    data = {k: build_dataset(tmp_path / k, 128, 1, random_flip=True, masks=v) for k, v in sources.items()}
    for epoch in range(3):
        masks = [next(d.iter_epoch(epoch))["masks"] for d in data.values()]
        assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
        assert not torch.all(masks[0] == 255)


def test_latent_mask_is_the_mean_of_each_8x8_block():
    masks = torch.randint(0, 256, (2, 1, 32, 48), dtype=torch.uint8)
    expected = masks.float().div(255).reshape(2, 1, 4, 8, 6, 8).mean(dim=(3, 5))
    torch.testing.assert_close(latent_mask(masks), expected, rtol=1e-6, atol=1e-7)


def test_masked_loss_ignores_the_outside_and_ones_are_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    prediction = torch.nn.Parameter(torch.randn(2, 4, 8, 8, generator=g))
    t, ddpm = torch.tensor([100, 800]), DDPMObjective(alphas_cumprod())

    def predict(x, t):
        return prediction + 0 * x

    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:6, 1:5] = 1.0
    mask[1, :, :, 4:] = 0.5
    loss = diffusion_loss(predict, ddpm, x0, t, noise, mask=mask)
    per_pixel = (prediction.detach() - noise) ** 2
    expected = (per_pixel * mask).sum(dim=(1, 2, 3)) / (4 * mask.sum(dim=(1, 2, 3)))  # the mask-weighted mean
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    loss.sum().backward()
    outside = (mask == 0).expand_as(prediction)
    assert torch.all(prediction.grad[outside] == 0) and torch.all(prediction.grad[~outside] != 0)

    plain = diffusion_loss(predict, ddpm, x0, t, noise)
    ones = diffusion_loss(predict, ddpm, x0, t, noise, mask=torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)


def test_training_with_masks_runs_and_says_what_is_wrong(masked_folder, tmp_path):
    Image.fromarray(noise_image(10, 10, 1)[..., 0]).save(masked_folder / "plain_mask.png")  # the wrong size
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
           "--data_dir", str(masked_folder), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
           "--batch_size", "2", "--validation_prompts", "--val_data_dir", "", "--cache_latents", "memory",
           "--masked_loss", "--random_flip", "--image_size", "128"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "plain_mask.png is 10x10 but its image" in run.stderr.strip().splitlines()[-1]
    (masked_folder / "plain_mask.png").unlink()
    run = subprocess.run([*cmd, "--overwrite_output_dir"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
