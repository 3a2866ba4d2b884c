"""sdxl/vae.py against diffusers' AutoencoderKL (the reference) on the tiny SDXL-shaped VAE.

Encode/decode tolerance 1e-6: our calls run the very same diffusers modules on the same fp32
weights and inputs, and the scaling is the same single multiply/divide, so the results are
bit-identical in practice; 1e-6 (on values of order 1) only allows for kernel reassociation.
"""

import re
import sys
import types

import pytest
import torch
from diffusers import AutoencoderKL

from diffusion.vae import LatentVAE
from sdxl.tiny import TINY_VAE_CONFIG, tiny_model_path, write_tiny_vae

SF = TINY_VAE_CONFIG["scaling_factor"]


@pytest.fixture(scope="module")
def tiny_vae_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vae")
    write_tiny_vae(root, seed=0)
    return root


@pytest.fixture(scope="module")
def ref(tiny_vae_root):
    return AutoencoderKL.from_pretrained(tiny_vae_root / "vae").eval()


def images(b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def latents(h, w, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))  # like UNet latents


def test_write_tiny_vae_is_deterministic(tmp_path):
    a, b = write_tiny_vae(tmp_path / "a"), write_tiny_vae(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = write_tiny_vae(tmp_path / "c", seed=1)
    assert (other / names[1]).read_bytes() != (a / names[1]).read_bytes()


def test_encode_decode_match_diffusers(tiny_vae_root, ref):
    vae = LatentVAE.from_pretrained(tiny_vae_root)
    x = images()  # non-square: 64 x 96 px
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        want_mean = dist.mean * SF
        want_sample = dist.sample(torch.Generator().manual_seed(7)) * SF
    got_mean = vae.encode(x, sample=False)
    got_sample = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    assert got_mean.shape == (2, 4, 8, 12)
    torch.testing.assert_close(got_mean, want_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_sample, want_sample, rtol=0, atol=1e-6)
    assert not torch.allclose(got_sample, got_mean)  # sampling really adds noise

    with torch.no_grad():
        want = ref.decode(got_mean / SF).sample
    got = vae.decode(got_mean)  # 8x12 latent: below one tile, so not tiled
    assert got.shape == (2, 3, 64, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_encode_casts_input_to_fp32(tiny_vae_root):
    vae = LatentVAE.from_pretrained(tiny_vae_root)
    x = images(b=1)
    out = vae.encode(x.to(torch.bfloat16), sample=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, vae.encode(x.to(torch.bfloat16).float(), sample=False), rtol=0, atol=0)


def test_shift_factor(tiny_vae_root, ref):
    # FLUX/SD3-style configs: latents = (z - shift) * scale, decoded as z / scale + shift.
    vae = LatentVAE.from_pretrained(tiny_vae_root)
    vae.vae.register_to_config(shift_factor=0.25)
    x = images(b=1)
    with torch.no_grad():
        want = (ref.encode(x).latent_dist.mean - 0.25) * SF
    z = vae.encode(x, sample=False)
    torch.testing.assert_close(z, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        want_img = ref.decode(z / SF + 0.25).sample
    torch.testing.assert_close(vae.decode(z), want_img, rtol=0, atol=1e-6)


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_tiled_decode(tiny_dir):
    # tile_size 128 px = the tiny config's sample_size = diffusers' own default tile. The pretrained tiny VAE.
    vae = LatentVAE.from_pretrained(tiny_dir, tile_size=128)
    ref = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()
    z = latents(48, 40)  # 3 x 2.5 tiles of 16 latent px: overlaps, blends and partial tiles
    tiled = vae.decode(z)  # automatic: area above one tile
    assert tiled.shape == (1, 3, 384, 320)

    # Same as diffusers' own tiling (enable_tiling + decode) on the same weights.
    ref.enable_tiling()
    with torch.no_grad():
        want = ref.decode(z / ref.config.scaling_factor).sample
    torch.testing.assert_close(tiled, want, rtol=0, atol=1e-6)

    # Close to the untiled decode. Tiling is approximate: each tile has its own GroupNorm statistics and
    # mid-block attention, and the overlaps are linearly blended; with the tiny VAE on random latents that costs
    # a relative RMS error of 0.37-0.46 (correlation 0.95-0.96) over seeds 0-3. Wrong wiring is far off: two tile
    # rows swapped measures 1.12-1.21, an 8 px shift 1.24-1.31, unrelated latents 1.34-1.42. The bounds sit
    # between the two.
    full = vae.decode(z, tile=False)
    rel_rms = float((tiled - full).pow(2).mean().sqrt() / full.std())
    assert rel_rms < 0.75 and corr(tiled, full) > 0.9, (rel_rms, corr(tiled, full))


def test_tile_size_argument_matches_diffusers_tiling(tiny_vae_root, ref):
    vae = LatentVAE.from_pretrained(tiny_vae_root, tile_size=64)
    z = latents(24, 24)  # 3x the 8-latent-px tile
    ref.tile_sample_min_size, ref.tile_latent_min_size = 64, 8
    try:
        with torch.no_grad():
            want = ref.tiled_decode(z / SF).sample
    finally:
        ref.tile_sample_min_size, ref.tile_latent_min_size = 128, 16
    got = vae.decode(z)  # automatic
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, vae.decode(z, tile=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        LatentVAE.from_pretrained(tiny_vae_root, tile_size=100)


def test_default_tile_is_at_least_sdxl_native(tiny_vae_root):
    vae = LatentVAE.from_pretrained(tiny_vae_root)
    assert vae.tile_size == 1024  # tiny sample_size 128 is raised to SDXL's 1024 px
    z = latents(16, 24)  # 128 x 192 px: one pass, equal to forcing no tiling
    torch.testing.assert_close(vae.decode(z), vae.decode(z, tile=False), rtol=0, atol=0)


def test_fp16_variant_loads_as_fp32(tiny_vae_root, ref, tmp_path):
    folder = tmp_path / "sdxl-vae-fp16"
    AutoencoderKL.from_pretrained(tiny_vae_root / "vae").half().save_pretrained(folder, variant="fp16")
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    vae = LatentVAE.from_pretrained(folder)  # a VAE folder itself, like madebyollin/sdxl-vae-fp16-fix
    params = dict(vae.vae.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name], p.half().float(), rtol=0, atol=0)


def test_stays_fp32_when_cast(tiny_vae_root):
    vae = LatentVAE.from_pretrained(tiny_vae_root)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.to(torch.bfloat16)
    vae.half()
    for k, v in vae.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, before[k]), k  # no lossy round trip through the lower precision


def test_tiny_word_uses_tiny_model_path(tiny_vae_root, monkeypatch):
    fake = types.ModuleType("sdxl.tiny")
    fake.tiny_model_path = lambda: tiny_vae_root
    monkeypatch.setitem(sys.modules, "sdxl.tiny", fake)
    vae = LatentVAE.from_pretrained(tiny_model_path())
    assert list(vae.config.block_out_channels) == TINY_VAE_CONFIG["block_out_channels"]


def test_missing_path_error_names_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LatentVAE.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        LatentVAE.from_pretrained(empty)


def test_folder_without_safetensors(tiny_vae_root, tmp_path):
    folder = tmp_path / "bin-only" / "vae"
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes((tiny_vae_root / "vae" / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LatentVAE.from_pretrained(folder.parent)


def test_not_a_vae_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        LatentVAE.from_pretrained(tmp_path / "unet")


def test_latents_mean_config_is_refused(tiny_vae_root):
    vae = AutoencoderKL.from_pretrained(tiny_vae_root / "vae")
    vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(ValueError, match="latents_mean"):
        LatentVAE(vae)
