"""sd3/loading.py and sd3/sai.py: diffusers folders (fp32, fp16 variant, sharded), SAI single files with and without
text encoders or VAE, the SAI key maps against diffusers' own converters, and one-line errors.

Oracles: diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` / `convert_ldm_vae_checkpoint`
(loaders/single_file_utils.py) on the same SAI-layout dicts (equal bit for bit), diffusers' `from_pretrained` /
`from_single_file` of the same files (weights equal bit for bit; outputs within 1e-5 relative, as
test_sd3_mmdit.py), and the tensors written (loaded back bit-identically).
"""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from safetensors.torch import load_file, save_file

from sd3 import sai
from sd3.configs import SD3_VAE_CONFIG, config_from_diffusers, config_from_sai
from sd3.loading import load_text_encoder, load_transformer, load_vae, model_path_problem, scheduler_config
from sd3.mmdit import SD3Transformer
from sd3.text_encoders import SD3TextEncoder
from sd3.tiny import tiny_sd3_path
from tests.sgm_writers import vae_diffusers_to_sgm
from tests.test_sd3_mmdit import VARIANTS, diffusers_model, inputs, randomized, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd3_path()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------
# SAI key maps against diffusers' converters


@pytest.mark.parametrize("name", ["sd3_medium", "sd35_large", "sd35_medium", "other", "tiny"])
def test_transformer_key_map_equals_diffusers_conversion(name):
    """Ours SAI -> diffusers == diffusers' conversion of the same SAI dict; ours diffusers -> SAI -> diffusers is the
    identity; and the config read from the SAI shapes builds the same model."""
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    ref = diffusers_model(cfg)
    sd = randomized(ref)  # every tensor distinct, so a swapped pair of equal shape cannot go unnoticed
    sai_sd = sai.transformer_diffusers_to_sai(sd)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in sai_sd and "final_layer.adaLN_modulation.1.weight" in sai_sd
    theirs = convert_sd3_transformer_checkpoint_to_diffusers({sai.PREFIXES["transformer"] + k: v
                                                              for k, v in sai_sd.items()})
    ours = sai.transformer_sai_to_diffusers(sai_sd)
    assert sorted(ours) == sorted(theirs) == sorted(sd)
    for k in sd:
        assert torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]), k
    if cfg.qk_norm or cfg.attention_head_dim == 64:  # else the head width is not in the shapes (SAI's is 64)
        assert config_from_diffusers({**dict(ref.config), "sample_size": 128}) == config_from_sai(sai_sd)


def test_key_map_errors_name_the_key():
    sd = sai.transformer_diffusers_to_sai(SD3Transformer(VARIANTS["sd3_medium"]).state_dict())
    with pytest.raises(KeyError, match="joint_blocks.0.x_block.extra.weight"):
        sai.transformer_sai_to_diffusers({**sd, "joint_blocks.0.x_block.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="needs all of q, k and v"):
        sai.transformer_diffusers_to_sai({"transformer_blocks.0.attn.to_q.weight": torch.zeros(1)})


def test_vae_key_map_equals_diffusers_conversion(tiny):
    sd = load_file(tiny / "vae/diffusion_pytorch_model.safetensors")
    config = AutoencoderKL.load_config(str(tiny / "vae"))
    ldm = vae_diffusers_to_sgm(sd, config)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and not any("quant_conv" in k for k in ldm)
    theirs = convert_ldm_vae_checkpoint({sai.PREFIXES["vae"] + k: v for k, v in ldm.items()}, config)
    ours = sai.vae_sai_to_diffusers(ldm, config)
    assert sorted(ours) == sorted(theirs) == sorted(sd)
    for k in sd:
        assert torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], sd[k]), k
    with torch.device("meta"):  # SD3's own VAE config maps too (no quant convs, 16 channels)
        full = AutoencoderKL.from_config(SD3_VAE_CONFIG).state_dict()
    assert sorted(sai.vae_sai_to_diffusers(vae_diffusers_to_sgm(full, SD3_VAE_CONFIG), SD3_VAE_CONFIG)) == sorted(full)


# ---------------------------------------------------------------------------------------------------
# Diffusers folders


def test_tiny_transformer_equals_diffusers_from_pretrained(tiny):
    ours = load_transformer("tiny-sd3")
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    ref = SD3Transformer2DModel.from_pretrained(tiny, subfolder="transformer", local_files_only=True).eval()
    assert_same_weights(ours, ref)
    x = inputs(ours.config)
    with torch.no_grad():
        assert rel_err(ours(**x), ref(**x).sample) < 1e-5
    bf16 = load_transformer(tiny / "transformer", dtype=torch.bfloat16)  # the transformer folder itself
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"


