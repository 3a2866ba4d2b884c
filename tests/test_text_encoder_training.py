"""Training a text-encoder LoRA (--train_text_encoder): our LoRA on transformers' CLIP models against peft's, the
files a run writes against diffusers' `load_lora_weights`, exact resume, and the flags' errors.

Tolerances: gradients and embeddings rel. L2 < 1e-5 against peft (same fp32 ops in another order); prompt
embeddings of a run's files rel. L2 < 2e-5 against diffusers (as tests/test_lora_text_encoders.py: ours merges
W + dW, diffusers runs peft's unmerged branch); resume: bit-equal."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.errors import ConfigError
from families import read_lora
from lora.files import write_lora
from lora.text_encoders import (
    TARGETS,
    apply_text_encoder_lora,
    load_text_encoder_lora_state_dict,
    text_encoder_lora_modules,
)
from sdxl.loading import load_text_encoder, load_unet
from sdxl.lora import load_lora
from tests.test_lora import rel_err
from tests.test_lora_kinds import randomize
from tests.test_lora_text_encoders import PROMPTS
from tests.test_train import DEMO, ROOT
from training.run.checkpoints import checkpoint_lora, load_checkpoint

FLAGS = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--image_size", "64", "--batch_size", "2",
         "--gradient_accumulation_steps", "2", "--no-cache_text_embeddings", "--train_text_encoder",
         "--text_encoder_lr", "2e-3", "--lora_dropout", "0.1", "--caption_dropout", "0.2", "--use_ema",
         "--validation_prompts", "--val_data_dir", "", "--save_interval", "2", "--log_interval", "1"]


def run(out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), *FLAGS, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def train(out, *extra) -> subprocess.CompletedProcess:
    result = run(out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("mode", ["attention", "all"])
def test_gradients_equal_peft_on_transformers_clip(tiny_dir, mode):
    from peft import LoraConfig, inject_adapter_in_model

    ours, theirs = load_text_encoder(tiny_dir), load_text_encoder(tiny_dir)
    apply_text_encoder_lora(ours, rank=4, alpha=3.0, mode=mode, gradient_checkpointing=True)
    randomize(ours)  # a non-zero up: every down gets a gradient too
    config = LoraConfig(r=4, lora_alpha=3.0, target_modules=[t.rpartition(".")[2] for t in TARGETS[mode]])
    for clip in (theirs.text_encoder, theirs.text_encoder_2):
        inject_adapter_in_model(config, clip)
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    ours_layers = dict(text_encoder_lora_modules(ours))
    pairs = [(ours_layers[name], peft_layers[path]) for path in peft_layers
             for name in ours_layers if name.replace(".text_model.", ".") == path.replace(".text_model.", ".")]
    assert len(pairs) == len(ours_layers) == len(peft_layers) and len(pairs) % len(TARGETS[mode]) == 0
    with torch.no_grad():
        for m, p in pairs:
            p.lora_A["default"].weight.copy_(m.lora_down.weight)
            p.lora_B["default"].weight.copy_(m.lora_up.weight)
    outputs = []
    for te in (ours, theirs):
        embeds, pooled = te(PROMPTS)
        w1 = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1))
        w2 = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(2))
        ((embeds * w1).sum() + (pooled * w2).sum()).backward()
        outputs.append((embeds.detach(), pooled.detach()))
    assert rel_err(outputs[0][0], outputs[1][0]) < 1e-5 and rel_err(outputs[0][1], outputs[1][1]) < 1e-5
    unused = 0  # CLIP-L's last layer: SDXL takes its penultimate hidden state, so that layer gets no gradient
    for m, p in pairs:
        if p.lora_A["default"].weight.grad is None:
            assert m.lora_down.weight.grad is None and m.lora_up.weight.grad is None
            unused += 1
            continue
        assert rel_err(m.lora_down.weight.grad, p.lora_A["default"].weight.grad) < 1e-5
        assert rel_err(m.lora_up.weight.grad, p.lora_B["default"].weight.grad) < 1e-5
        assert m.lora_down.weight.grad.norm() > 0
    assert unused == len(TARGETS[mode])
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)  # the base is frozen


def test_run_files_load_in_diffusers(tmp_path, tiny_dir, pipe):
    """A run with --train_text_encoder: its kohya lora_final and a diffusers file of its last checkpoint give the
    prompt embeddings of the trained encoders, in diffusers and in ours."""
    out = tmp_path / "run"
    train(out, "--max_train_steps", "4", "--save_format", "kohya")
    checkpoint = load_checkpoint(out / "checkpoints" / "step_000004")
    write_lora(checkpoint_lora(checkpoint, ema=True), tmp_path / "diffusers.safetensors", format="diffusers")
    # extract_lora_weights.py's conversion: the kohya file read and written in diffusers format
    write_lora(read_lora(out / "lora_final.safetensors"), tmp_path / "converted.safetensors", format="diffusers")
    kohya = load_file(out / "lora_final.safetensors")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya
    assert not any("mlp" in k for k in kohya)  # the default target mode: attention
    with safe_open(str(tmp_path / "diffusers.safetensors"), "pt") as f:
        assert "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight" in f.keys()

    # the trained encoders: the checkpoint's EMA weights (what lora_final holds) in unmerged LoRA layers
    trained = load_text_encoder(tiny_dir)
    apply_text_encoder_lora(trained, rank=8, alpha=8.0)
    load_text_encoder_lora_state_dict(trained, {k: v for k, v in checkpoint.ema.items() if k.startswith("text_")})
    trained.eval()
    expected = trained.encode(PROMPTS)
    plain = load_text_encoder(tiny_dir).encode(PROMPTS)
    assert rel_err(plain[0], expected[0]) > 1e-4  # the run did train the text encoders
    for name in ("lora_final.safetensors", "diffusers.safetensors", "converted.safetensors"):
        path = (out if name.startswith("lora_final") else tmp_path) / name
        te = load_text_encoder(tiny_dir)
        load_lora(load_unet(tiny_dir), path, text_encoder=te)
        embeds, pooled = te.encode(PROMPTS)
        assert rel_err(embeds, expected[0]) < 2e-5 and rel_err(pooled, expected[1]) < 2e-5
        pipe.load_lora_weights(str(path), adapter_name=name.split(".")[0])
        try:
            with torch.no_grad():
                theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
            assert rel_err(theirs, expected[0]) < 2e-5 and rel_err(theirs_pooled, expected[1]) < 2e-5
        finally:
            pipe.unload_lora_weights()


def test_resume_is_exact_with_text_encoder_training(tmp_path):
    """4 steps straight == 2 steps, then resumed to 4: every LoRA tensor (UNet and text encoders, EMA too) and
    the optimizer's state bit-equal (dropout, caption dropout and the second param group included)."""
    straight = train(tmp_path / "straight", "--max_train_steps", "4")
    assert ", text encoders too) on" in straight.stdout + straight.stderr  # the banner says what trains
    train(tmp_path / "resumed", "--max_train_steps", "2")
    train(tmp_path / "resumed", "--max_train_steps", "4", "--resume_from", "latest")
    for name in ("lora.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "step_000004" / name)
        b = load_file(tmp_path / "resumed" / "checkpoints" / "step_000004" / name)
        assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(k.startswith("text_encoder.") and v.abs().sum() > 0 and "lora_B" in k for k, v in a.items())
    states = [torch.load(tmp_path / run / "checkpoints" / "step_000004" / "training_state.pt", weights_only=True)
              for run in ("straight", "resumed")]
    groups = [s["optimizer"]["param_groups"] for s in states]
    assert groups[0] == groups[1] and [g["lr"] for g in groups[0]] == [4e-3, 2e-3]
    for k, v in states[0]["optimizer"]["state"].items():
        assert all(torch.equal(v[x], states[1]["optimizer"]["state"][k][x]) for x in v)
    # a checkpoint with the text encoders' LoRA is not resumed without them
    fail = run(tmp_path / "resumed", "--max_train_steps", "6", "--resume_from", "latest", "--no-train_text_encoder")
    assert fail.returncode == 2 and "train_text_encoder: checkpoint True, now False" in fail.stderr


def test_cached_text_embeddings_with_text_encoder_training_is_a_one_line_error(tmp_path):
    from training.config import parse_config, validate

    base = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--data_dir", str(DEMO / "train"), "--output_dir",
            str(tmp_path / "out"), "--train_text_encoder"]
    for extra, message in ([[], "--cache_text_embeddings: cannot be combined with --train_text_encoder"],  # tiny_demo
                           [["--no-cache_text_embeddings", "--text_encoder_lr", "0"], "--text_encoder_lr 0.0: must"]):
        with pytest.raises(ConfigError, match=message):
            validate(parse_config([*base, *extra]))
    args = parse_config([*base, "--no-cache_text_embeddings"])
    validate(args)
    assert args.text_encoder_target_mode == "attention" and args.text_encoder_lr is None  # = --learning_rate


