"""Training FLUX.1 LoRAs (train_flux.py) on tiny-flux, CPU: a run end to end, exact resume after SIGTERM, a CLIP-L
LoRA, DoRA, caches, the presets; and one training step against diffusers' FluxTransformer2DModel with a peft LoRA.

Tolerances. The training step: fp32, loss relative 1e-5 and every LoRA gradient relative 1e-4 (summation order
only: the transformers agree to ~1e-7, tests/test_flux_transformer.py). Resume: bit for bit (the same CPU ops).
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from flux import family
from flux.loading import load_text_encoder, load_transformer
from flux.tiny import TINY_MAX_SEQUENCE_LENGTH, tiny_flux_path
from lora.layer import LoRAConfig, add_lora, lora_modules
from tests.test_resume import losses, stop_after
from training.cli import main as train_main
from training.config import ConfigError, parse_config, validate
from training.flags import NoiseSettings
from training.loop.loss import diffusion_loss

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo" / "train"
BASE = ["--pretrained_model", "tiny-flux", "--data_dir", str(DATA), "--image_size", "64", "--device", "cpu",
        "--num_workers", "0", "--validation_interval", "0", "--log_interval", "1"]


def train(out: Path, *extra) -> int:
    """train_flux.py's main in this process (the script itself runs in `test_script_runs_and_resumes_exactly`)."""
    return train_main([*BASE, "--output_dir", str(out), *extra], "flux")


