"""Loading weights: diffusers folders (fp32, fp16 variant, sharded), single-file SGM checkpoints, errors.

Oracles: diffusers' own `from_pretrained` of the same folder (outputs equal within 1e-5, relative, as
in test_unet.py) and the tensors written (loaded back bit-identically).
"""

import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sdxl.loading import load_text_encoder, load_unet, load_vae
from sdxl.sgm import PREFIXES
from sdxl.tiny import TINY_UNET_CONFIG
from tests.sgm_writers import (
    text_encoder_2_hf_to_openclip,
    text_encoder_hf_to_sgm,
    unet_diffusers_to_sgm,
    vae_diffusers_to_sgm,
)
from tests.test_unet import inputs, rel_err


def copy_unet_folder(tiny_dir, dst):
    shutil.copytree(tiny_dir / "unet", dst / "unet")
    return dst / "unet" / "diffusion_pytorch_model.safetensors"


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_tiny_equals_diffusers_from_pretrained(tiny_dir):
    ours = load_unet("tiny")
    assert not any(p.requires_grad for p in ours.parameters())
    ref = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet", local_files_only=True).eval()
    x = inputs(TINY_UNET_CONFIG)
    with torch.no_grad():
        assert rel_err(ours(**x), ref(**x).sample) < 1e-5
    # the UNet folder itself, and dtype/device arguments
    bf16 = load_unet(tiny_dir / "unet", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"


def test_fp16_variant_and_sharded(tiny_dir, tmp_path):
    full = load_unet(tiny_dir)
    weights = load_file(copy_unet_folder(tiny_dir, tmp_path / "fp16"))
    (tmp_path / "fp16/unet/diffusion_pytorch_model.safetensors").unlink()
    fp16_file = tmp_path / "fp16/unet/diffusion_pytorch_model.fp16.safetensors"
    save_file({k: v.half() for k, v in weights.items()}, fp16_file)
    half = load_unet(tmp_path / "fp16")
    assert half.dtype == torch.float32
    for k, v in half.state_dict().items():
        assert torch.equal(v, weights[k].half().float()), k

    copy_unet_folder(tiny_dir, tmp_path / "sharded")
    (tmp_path / "sharded/unet/diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(weights)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: weights[k] for k in ks}, tmp_path / "sharded/unet" / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "sharded/unet/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(load_unet(tmp_path / "sharded"), full)


def write_single_file(tiny_dir, path, dtype=torch.float16):
    """The tiny model as one SGM-layout checkpoint, written with the inverse key maps."""
    unet_cfg = json.loads((tiny_dir / "unet/config.json").read_text())
    vae_cfg = json.loads((tiny_dir / "vae/config.json").read_text())
    te1 = load_file(tiny_dir / "text_encoder/model.safetensors")
    te1 = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in te1.items()}
    parts = {
        "unet": unet_diffusers_to_sgm(load_file(tiny_dir / "unet/diffusion_pytorch_model.safetensors"), unet_cfg),
        "vae": vae_diffusers_to_sgm(load_file(tiny_dir / "vae/diffusion_pytorch_model.safetensors"), vae_cfg),
        "text_encoder": text_encoder_hf_to_sgm(te1),
        "text_encoder_2": text_encoder_2_hf_to_openclip(load_file(tiny_dir / "text_encoder_2/model.safetensors")),
    }
    sd = {PREFIXES[part] + k: v.to(dtype).contiguous() for part, tensors in parts.items() for k, v in tensors.items()}
    save_file(sd, path)


def test_single_file_round_trip(tiny_dir, tmp_path):
    path = tmp_path / "tiny_sdxl.safetensors"
    write_single_file(tiny_dir, path, dtype=torch.float32)

    assert_same_weights(load_unet(path, config_path="tiny"), load_unet("tiny"))
    assert_same_weights(load_vae(path, config_path=tiny_dir), load_vae(tiny_dir))
    te_file, te_dir = load_text_encoder(path, config_path=tiny_dir), load_text_encoder("tiny")
    assert_same_weights(te_file, te_dir)
    prompts = ["a photo of a cat", ""]
    for a, b in zip(te_file.encode(prompts), te_dir.encode(prompts), strict=True):
        assert torch.equal(a, b)


def test_single_file_agrees_with_diffusers_from_single_file(tiny_dir, tmp_path):
    path = tmp_path / "tiny_sdxl.safetensors"
    write_single_file(tiny_dir, path)
    ref = UNet2DConditionModel.from_single_file(
        str(path), config=str(tiny_dir), subfolder="unet", local_files_only=True
    )
    ours = load_unet(path, config_path=tiny_dir)
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k].float()), k


def test_single_file_errors(tiny_dir, tmp_path):
    path = tmp_path / "tiny_sdxl.safetensors"
    write_single_file(tiny_dir, path)
    # read as SDXL base (the default): the shapes do not fit, and the error names a key
    with pytest.raises(ValueError, match=r"mis-shaped keys: .*weight"):
        load_unet(path)
    not_sgm = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, not_sgm)
    with pytest.raises(ValueError, match="not an SGM SDXL checkpoint"):
        load_unet(not_sgm)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        load_unet(truncated)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled checkpoints"):
        load_unet(ckpt)


def test_folder_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*download_weights.sh"):
        load_unet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers SDXL folder"):
        load_unet(tmp_path / "empty")

    weights = load_file(copy_unet_folder(tiny_dir, tmp_path / "bad"))
    target = tmp_path / "bad/unet/diffusion_pytorch_model.safetensors"
    key = "down_blocks.1.attentions.0.proj_in.weight"
    save_file({k: v for k, v in weights.items() if k != key}, target)
    with pytest.raises(ValueError, match=f"1 missing keys: {key}"):
        load_unet(tmp_path / "bad")
    save_file({**weights, "extra.weight": torch.zeros(1)}, target)
    with pytest.raises(ValueError, match="1 unexpected keys: extra.weight"):
        load_unet(tmp_path / "bad")
    save_file({**weights, key: torch.zeros(3, 3)}, target)
    with pytest.raises(ValueError, match=rf"mis-shaped keys: {key} \(3, 3\) != \(96, 96\)"):
        load_unet(tmp_path / "bad")

    target.unlink()
    (target.parent / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle files are not loaded"):
        load_unet(tmp_path / "bad")

    config = tmp_path / "bad/unet/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_linear_projection": False}))
    with pytest.raises(ValueError, match="config.json: UNet config is not SDXL-shaped"):
        load_unet(tmp_path / "bad")
