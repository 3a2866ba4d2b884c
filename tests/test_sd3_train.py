"""train_sd3.py on the tiny SD 3.5 (CPU, seconds): it trains and writes files the rest of the project reads, resumes
exactly, trains a text-encoder LoRA and DoRA, caches latents and text embeddings, leaves T5 out with --no-t5, and
refuses settings SD 3.5 does not have; the SD 3.5 presets parse and validate.

Runs are in-process (`train_sd3.main`, what the script runs) to save the interpreter start; tests/test_resume.py
covers stopping by signal for every family alike. Resume: bit-equal (the same ops in the same order on a CPU).
"""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import train_sd3
from families import read_lora
from sampling.inference import ImageGenerator
from sd3 import family as sd3
from training.config import ConfigError, parse_config, validate
from training.flags import Settings
from training.loop.models import build_models

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
FLAGS = ["--pretrained_model", "tiny-sd3", "--data_dir", str(DEMO / "train"), "--image_size", "64", "--device", "cpu",
         "--num_workers", "0", "--lora_rank", "4", "--learning_rate", "1e-3", "--validation_prompts",
         "--val_data_dir", "", "--save_interval", "100", "--log_interval", "1"]


def train(out, *extra) -> int:
    return train_sd3.main([*FLAGS, "--output_dir", str(out), *extra])


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_trains_with_the_models_defaults_and_writes_a_kohya_lora(tmp_path):
    out = tmp_path / "out"
    assert train(out, "--max_train_steps", "3", "--validation_prompts", "a red circle", "--num_validation_images",
                 "1", "--val_data_dir", str(DEMO / "val")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: config[k] for k in ("prediction_type", "timestep_sampling", "lora_target_mode", "flow_shift", "t5",
                                   "max_sequence_length")} == {
        "prediction_type": "flow", "timestep_sampling": "logit_normal", "lora_target_mode": "attention",
        "flow_shift": 3.0, "t5": True, "max_sequence_length": 32}
    assert list(losses(out)) == [1, 2, 3] and all(v > 0 for v in losses(out).values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and (out / "samples" / "step_000003.png").is_file()
    lora = out / "lora_final.safetensors"
    keys = load_file(str(lora)).keys()
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys
    meta = metadata(lora)
    assert meta["modelspec.architecture"] == "stable-diffusion-v3.5-medium/lora"
    assert meta["sdxl_lora.family"] == "sd3" and "modelspec.prediction_type" not in meta  # kohya writes none for flow
    weights = read_lora(lora)
    assert weights.names.family == "sd3" and weights.target_mode == "attention"
    gen = ImageGenerator.from_pretrained("tiny-sd3", loras=[(lora, 1.0)])  # generate_images.py's path
    assert gen.generate("a red circle", 1, width=64, height=64, steps=2)[0].size == (64, 64)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """3 steps, then resumed to 6, == 6 in one go (batch 2 x 2 micro-batches; flips, caption and LoRA dropout,
    offset noise, mode sampling, cosmap weights, EMA): every loss, the LoRA and the optimizer state, bit for bit."""
    flags = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--random_flip", "--caption_dropout", "0.2",
             "--lora_dropout", "0.1", "--noise_offset", "0.05", "--timestep_sampling", "mode", "--loss_weighting",
             "cosmap", "--use_ema", "--lr_scheduler", "cosine", "--warmup_steps", "2", "--lr_schedule_total", "6",
             "--max_sequence_length", "32"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train(full, *flags, "--max_train_steps", "6") == 0
    assert train(cut, *flags, "--max_train_steps", "3") == 0
    assert train(cut, *flags, "--max_train_steps", "6", "--resume_from", "latest") == 0
    assert losses(cut) == losses(full) and list(losses(full)) == list(range(1, 7))
    for name in ("lora_final.safetensors", "checkpoints/step_000006/lora.safetensors",
                 "checkpoints/step_000006/ema.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = [torch.load(out / "checkpoints/step_000006/training_state.pt", weights_only=True)["optimizer"]["state"]
             for out in (full, cut)]
    a, b = ([t for s in st.values() for t in s.values() if torch.is_tensor(t)] for st in state)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_text_encoder_lora_and_dora_in_kohya_format(tmp_path):
    out = tmp_path / "out"
    assert train(out, "--max_train_steps", "2", "--train_text_encoder", "--use_dora", "--lora_target_mode", "all",
                 "--max_sequence_length", "16") == 0
    lora = out / "lora_final.safetensors"
    tensors = load_file(str(lora))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any(k.startswith("lora_te2_") for k in tensors) and not any("te3" in k for k in tensors)  # no T5
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.dora_scale"].shape == (288, 1)  # q, k, v stacked
    assert "lora_unet_joint_blocks_3_context_block_adaLN_modulation_1.dora_scale" in tensors  # `all`: adaLN too
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].any()  # it trained
    weights = read_lora(lora)
    assert weights.lora_config().use_dora and weights.target_mode == "all"
    gen = ImageGenerator.from_pretrained("tiny-sd3", loras=[(lora, 1.0)])  # both CLIPs and the transformer
    base = ImageGenerator.from_pretrained("tiny-sd3")
    assert not torch.equal(gen.text_encoder.encode(["a cat"])[1], base.text_encoder.encode(["a cat"])[1])


