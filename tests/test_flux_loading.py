"""Loading FLUX.1 weights: diffusers folders (fp32, fp16 variant, sharded), Black Forest Labs single files (with and
without ComfyUI's prefix, fp8 plain and scaled), the key maps against diffusers' own conversion, one-line errors.

Oracles: diffusers' `from_pretrained` of the same folder (outputs within 1e-5 relative, as in
test_flux_transformer.py), diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (tensors equal), and the
tensors written (loaded back bit-identically: fp8 files against the fp32 file of the same fp8 values).
"""

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from flux.bfl import PREFIX, bfl_to_diffusers, diffusers_to_bfl
from flux.configs import FLUX_DEV, FLUX_DEV_SCHEDULER, FLUX_SCHNELL, FLUX_SCHNELL_SCHEDULER, config_from_bfl_shapes
from flux.loading import (
    default_max_sequence_length,
    is_schnell,
    load_text_encoder,
    load_transformer,
    load_vae,
    model_path_problem,
    scheduler_config,
)
from flux.tiny import TINY_TRANSFORMER_CONFIG, tiny_flux_path
from flux.transformer import FluxTransformer
from tests.test_flux_transformer import inputs, rel_err

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_path()


@pytest.fixture(scope="module")
def tiny_sd(tiny_flux):
    return load_file(tiny_flux / WEIGHTS)


def assert_same_weights(model: torch.nn.Module, expected: dict):
    sd = model.state_dict()
    assert sd.keys() == expected.keys()
    for k in sd:
        assert sd[k].dtype == expected[k].dtype and torch.equal(sd[k], expected[k]), k


def test_load_tiny_equals_diffusers_from_pretrained(tiny_flux):
    ours = load_transformer("tiny-flux")
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True).eval()
    x = inputs(TINY_TRANSFORMER_CONFIG, h=6, w=10)
    with torch.no_grad():
        assert rel_err(ours(**x), ref(**x).sample) < 1e-5
    bf16 = load_transformer(tiny_flux / "transformer", dtype=torch.bfloat16)  # the transformer folder itself
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"


def test_fp16_variant_and_sharded(tiny_flux, tiny_sd, tmp_path):
    fp16 = tmp_path / "fp16" / "transformer"
    shutil.copytree(tiny_flux / "transformer", fp16)
    (fp16 / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.half() for k, v in tiny_sd.items()}, fp16 / "diffusion_pytorch_model.fp16.safetensors")
    half = load_transformer(tmp_path / "fp16")
    assert_same_weights(half, {k: v.half().float() for k, v in tiny_sd.items()})

    sharded = tmp_path / "sharded" / "transformer"
    shutil.copytree(tiny_flux / "transformer", sharded)
    (sharded / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tiny_sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: tiny_sd[k] for k in ks}, sharded / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(load_transformer(tmp_path / "sharded"), tiny_sd)


# ---------------------------------------------------------------------------------------------------
# Key maps