def write_shards(weights: dict, folder, stem: str, index_name: str):
    keys = sorted(weights)
    shards = {f"{stem}-00001-of-00002.safetensors": keys[: len(keys) // 2],
              f"{stem}-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: weights[k].contiguous() for k in ks}, folder / name)
    size = sum(v.numel() * v.element_size() for v in weights.values())
    index = {"metadata": {"total_size": size}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / index_name).write_text(json.dumps(index))


def test_fp16_variant_and_sharded_folders(tiny, tmp_path):
    full = load_transformer(tiny)
    weights = load_file(tiny / "transformer/diffusion_pytorch_model.safetensors")
    for kind in ("fp16", "sharded"):
        root = tmp_path / kind
        shutil.copytree(tiny, root)
        folder = root / "transformer"
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        if kind == "fp16":
            save_file({k: v.half() for k, v in weights.items()}, folder / "diffusion_pytorch_model.fp16.safetensors")
            half = load_transformer(root)
            assert half.dtype == torch.float32
            assert all(torch.equal(v, weights[k].half().float()) for k, v in half.state_dict().items())
        else:
            write_shards(weights, folder, "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json")
            assert_same_weights(load_transformer(root), full)
    # the text encoders too: CLIP-L as the fp16 variant, T5 sharded (as SD3's own text_encoder_3)
    root = tmp_path / "sharded"
    te = root / "text_encoder"
    clip_l = load_file(te / "model.safetensors")
    (te / "model.safetensors").unlink()
    save_file({k: v.half() for k, v in clip_l.items()}, te / "model.fp16.safetensors")
    t5_folder = root / "text_encoder_3"
    t5 = load_file(t5_folder / "model.safetensors")
    (t5_folder / "model.safetensors").unlink()
    write_shards(t5, t5_folder, "model", "model.safetensors.index.json")
    enc, ref = SD3TextEncoder.from_pretrained(root), SD3TextEncoder.from_pretrained(tiny)
    assert_same_weights(enc.text_encoder_3, ref.text_encoder_3)
    for k, v in clip_l.items():
        assert torch.equal(enc.text_encoder.state_dict()[k], v.half().float()), k


def test_vae_and_scheduler(tiny):
    vae = load_vae("tiny-sd3")
    measured = json.loads((tiny / "vae/config.json").read_text())  # the pretraining's scale and shift
    assert vae.config.latent_channels == 16 and vae.config.shift_factor == measured["shift_factor"] != 0.0609
    assert vae.config.scaling_factor == measured["scaling_factor"] != 1.5305
    latents = vae.encode(torch.zeros(1, 3, 64, 64), sample=False)
    assert latents.shape == (1, 16, 8, 8)
    assert scheduler_config("tiny-sd3") == {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                            "num_train_timesteps": 1000, "shift": 3.0}


# ---------------------------------------------------------------------------------------------------
# SAI single files


def write_sai_file(tiny, path, text_encoders=True, vae=True, dtype=torch.float32):
    """The tiny model as an SAI single file, written with our diffusers -> SAI map (checked above against
    diffusers' converter): CLIP-L without its (identity) text_projection, T5 with its embedding stored once."""
    parts = {"transformer": sai.transformer_diffusers_to_sai(
        load_file(tiny / "transformer/diffusion_pytorch_model.safetensors"))}
    if vae:
        config = AutoencoderKL.load_config(str(tiny / "vae"))
        parts["vae"] = vae_diffusers_to_sgm(load_file(tiny / "vae/diffusion_pytorch_model.safetensors"), config)
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            sd = load_file(tiny / name / "model.safetensors")
            parts[name] = {k: v for k, v in sd.items() if not (name == "text_encoder" and k.startswith("text_proj"))}
    sd = {sai.PREFIXES[part] + k: v.to(dtype).contiguous() for part, tensors in parts.items()
          for k, v in tensors.items()}
    save_file(sd, path)
    return path


def test_single_file_with_everything(tiny, tmp_path):
    path = write_sai_file(tiny, tmp_path / "sd3.5_tiny.safetensors")
    assert model_path_problem(path) is None
    assert_same_weights(load_transformer(path), load_transformer(tiny))
    assert_same_weights(load_transformer(path, config_path="tiny-sd3"), load_transformer(tiny))
    assert_same_weights(load_vae(path, config_path="tiny-sd3"), load_vae(tiny))  # the tiny VAE's config
    with pytest.raises(ValueError, match="does not match the model: .* missing keys: .*mis-shaped keys: "):
        load_vae(path)  # read as SD3's VAE (the default), the tiny one's shapes do not fit
    te_file = load_text_encoder(path, config_path="tiny-sd3", max_sequence_length=16)
    te_dir = load_text_encoder("tiny-sd3", max_sequence_length=16)
    assert_same_weights(te_file, te_dir)
    prompts = ["a photo of a cat", ""]
    for a, b in zip(te_file.encode(prompts), te_dir.encode(prompts), strict=True):
        assert torch.equal(a, b)
    assert scheduler_config(path) == scheduler_config(path, config_path=tiny) == scheduler_config(tiny)


def test_single_file_agrees_with_diffusers_from_single_file(tiny, tmp_path):
    path = write_sai_file(tiny, tmp_path / "sd3.5_tiny.safetensors", text_encoders=False, dtype=torch.float16)
    ref = SD3Transformer2DModel.from_single_file(str(path), config=str(tiny), subfolder="transformer",
                                                 local_files_only=True, torch_dtype=torch.float32)
    ours = load_transformer(path)
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k].float()), k