def test_two_processes_equal_one_process_with_text_encoder_training(tmp_path):
    """tests/test_distributed.py's check with --train_text_encoder: the text encoders' LoRA gradients are averaged
    over the ranks too (fp32; only the order of sums differs, as there)."""
    from tests.test_distributed import FLAGS as DDP_FLAGS
    from tests.test_distributed import free_port, losses

    flags = [*DDP_FLAGS, "--train_text_encoder", "--no-cache_text_embeddings", "--text_encoder_lr", "2e-3"]
    one = subprocess.run([sys.executable, "train_sdxl.py", *flags, "--batch_size", "4", "--output_dir",
                          str(tmp_path / "one")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "train_sdxl.py", *flags, "--batch_size", "2",
                          "--output_dir", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True))
    wa, wb = load_file(tmp_path / "one/lora_final.safetensors"), load_file(tmp_path / "two/lora_final.safetensors")
    assert wa.keys() == wb.keys()
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [k for k in wa if k.startswith(prefix) and "lora_up" in k]
        assert ups and any(wa[k].abs().sum() > 0 for k in ups)  # each part learned
        err = max(((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa if k.startswith(prefix) and wa[k].norm())
        assert err < 1e-3, (prefix, err)  # Adam divides by sqrt(v): as tests/test_distributed.py