def fake_bfl_state_dict(cfg, seed=0) -> dict:
    """Random tensors with FLUX.1's real widths on dim 0 (diffusers' conversion assumes 3072 / 12288 when it splits
    linear1) but 2 columns, so that the whole dict is a few MB."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in diffusers_to_bfl(FluxTransformer(cfg).state_dict()).items()}
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s[0], *([2] if len(s) > 1 else []), generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("cfg", [FLUX_DEV, FLUX_SCHNELL], ids=["dev", "schnell"])
def test_bfl_to_diffusers_equals_diffusers_conversion(cfg):
    bfl = fake_bfl_state_dict(dataclasses.replace(cfg, num_layers=2, num_single_layers=3))
    expected = convert_flux_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in bfl.items()})
    for sd in (bfl, {PREFIX + k: v for k, v in bfl.items()}):  # with and without ComfyUI's prefix
        ours = bfl_to_diffusers(sd)
        assert ours.keys() == expected.keys()
        for k in expected:
            assert torch.equal(ours[k], expected[k]), k
    back = diffusers_to_bfl(bfl_to_diffusers(bfl))  # BFL -> diffusers -> BFL is the identity
    assert back.keys() == bfl.keys() and all(torch.equal(back[k], bfl[k]) for k in bfl)


@pytest.mark.parametrize("cfg", [FLUX_DEV, FLUX_SCHNELL], ids=["dev", "schnell"])
def test_full_size_layout_and_config_inference(cfg):
    """FLUX.1's full state dict on the meta device: diffusers -> BFL shapes give back the config, and diffusers'
    conversion of them gives our names and shapes."""
    with torch.device("meta"):
        sd = FluxTransformer(cfg).state_dict()
    bfl = diffusers_to_bfl(sd)
    assert len(bfl) == 776 + 4 * cfg.guidance_embeds  # flux1-dev.safetensors: 780 tensors, schnell: 776
    assert config_from_bfl_shapes({k: tuple(v.shape) for k, v in bfl.items()}) == cfg
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in sd.items()}


def test_diffusers_to_bfl_round_trip(tiny_sd):
    back = bfl_to_diffusers(diffusers_to_bfl(tiny_sd))
    assert back.keys() == tiny_sd.keys() and all(torch.equal(back[k], tiny_sd[k]) for k in tiny_sd)


def test_key_errors_name_the_key(tiny_sd):
    bfl = diffusers_to_bfl(tiny_sd)
    with pytest.raises(ValueError, match=r"missing keys .*: double_blocks\.0\.img_attn\.proj\.bias$"):
        bfl_to_diffusers({k: v for k, v in bfl.items() if k != "double_blocks.0.img_attn.proj.bias"})
    with pytest.raises(ValueError, match=r"unknown keys .*: double_blocks\.0\.img_attn\.extra\.weight$"):
        bfl_to_diffusers({**bfl, "double_blocks.0.img_attn.extra.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------
# Single files


def write_single_file(sd: dict, path, prefix="", extra=None):
    save_file({**{prefix + k: v.contiguous() for k, v in diffusers_to_bfl(sd).items()}, **(extra or {})}, path)
    return path


def test_bfl_single_file(tiny_flux, tiny_sd, tmp_path):
    file = write_single_file(tiny_sd, tmp_path / "flux1-tiny.safetensors")
    assert_same_weights(load_transformer(file, config_path=tiny_flux), tiny_sd)
    # ComfyUI's layout: the prefix, and the checkpoint's other parts beside the transformer (left out)
    others = {"text_encoders.clip_l.transformer.x.weight": torch.zeros(2), "vae.decoder.conv_in.weight": torch.zeros(2)}
    comfy = write_single_file(tiny_sd, tmp_path / "comfy.safetensors", prefix=PREFIX, extra=others)
    assert_same_weights(load_transformer(comfy, config_path="tiny-flux"), tiny_sd)
    # diffusers' names in one file
    save_file(tiny_sd, tmp_path / "diffusers-names.safetensors")
    assert_same_weights(load_transformer(tmp_path / "diffusers-names.safetensors", config_path=tiny_flux), tiny_sd)
    # bf16 file at bf16: no upcast
    save_file({k: v.bfloat16() for k, v in diffusers_to_bfl(tiny_sd).items()}, tmp_path / "bf16.safetensors")
    model = load_transformer(tmp_path / "bf16.safetensors", dtype=torch.bfloat16, config_path=tiny_flux)
    assert_same_weights(model, {k: v.bfloat16() for k, v in tiny_sd.items()})
    # without a config folder: the tiny model's 16-wide heads leave the rotary split unknown
    with pytest.raises(ValueError, match="axes_dims_rope"):
        load_transformer(file)


def fp8_files(sd: dict, tmp_path, scaled: str | None):
    """The model as an fp8 single file (2-D weights in float8_e4m3fn, the rest bf16, as ComfyUI's files) and the fp32
    file of exactly the values it means: fp8 -> fp32 (times the layer's scale when `scaled`)."""
    fp8, exact = {}, {}
    for k, v in diffusers_to_bfl(sd).items():
        if v.ndim == 2:
            scale = v.abs().max() / 448 if scaled else torch.tensor(1.0)  # 448: e4m3fn's largest value
            q = (v / scale).to(torch.float8_e4m3fn)
            fp8[k], exact[k] = q, q.float() * scale
            layer = k.removesuffix(".weight")
            if scaled == "scaled_fp8":  # ComfyUI's legacy layout
                fp8[f"{layer}.scale_weight"], fp8[f"{layer}.scale_input"] = scale.reshape(1), torch.ones(1)
            elif scaled == "comfy_quant":  # its newer per-layer layout
                fp8[f"{layer}.weight_scale"] = scale
                fp8[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            fp8[k] = v.bfloat16()
            exact[k] = fp8[k].float()
    if scaled == "scaled_fp8":
        fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({PREFIX + k: v for k, v in fp8.items()}, tmp_path / "fp8.safetensors")
    save_file(exact, tmp_path / "exact.safetensors")
    return tmp_path / "fp8.safetensors", tmp_path / "exact.safetensors"


@pytest.mark.parametrize("scaled", [None, "scaled_fp8", "comfy_quant"])
def test_fp8_single_file_upcast(tiny_flux, tiny_sd, tmp_path, scaled):
    fp8, exact = fp8_files(tiny_sd, tmp_path, scaled)
    expected = load_transformer(exact, config_path=tiny_flux).state_dict()
    assert_same_weights(load_transformer(fp8, config_path=tiny_flux), expected)  # fp32: exact
    got = load_transformer(fp8, dtype=torch.bfloat16, config_path=tiny_flux)  # straight to bf16
    assert_same_weights(got, {k: v.bfloat16() for k, v in expected.items()})
    # the fp8 model computes what the weights it was quantised from do, within fp8's ~3% rounding error
    x = inputs(TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        original = load_transformer(tiny_flux)
        assert 0 < rel_err(load_transformer(fp8, config_path=tiny_flux)(**x), original(**x)) < 0.1


def test_unsupported_quantisation_is_one_line(tiny_flux, tiny_sd, tmp_path):
    nvfp4 = write_single_file(tiny_sd, tmp_path / "nvfp4.safetensors",
                              extra={"double_blocks.0.img_attn.qkv.weight_scale_2": torch.ones(1)})
    int8 = {k: v.to(torch.int8) if k == "img_in.weight" else v for k, v in diffusers_to_bfl(tiny_sd).items()}
    save_file(int8, tmp_path / "int8.safetensors")
    for file, match in ((nvfp4, "weight_scale_2"), (tmp_path / "int8.safetensors", "img_in.weight is torch.int8")):
        with pytest.raises(ValueError, match=match) as e:
            load_transformer(file, config_path=tiny_flux)
        assert "\n" not in str(e.value) and str(file) in str(e.value)


def test_schnell_single_file(tmp_path):
    """A schnell-shaped file (no guidance_in): detected from its keys; its scheduler and T5 length are schnell's."""
    cfg = dataclasses.replace(TINY_TRANSFORMER_CONFIG, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
                              attention_head_dim=128, num_attention_heads=1)  # 128-wide heads: config from shapes
    torch.manual_seed(0)
    file = write_single_file(FluxTransformer(cfg).state_dict(), tmp_path / "flux1-schnell-tiny.safetensors")
    assert is_schnell(file) and not is_schnell("tiny-flux")
    model = load_transformer(file)
    assert model.config == cfg
    assert scheduler_config(file) == FLUX_SCHNELL_SCHEDULER
    assert scheduler_config("tiny-flux") == scheduler_config(file, config_path="tiny-flux") == FLUX_DEV_SCHEDULER
    # the encoders from a folder, the length from the file (schnell: 256), capped by the folder's T5 tokenizer
    assert default_max_sequence_length(file) == 256
    assert load_text_encoder(file, config_path="tiny-flux").max_sequence_length == 32


def test_vae(tiny_flux):
    vae = load_vae("tiny-flux")
    assert vae.config.latent_channels == 16 and vae.config.shift_factor is not None
    latents = vae.encode(torch.rand(1, 3, 64, 48) * 2 - 1, sample=False)
    assert latents.shape == (1, 16, 8, 6) and vae.decode(latents).shape == (1, 3, 64, 48)


# ---------------------------------------------------------------------------------------------------
# Errors: one line, naming the path and what to give instead


def test_model_path_problems(tiny_flux, tiny_sd, tmp_path):
    assert model_path_problem("tiny-flux") is None and model_path_problem(tiny_flux) is None
    good = write_single_file(tiny_sd, tmp_path / "good.safetensors")
    assert model_path_problem(good) is None
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (tmp_path / "empty").mkdir()
    problems = {
        tmp_path / "missing": "does not exist",
        tmp_path / "model.ckpt": "pickled checkpoints",
        tmp_path / "broken.safetensors": "corrupt or truncated",
        tmp_path / "unet.safetensors": "not a FLUX.1 transformer single file",
        tmp_path / "sdxl": "StableDiffusionXLPipeline folder",
        tmp_path / "empty": "no transformer/config.json",
    }
    for path, expected in problems.items():
        problem = model_path_problem(path)
        assert problem is not None and expected in problem and "\n" not in problem, (path, problem)


def test_loading_errors_are_one_line(tiny_flux, tiny_sd, tmp_path):
    file = write_single_file(tiny_sd, tmp_path / "flux.safetensors")
    other = tmp_path / "other"  # a folder whose transformer config does not describe the file
    shutil.copytree(tiny_flux / "transformer", other / "transformer")
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_single_layers": 5}))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[:-100])
    cases = [
        (lambda: load_transformer(tmp_path / "nope"), "does not exist"),
        (lambda: load_transformer(file, config_path=other), "num_single_layers 3 != 5"),
        (lambda: load_transformer(truncated, config_path=tiny_flux), "corrupt or truncated"),
        (lambda: load_text_encoder(file), "config path, for the text encoders"),
        (lambda: load_vae(file), "config path, for the VAE"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            call()
        assert "\n" not in str(e.value)
    short = {k: v for k, v in diffusers_to_bfl(tiny_sd).items() if k != "txt_in.bias"}
    save_file(short, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"short\.safetensors: missing keys .*txt_in\.bias"):
        load_transformer(tmp_path / "short.safetensors", config_path=tiny_flux)
