"""The embedded tiny SD 3.5: deterministic, a real diffusers SD3 folder, SD 3.5 Medium-shaped, built once, and our
parts (transformer, text encoders, VAE, flow schedule and sampler) reproduce diffusers' pipeline on it.

Tolerance of the pipeline comparison: latents within 1e-5 relative (our transformer differs from diffusers' by
float summation order, ~1e-7, carried through 4 Euler steps; everything else is exact).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file

from diffusion.flow import flow_euler, flow_sigmas
from sd3.loading import load_text_encoder, load_transformer, load_vae, scheduler_config
from sd3.tiny import TINY_MMDIT_CONFIG, build, default_weights, main, tiny_sd3_path

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on a shared CPU


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd3_path()


def test_two_builds_are_byte_identical(tiny, tmp_path):
    a, b = tree(build(tmp_path / "a", weights=default_weights())), tree(tiny)  # the cached one: another process
    assert a == b
    assert {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
            "vae/config.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors",
            "text_encoder_2/model.safetensors", "text_encoder_3/model.safetensors", "tokenizer/vocab.json",
            "tokenizer_2/merges.txt", "tokenizer_3/tokenizer.json"} <= set(a)


def test_builds_from_a_weights_folder(tiny, tmp_path):
    """What the pretraining will ship: transformer.safetensors (any float dtype), vae.safetensors with its measured
    scale and shift in the metadata, text_encoder{,_2,_3}.safetensors (T5's embedding stored once)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    transformer = load_file(tiny / "transformer/diffusion_pytorch_model.safetensors")
    save_file({k: (v + 1).half() for k, v in transformer.items()}, weights / "transformer.safetensors")
    save_file(load_file(tiny / "vae/diffusion_pytorch_model.safetensors"), weights / "vae.safetensors",
              metadata={"scaling_factor": "0.5", "shift_factor": "0.25"})
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        save_file(load_file(tiny / name / "model.safetensors"), weights / f"{name}.safetensors")
    built = build(tmp_path / "out", weights=weights)
    got = load_file(built / "transformer/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(got[k], (v + 1).half().float()) for k, v in transformer.items())
    vae = json.loads((built / "vae/config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.5, 0.25)
    assert tree(built / "text_encoder_3") == tree(tiny / "text_encoder_3")


def test_cli_and_cache(tiny, tmp_path, capsys):
    out = tmp_path / "tiny"
    run = subprocess.run([sys.executable, "-m", "sd3.tiny", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "pretrained weights" in run.stdout and tree(out) == tree(tiny)  # the shipped weights by default
    random = subprocess.run([sys.executable, "-m", "sd3.tiny", str(tmp_path / "random"), "--random"],
                            capture_output=True, text=True)
    assert random.returncode == 0 and tree(tmp_path / "random") == tree(build(tmp_path / "seeded", weights=None))
    assert main([str(out)]) == 2 and "already exists" in capsys.readouterr().err  # in-process: no second start-up
    stamp = (tiny / "model_index.json").stat().st_mtime_ns
    assert tiny_sd3_path() == tiny and (tiny / "model_index.json").stat().st_mtime_ns == stamp


def test_sd35_medium_structure(tiny):
    transformer = json.loads((tiny / "transformer/config.json").read_text())
    assert transformer["_class_name"] == "SD3Transformer2DModel"
    assert transformer["dual_attention_layers"] == [0, 1] and transformer["qk_norm"] == "rms_norm"
    assert (transformer["patch_size"], transformer["in_channels"], transformer["out_channels"]) == (2, 16, 16)
    vae = json.loads((tiny / "vae/config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # 8x
    assert vae["shift_factor"] is not None and vae["scaling_factor"] is not None
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler")
    assert scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny, local_files_only=True)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    assert counts["transformer"] < 2e6 and sum(counts.values()) < 5e6, counts
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"  # as SD3's


def test_pipeline_renders_and_our_parts_reproduce_it(tiny):
    """diffusers' pipeline on the folder (4 steps, CFG 4, 64x96) against our text encoder, transformer, flow
    schedule and Euler sampler with the same CFG, on the same initial latents; then our VAE decodes them as the
    pipeline does."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny, local_files_only=True)
    prompt, steps, guidance, h, w, seq = "a red apple", 4, 4.0, 64, 96, 32
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=h, width=w, max_sequence_length=seq)
    image = pipe(prompt, output_type="np", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert image.shape == (h, w, 3) and np.isfinite(image).all() and image.std() > 0
    ref_latents = pipe(prompt, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images

    transformer, vae = load_transformer("tiny-sd3"), load_vae("tiny-sd3")
    encoder = load_text_encoder("tiny-sd3", max_sequence_length=seq)
    assert transformer.config == TINY_MMDIT_CONFIG
    embeds, pooled = encoder.encode(["", prompt])  # negative prompt "" is encoded, not zeros, in SD3

    def cfg_velocity(x, t):
        v = transformer(x.repeat(2, 1, 1, 1), embeds, pooled, t)
        uncond, cond = v.chunk(2)
        return uncond + guidance * (cond - uncond)

    x = torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator().manual_seed(0))
    sigmas, timesteps = flow_sigmas(scheduler_config("tiny-sd3"), steps)
    latents = flow_euler(cfg_velocity, x, sigmas, timesteps=timesteps)
    assert ((latents - ref_latents).norm() / ref_latents.norm()).item() < 1e-5
    ours = vae.decode(latents)  # (1, 3, h, w) in [-1, 1], unclamped
    pixels = (ours / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(pixels - image).max() < 1e-4