def test_script_runs_and_resumes_exactly(tmp_path):
    """train_flux.py end to end; a run stopped by SIGTERM and resumed equals one never stopped, bit for bit:
    every loss and the final LoRA (with LoRA dropout, caption dropout, random flips, batch 2 x accumulation 2)."""
    flags = [sys.executable, str(ROOT / "train_flux.py"), *BASE, "--max_train_steps", "6", "--batch_size", "2",
             "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1", "--caption_dropout", "0.2",
             "--random_flip", "--guidance_scale", "2.0", "--save_interval", "100", "--num_workers", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run = subprocess.run([*flags, "--output_dir", str(full)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: steps 6" in run.stdout
    code, err = stop_after([*flags, "--output_dir", str(cut)], cut, 2, signal.SIGTERM)
    assert code == 143, err[-3000:]
    run = subprocess.run([*flags, "--output_dir", str(cut), "--resume_from", "latest"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from" in run.stdout
    assert losses(cut) == losses(full) and list(losses(full)) == list(range(1, 7))
    a, b = load_file(full / "lora_final.safetensors"), load_file(cut / "lora_final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # what was written: BFL kohya names, fused q/k/v, kohya's FLUX metadata, the family's defaults in config.yaml
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in a
    assert "lora_unet_single_blocks_2_linear1.lora_down.weight" in a
    config = (full / "config.yaml").read_text()
    for line in ("timestep_sampling: flux_shift", "prediction_type: flow", "lora_target_mode: attention",
                 f"max_sequence_length: {TINY_MAX_SEQUENCE_LENGTH}", "guidance_scale: 2.0", "flow_shift: 1.0"):
        assert line in config, line


def test_text_encoder_lora_dora_and_caches(tmp_path):
    """--train_text_encoder trains CLIP-L only (lora_te1_, loads back); DoRA in kohya format needs a mode that
    adapts whole fused layers (refused before anything loads otherwise); disk caches of latents and text."""
    out = tmp_path / "te"
    assert train(out, "--max_train_steps", "2", "--train_text_encoder", "--learning_rate", "1e-2") == 0
    sd = load_file(out / "lora_final.safetensors")
    te = [k for k in sd if k.startswith("lora_te")]
    assert te and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in te)
    assert any(sd[k].abs().sum() > 0 for k in te if k.endswith("lora_up.weight"))  # CLIP-L's LoRA trained
    from sampling.inference import ImageGenerator

    ImageGenerator.from_pretrained("tiny-flux", loras=[(out / "lora_final.safetensors", 1.0)])  # both parts load

    args = parse_config([*BASE, "--output_dir", str(tmp_path / "d0"), "--use_dora"], "flux")
    with pytest.raises(ConfigError, match="use_dora.*single_blocks_0_linear1.*--save_format diffusers"):
        validate(args, "flux")
    out = tmp_path / "dora"
    assert train(out, "--max_train_steps", "2", "--use_dora", "--lora_target_mode", "all") == 0
    sd = load_file(out / "lora_final.safetensors")
    assert sd["lora_unet_single_blocks_0_linear1.dora_scale"].shape == (448, 1)
    assert load_file(out / "checkpoints/step_000002/lora.safetensors")  # training checkpoints: peft, DoRA too

    out = tmp_path / "cached"  # + a validation loss and sample grids (FLUX sampling through the family)
    assert train(out, "--max_train_steps", "2", "--cache_latents", "disk", "--cache_text_embeddings",
                 "--val_data_dir", str(DATA.parent / "val"), "--validation_prompts", "a red circle",
                 "--num_validation_images", "2") == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000.png", "step_000002.png"]
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]) == 2
    cache = out / "cache"
    assert len(list((cache / "text").glob("*.safetensors"))) > 1 and any((cache / "latents").rglob("*.safetensors"))
    entry = load_file(next((cache / "text").glob("*.safetensors")))
    assert entry["embeds"].shape == (TINY_MAX_SEQUENCE_LENGTH, 48) and entry["pooled"].shape == (32,)


def test_bad_flags_are_one_line(tmp_path, capsys):
    for extra, fragment in ((["--lora_target_mode", "attention_out"], "not one of FLUX.1's"),
                            (["--precondition_outputs"], "Stable Diffusion 3.5 only"),
                            (["--pretrained_model", "tiny"], "train it with train_sdxl.py")):
        with pytest.raises(SystemExit) as e:
            train(tmp_path / "bad", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and fragment in err and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="conv_rank"):
        family.lora_targets(load_transformer("tiny-flux"), LoRAConfig(conv_rank=4))


@pytest.mark.parametrize("name", ["flux_dev_lora_1024_24gb", "flux_dev_lora_1024_80gb"])
def test_presets_parse_and_validate(name, tmp_path):
    args = parse_config(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--data_dir", str(DATA)], "flux")
    assert args.image_size == 1024 and args.gradient_checkpointing and args.precision == "bf16"
    assert args.cache_latents == "disk" and args.cache_text_embeddings and args.timestep_sampling == "flux_shift"
    assert args.max_sequence_length == 512  # the model folder is not there: FLUX.1-dev's
    # valid for FLUX.1 (the real folder aside): the same file over tiny-flux, on this CPU
    args = parse_config(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--data_dir", str(DATA),
                         "--pretrained_model", "tiny-flux", "--output_dir", str(tmp_path), "--device", "cpu"], "flux")
    validate(args, "flux")
    assert args.lora_target_mode in family.LORA_MODES


# ---------------------------------------------------------------------------------------------------
# One training step vs diffusers + peft


@pytest.mark.parametrize("mode,guidance", [("attention", 1.0), ("all_plus", 3.0)])
def test_training_step_matches_diffusers_with_peft(mode, guidance):
    """Loss and every LoRA gradient of one step: our family (predict, objective, lora_targets) vs diffusers'
    FluxTransformer2DModel with a peft LoRA on the same targets and the same A/B, driven as diffusers' FLUX LoRA
    example does (pack, ids, timestep = sigma, guidance embedding = --guidance_scale, unpack)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    ours = load_transformer("tiny-flux")
    config = LoRAConfig(rank=4, alpha=2.0, target_mode=mode)
    wrapped = add_lora(ours, family.lora_targets(ours, config))
    for m in wrapped.values():  # non-zero B so that the LoRA changes the output and gets full gradients
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux_path(), subfolder="transformer", local_files_only=True)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=list(wrapped), init_lora_weights=False))
    ref_modules = dict(ref.named_modules())
    for name, m in wrapped.items():
        ref_modules[name].lora_A["default"].weight.data.copy_(m.lora_down.weight)
        ref_modules[name].lora_B["default"].weight.data.copy_(m.lora_up.weight)

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
    embeds, pooled = load_text_encoder("tiny-flux").encode(["a red circle", "a blue square"])
    objective = family.objective(NoiseSettings(timestep_sampling="flux_shift", flow_shift=1.0,
                                               guidance_scale=guidance), "tiny-flux")
    t = objective.draw_times(2, g, x0.shape)

    def reference(x_t, t):  # diffusers' train_dreambooth_lora_flux.py, step by step
        b, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        out = ref(hidden_states=packed, timestep=t, guidance=torch.full((b,), guidance), pooled_projections=pooled,
                  encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=img_ids).sample
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

    results = {}
    for name, predict in (("ours", lambda x_t, t: family.predict(ours, x_t, t, embeds, pooled, {}, objective)),
                          ("ref", reference)):
        loss = diffusion_loss(predict, objective, x0, t, noise).mean()
        loss.backward()
        results[name] = loss.item()
    loss_err = abs(results["ours"] - results["ref"]) / results["ref"]
    assert loss_err < 1e-5
    worst = 0.0
    for name, m in lora_modules(ours).items():
        for ours_w, ref_w in ((m.lora_down.weight, ref_modules[name].lora_A["default"].weight),
                              (m.lora_up.weight, ref_modules[name].lora_B["default"].weight)):
            err = ((ours_w.grad - ref_w.grad).norm() / ref_w.grad.norm()).item()
            assert err < 1e-4, name
            worst = max(worst, err)
    other = family.objective(NoiseSettings(timestep_sampling="flux_shift", flow_shift=1.0,
                                           guidance_scale=guidance + 2.0), "tiny-flux")
    with torch.no_grad():  # the objective's guidance reaches the transformer
        x_t = objective.noisy(x0, noise, t)
        a, b = (family.predict(ours, x_t, t, embeds, pooled, {}, o) for o in (objective, other))
    assert ((a - b).norm() / a.norm()).item() > 1e-3
    print(json.dumps({"mode": mode, "loss_rel_err": loss_err, "worst_grad_rel_err": worst}))