def test_caches_and_no_t5(tmp_path):
    out = tmp_path / "out"
    argv = [*FLAGS, "--output_dir", str(out), "--no-t5", "--cache_latents", "memory", "--cache_text_embeddings",
            "--precondition_outputs", "--max_sequence_length", "8"]
    args = parse_config(argv, "sd3")
    validate(args, "sd3")
    models = build_models(Settings.of(args), sd3, torch.device("cpu"))  # what the loop builds
    assert models.text_encoder.text_encoder_3 is None and models.text_encoder.max_sequence_length == 8
    assert b"t5=False" in models.texts.model_id  # cached embeddings never mix with T5's
    embeds, _ = models.text_encoder.encode(["a red circle"])
    assert embeds.shape == (1, 77 + 8, 128) and not embeds[:, 77:].any()
    assert models.objective.precondition and models.objective.shift == 3.0
    assert train(out, "--no-t5", "--cache_latents", "memory", "--cache_text_embeddings", "--precondition_outputs",
                 "--max_train_steps", "2", "--overwrite_output_dir") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["t5"] is False and len(losses(out)) == 2


@pytest.mark.parametrize("extra,message", [
    (["--lora_target_mode", "attention_out"], "--lora_target_mode attention_out: is not one of Stable Diffusion "
                                              "3.5's: attention, attention_mlp, all"),
    (["--timestep_sampling", "flux_shift"], "is not one of Stable Diffusion 3.5's"),
    (["--prediction_type", "epsilon"], "is not one of Stable Diffusion 3.5's: flow"),
    (["--loss_weighting", "min_snr"], "is not one of Stable Diffusion 3.5's: none, sigma_sqrt, cosmap"),
    (["--conv_rank", "4"], "is for SDXL only"),
    (["--guidance_scale", "3.5"], "is for FLUX.1 only"),
    (["--pretrained_model", "tiny"], "is a SDXL model; train it with train_sdxl.py"),
])
def test_settings_sd35_does_not_have_are_refused(tmp_path, extra, message):
    args = parse_config([*FLAGS, "--output_dir", str(tmp_path / "out"), *extra], "sd3")
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(args, "sd3")


@pytest.mark.parametrize("name", ["sd35_medium_lora_1024_24gb", "sd35_large_lora_1024_48gb"])
def test_presets_parse_and_validate(tmp_path, name):
    preset = ROOT / "configs" / f"{name}.yaml"
    args = parse_config(["--config", str(preset), "--data_dir", str(DEMO / "train")], "sd3")
    assert args.gradient_checkpointing and args.precision == "bf16" and args.cache_latents == "disk"
    assert args.cache_text_embeddings and args.image_size == 1024 and args.prediction_type == "flow"
    assert args.flow_shift == 3.0 and args.max_sequence_length == 256 and args.lora_target_mode in sd3.LORA_MODES
    # as written, but on the tiny model and this machine (the real weights are not here)
    args = parse_config(["--config", str(preset), "--data_dir", str(DEMO / "train"), "--pretrained_model",
                         "tiny-sd3", "--output_dir", str(tmp_path / "out"), "--device", "cpu"], "sd3")
    validate(args, "sd3")
