"""The tiny FLUX: diffusers' FluxPipeline loads and runs it, our parts load from it and follow the pipeline's
conventions, and it builds byte-identically.

Tolerance: sampled latents within 1e-5 relative (our transformer equals diffusers' to ~1e-7 per call, test_flux_
transformer.py; three Euler steps do not amplify that beyond).
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flux.loading import load_text_encoder, load_transformer, load_vae, scheduler_config
from flux.tiny import TINY_MAX_SEQUENCE_LENGTH, build, default_weights, main, tiny_flux_path
from flux.transformer import image_ids, pack_latents, text_ids, unpack_latents


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_path()


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    return FluxPipeline.from_pretrained(tiny_flux)


def test_pipeline_loads_and_runs(pipe):
    image = pipe("a red square", height=64, width=48, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 48) and torch.isfinite(image).all()


def test_our_parts_follow_the_pipeline(pipe):
    """Three Euler steps with our transformer, text encoders and latent helpers, and diffusers' scheduler, land on
    the pipeline's latents: timestep = sigma in [0, 1], guidance = the scale itself, ids, packing."""
    prompt, steps, guidance, h, w = "a blue circle", 3, 3.5, 8, 6  # latent size of a 64 x 48 image
    expected = pipe(prompt, height=h * 8, width=w * 8, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(0), output_type="latent",
                    max_sequence_length=TINY_MAX_SEQUENCE_LENGTH).images  # packed

    transformer, text = load_transformer("tiny-flux"), load_text_encoder("tiny-flux")
    embeds, pooled = text.encode([prompt])
    x = pack_latents(torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(0)))  # (1, 12, 64)
    config = scheduler_config("tiny-flux")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(x.shape[1], config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = transformer(x, embeds, pooled, t.expand(1) / 1000, image_ids(h, w), text_ids(embeds.shape[1]),
                            guidance=torch.tensor([guidance]))
            x = scheduler.step(v, t, x).prev_sample
    assert ((x - expected).norm() / expected.norm()).item() < 1e-5
    image = load_vae("tiny-flux").decode(unpack_latents(x, h, w))
    assert image.shape == (1, 3, 64, 48)


def test_tiny_is_small_and_dev_shaped(tiny_flux):
    transformer = load_transformer(tiny_flux)
    assert transformer.config.guidance_embeds and transformer.config.in_channels == 64
    assert sum(p.numel() for p in transformer.parameters()) < 1_000_000
    text, vae = load_text_encoder(tiny_flux), load_vae(tiny_flux)
    total = sum(sum(p.numel() for p in m.parameters()) for m in (transformer, text, vae))
    assert total < 5_000_000


def test_rebuild_is_byte_identical(tiny_flux, tmp_path):
    build(tmp_path / "again", weights=default_weights())
    ours = sorted(p.relative_to(tiny_flux) for p in tiny_flux.rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert ours == again and len(ours) == 16
    for rel in ours:
        assert (tiny_flux / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--random"]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert main([str(tmp_path / "out")]) == 2  # never writes into a non-empty folder
    assert "already exists" in capsys.readouterr().err