def test_single_file_without_text_encoders_or_vae(tiny, tmp_path):
    path = write_sai_file(tiny, tmp_path / "bare.safetensors", text_encoders=False, vae=False)
    assert model_path_problem(path) is None
    with pytest.raises(ValueError, match=r"holds no tokenizers .* give a diffusers SD3 folder .* \(--config_path\)"):
        load_text_encoder(path)
    with pytest.raises(ValueError, match="holds no VAE .* give a diffusers SD3 folder"):
        load_vae(path)
    assert_same_weights(load_text_encoder(path, config_path=tiny, t5=False), load_text_encoder(tiny, t5=False))
    assert_same_weights(load_vae(path, config_path=tiny), load_vae(tiny))


def test_single_file_errors(tiny, tmp_path):
    path = write_sai_file(tiny, tmp_path / "sd3.5_tiny.safetensors", text_encoders=False)
    sd = load_file(path)
    key = "model.diffusion_model.joint_blocks.1.x_block.attn.proj.weight"
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in sd.items() if k != key}, bad)
    with pytest.raises(ValueError, match="1 missing keys: transformer_blocks.1.attn.to_out.0.weight"):
        load_transformer(bad)
    save_file({**sd, "model.diffusion_model.joint_blocks.0.x_block.extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="is not an SD3 checkpoint: SAI MMDiT: no mapping for key "
                                         "'joint_blocks.0.x_block.extra.weight'"):
        load_transformer(bad)
    sdxl_like = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, sdxl_like)
    with pytest.raises(ValueError, match="not an SAI SD3/SD 3.5 checkpoint.*looks like an SDXL checkpoint"):
        load_transformer(sdxl_like)
    assert "looks like an SDXL checkpoint" in model_path_problem(sdxl_like)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        load_transformer(truncated)
    assert "truncated" in model_path_problem(truncated)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled checkpoints"):
        load_transformer(ckpt)
    assert "never pickled" in model_path_problem(ckpt)


def test_folder_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; give a diffusers SD3"):
        load_transformer(tmp_path / "nope")
    assert model_path_problem(tmp_path / "nope").startswith("does not exist")
    assert model_path_problem("tiny-sd3") is None and model_path_problem(tiny) is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers SD3 folder: no transformer/config.json"):
        load_transformer(tmp_path / "empty")
    assert "no model_index.json" in model_path_problem(tmp_path / "empty")
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert model_path_problem(sdxl).startswith("is a diffusers StableDiffusionXLPipeline folder, not a ")

    root = tmp_path / "bad"
    shutil.copytree(tiny, root)
    target = root / "transformer/diffusion_pytorch_model.safetensors"
    weights = load_file(target)
    key = "transformer_blocks.1.attn.to_q.weight"
    save_file({k: v for k, v in weights.items() if k != key}, target)
    with pytest.raises(ValueError, match=f"1 missing keys: {key}"):
        load_transformer(root)
    save_file({**weights, "extra.weight": torch.zeros(1)}, target)
    with pytest.raises(ValueError, match="1 unexpected keys: extra.weight"):
        load_transformer(root)
    save_file({**weights, key: torch.zeros(3, 3)}, target)
    with pytest.raises(ValueError, match=rf"mis-shaped keys: {key} \(3, 3\) != \(96, 96\)"):
        load_transformer(root)
    target.unlink()
    (target.parent / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle files are not loaded"):
        load_transformer(root)

    config = root / "transformer/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "qk_norm": "layer_norm"}))
    with pytest.raises(ValueError, match="config.json: transformer config: qk_norm 'layer_norm' is not supported"):
        load_transformer(root)
    shutil.rmtree(root / "transformer")
    assert model_path_problem(root) == "is an incomplete SD3 folder: no transformer/config.json; download it again"
    shutil.rmtree(root / "scheduler")
    with pytest.raises(ValueError, match="no scheduler/scheduler_config.json"):
        scheduler_config(root)
