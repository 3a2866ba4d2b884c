"""Training end to end on the tiny model, and one training step against diffusers' UNet + a peft LoRA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from diffusion.ddpm import DDPMObjective, alphas_cumprod
from lora.layer import LoRAConfig, lora_modules
from sampling.grid_labels import label_grid
from sdxl.loading import load_unet
from sdxl.lora import apply_lora, load_lora
from training.loop.loss import diffusion_loss, weighted
from training.loop.optim import lr_multiplier

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def run_train(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
           "--output_dir", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_writes_everything_and_learns(tmp_path):
    run = run_train(tmp_path, "--max_train_steps", "30", "--validation_interval", "30", "--save_interval", "15")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    metrics = read_metrics(out)
    losses = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in losses] == list(range(1, 31))
    assert all({"lr", "grad_norm", "samples_per_s"} <= set(m) for m in losses)
    val = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 30]
    assert val[-1]["val_loss"] < 0.9 * val[0]["val_loss"]  # the purple validation pictures; measured 0.271 -> 0.225
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000.png", "step_000030.png"]
    labelled = label_grid(Image.new("RGB", (4 * 64, 2 * 64)), ["a", "b"], [0, 1, 2, 3]).size  # 2 prompts x 4 images
    assert Image.open(out / "samples/step_000030.png").size == labelled
    assert "step 30: validation loss 0." in run.stdout and "step 30: sampling 2 prompts x 4 images ..." in run.stdout
    assert "30 steps of 16 images per step (batch_size 16 x accumulation 1 x 1 process)" in run.stdout
    for step in ("step_000015", "step_000030"):
        assert {"lora.safetensors", "training_state.pt", "config.yaml", "COMPLETE"} <= {
            p.name for p in (out / "checkpoints" / step).iterdir()}
    state = torch.load(out / "checkpoints/step_000030/training_state.pt", weights_only=True)
    assert state["step"] == 30 and "optimizer" in state
    final = out / "lora_final.safetensors"
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(final))
    unet = load_unet("tiny")
    assert load_lora(unet, final)["ss_network_dim"] == "8"
    assert "done: steps 30" in run.stdout


def make_messy_folder(root: Path) -> list[str]:
    root.mkdir()
    for i, name in enumerate(sorted(p.name for p in (DEMO / "train").glob("*.png"))[:12]):
        Image.open(DEMO / "train" / name).save(root / f"ok{i}.png")
        (root / f"ok{i}.txt").write_text("a shape")
    Image.new("CMYK", (96, 96), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    Image.new("RGBA", (96, 96), (255, 0, 0, 128)).save(root / "rgba.png")
    Image.new("P", (96, 96), 3).save(root / "palette.png")  # no caption file either
    for name in ("cmyk", "rgba"):
        (root / f"{name}.txt").write_text("a colour")
    full = (DEMO / "train/00000.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.webp").write_text("this is not an image")
    return ["truncated.png", "empty.jpg", "notes.webp"]


def test_messy_folder_trains_and_names_bad_files(tmp_path):
    bad = make_messy_folder(tmp_path / "messy")
    run = run_train(tmp_path, "--data_dir", str(tmp_path / "messy"), "--max_train_steps", "3", "--batch_size", "4",
                    "--max_bad_fraction", "0.3", "--validation_interval", "0", "--save_interval", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    for name in bad:
        assert name in run.stderr, name
    assert "palette.png" in run.stderr  # named for its missing caption
    assert "bad_files 3" in run.stdout


def test_too_many_bad_files_and_bad_flags_stop_early(tmp_path):
    make_messy_folder(tmp_path / "messy")
    run = run_train(tmp_path, "--data_dir", str(tmp_path / "messy"))
    assert run.returncode == 2 and "truncated.png" in run.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    run = run_train(tmp_path, "--learning_rate", "-1")
    assert run.returncode == 2 and "learning_rate" in run.stderr and run.stderr.count("\n") == 1


def test_lr_schedule():
    assert [round(lr_multiplier(s, 4, 12, "constant"), 3) for s in (0, 3, 4, 11)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_multiplier(4, 4, 12, "cosine") == 1.0 and abs(lr_multiplier(12, 4, 12, "cosine")) < 1e-12
    assert lr_multiplier(8, 4, 12, "linear") == 0.5


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", 0.0), ("v_prediction", 5.0)])
def test_training_step_matches_diffusers_with_peft(tiny_dir, prediction_type, gamma):
    """Loss and every LoRA gradient of one step: ours vs diffusers' UNet + peft LoRA, same A/B and inputs.
    fp32; loss rel < 1e-5, gradients rel < 1e-4 (summation order only; measured ~1e-7)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    ours = load_unet("tiny")
    wrapped = apply_lora(ours, LoRAConfig(rank=4, alpha=2.0, target_mode="attention_out"))
    for m in wrapped.values():  # non-zero B so that the LoRA changes the output and gets full gradients
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    ref = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet", local_files_only=True)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=list(wrapped), init_lora_weights=False))
    ref_modules = dict(ref.named_modules())
    for name, m in wrapped.items():
        ref_modules[name].lora_A["default"].weight.data.copy_(m.lora_down.weight)
        ref_modules[name].lora_B["default"].weight.data.copy_(m.lora_up.weight)

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    embeds, pooled = torch.randn(2, 77, 96, generator=g), torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[64, 96, 0, 0, 64, 96], [80, 100, 4, 2, 64, 96]], dtype=torch.float32)
    t = torch.tensor([50, 700])

    class Wrap(torch.nn.Module):  # diffusers' UNet called like ours
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, ctx, cond):
            return self.unet(x, t, ctx, added_cond_kwargs=cond).sample

    losses = {}
    for name, unet in (("ours", ours), ("ref", Wrap(ref))):
        objective = DDPMObjective(alphas_cumprod(), prediction_type=prediction_type, min_snr_gamma=gamma,
                                  loss_weighting="min_snr" if gamma else "none")
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        loss = weighted(diffusion_loss(lambda x_t, t, unet=unet, cond=cond: unet(x_t, t, embeds, cond), objective,
                                       x0, t, noise), objective, t).mean()
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["ours"] - losses["ref"]) / losses["ref"] < 1e-5
    for name, m in lora_modules(ours).items():
        for ours_w, ref_w in ((m.lora_down.weight, ref_modules[name].lora_A["default"].weight),
                              (m.lora_up.weight, ref_modules[name].lora_B["default"].weight)):
            err = (ours_w.grad - ref_w.grad).norm() / ref_w.grad.norm()
            assert err < 1e-4, name


@pytest.mark.parametrize("name", ["tiny_demo", "sdxl_lora_512_12gb", "sdxl_lora_1024_24gb", "sdxl_lora_128px",
                                  "sdxl_lora_128px_small_data"])
def test_presets_parse(name):
    from training.config import parse_config

    args = parse_config(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--data_dir", str(DEMO / "train")])
    assert args.image_size % 64 == 0 and args.lora_rank >= 1


def test_trains_on_webdataset_shards(tmp_path):
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted((DEMO / "train").iterdir())
    for s in range(2):
        with tarfile.open(shards / f"data-{s:03d}.tar", "w") as tar:
            for f in files[s * 12 : s * 12 + 12]:
                tar.add(f, arcname=f"sample{f.stem}{f.suffix}")
    common = ["--data_dir", str(shards), "--validation_interval", "0", "--save_interval", "0", "--val_data_dir", ""]
    run = run_train(tmp_path, *common, "--max_train_steps", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "out") if "loss" in m] == [1, 2, 3]
    assert "on 2 .tar shards (samples unknown until streamed), 3 steps of 16 images" in run.stdout


def test_caches_hit_and_rebuild_bad_entries(tmp_path, caplog):
    from training.loop.caching import LatentCache, TextEmbeddingCache

    calls = []

    class FakeVAE:
        def encode(self, pixels, sample=False):
            calls.append(len(pixels))
            return pixels[:, :4, ::8, ::8] * 2

    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    batch = {"pixel_values": pixels, "keys": ["s/a", "s/b", "s/c"]}  # streamed samples: keyed by their pixels
    cache = LatentCache("disk", tmp_path, "model-a")
    first = cache.get(batch, FakeVAE(), "cpu")
    again = LatentCache("disk", tmp_path, "model-a").get(batch, FakeVAE(), "cpu")  # a new run: read from disk
    assert torch.equal(first, again) and calls == [3]
    files = sorted((tmp_path / "latents").glob("*.safetensors"))
    assert len(files) == 3
    files[0].write_bytes(files[0].read_bytes()[:20])  # truncated entry: rebuilt with a warning
    with caplog.at_level("WARNING"):
        rebuilt = LatentCache("disk", tmp_path, "model-a").get(batch, FakeVAE(), "cpu")
    assert torch.equal(rebuilt, first) and calls == [3, 1] and "unusable" in caplog.text
    LatentCache("disk", tmp_path, "model-b").get(batch, FakeVAE(), "cpu")  # another model never hits model-a's
    assert calls == [3, 1, 3]

    class FakeText:
        def encode(self, captions):
            calls.append(captions)
            return torch.ones(len(captions), 77, 8), torch.ones(len(captions), 4)

    texts = TextEmbeddingCache("disk", tmp_path, "model-a")
    texts.get(["a", "b"], FakeText())
    embeds, pooled = texts.get(["b", "c"], FakeText())
    assert calls[-1] == ["c"] and embeds.shape == (2, 77, 8) and pooled.shape == (2, 4)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    run = run_train(tmp_path, "--learning_rate", "1e12", "--max_grad_norm", "0", "--max_nonfinite_steps", "3",
                    "--max_train_steps", "40", "--validation_interval", "0", "--save_interval", "0",
                    "--val_data_dir", "")
    assert run.returncode == 1
    assert "non-finite loss or gradient, step skipped" in run.stdout + run.stderr
    assert "3 non-finite steps in a row at step" in run.stderr.splitlines()[-1]
    assert not (tmp_path / "out" / "lora_final.safetensors").exists()


def test_cached_latents_with_random_flips_cache_both_flips(tmp_path):
    """With center crops, an image has exactly two pixel variants (flipped or not): `fill` encodes both, in fixed
    batches, before the first step; then no epoch runs the VAE or decodes an image, and every batch's latents
    are the ones its images (mirrored where flipped) encode to."""
    from training.data.datasets import build_dataset
    from training.data.images import to_unit
    from training.loop.caching import LatentCache

    encoded = []

    class FakeVAE:
        def encode(self, pixels, sample=False):
            encoded.append(len(pixels))
            return pixels[:, :4, ::8, ::8]

    data = build_dataset(DEMO / "train", resolution=64, batch_size=4, center_crop=True, random_flip=True)
    cache = LatentCache("memory", tmp_path, "m")
    cache.fill(data, FakeVAE(), "cpu")
    assert sum(encoded) == 2 * 36 and max(encoded) <= 16 and not data.decode
    seen = set()
    for epoch in range(3):
        for batch in data.iter_epoch(epoch):
            assert "pixel_values" not in batch  # nothing decoded
            cache.get(batch, FakeVAE(), "cpu")
            seen |= set(zip(batch["keys"], batch["flipped"].tolist(), strict=True))
    assert sum(encoded) == 2 * 36 and len(seen) > 36  # both flips seen, none encoded again
    data.decode = True  # a batch with its pixels (mirrored where flipped): the cache holds exactly their latents
    batch = next(data.iter_epoch(5))
    assert batch["flipped"].any() and not batch["flipped"].all()
    assert torch.equal(cache.get(batch, FakeVAE(), "cpu"), to_unit(batch["pixel_values"])[:, :4, ::8, ::8])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trains_on_cuda_in_half_precision(tmp_path, precision):
    """bf16 autocast, and fp16 with its GradScaler, over the frozen base: finite losses, LoRA weights saved."""
    run = run_train(tmp_path, "--device", "cuda", "--precision", precision, "--max_train_steps", "4",
                    "--gradient_checkpointing", "--validation_interval", "0", "--save_interval", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(tmp_path / "out") if "loss" in m]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(m["peak_mem_mib"] > 0 for m in read_metrics(tmp_path / "out") if "loss" in m)


def test_a_step_is_the_same_however_its_images_are_cut_into_micro_batches(tmp_path):
    """36 images at 64 px (one bucket), 4 images per step: batch 4 without accumulation and batch 1 with
    accumulation 4 train the same images in the same steps, each image with the same noise and time (its own key),
    so their losses and gradient norms agree up to the order of sums; every step is whole (9 per epoch)."""
    flags = ["--image_size", "64", "--lr_scheduler", "constant", "--warmup_steps", "0", "--learning_rate", "1e-3",
             "--validation_prompts", "--val_data_dir", "", "--save_interval", "0", "--max_train_steps", "3"]
    runs = {}
    for batch, accumulation in ((4, 1), (1, 4)):
        out = tmp_path / f"b{batch}a{accumulation}"
        run = run_train(out, *flags, "--batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation))
        assert run.returncode == 0, run.stderr[-3000:]
        runs[batch] = [m for m in read_metrics(out / "out") if "loss" in m]
    assert [m["step"] for m in runs[4]] == [m["step"] for m in runs[1]] == [1, 2, 3]
    for whole, cut in zip(runs[4], runs[1], strict=True):  # fp32, summation order only: measured ~1e-7
        assert abs(whole["loss"] - cut["loss"]) <= 1e-5 * whole["loss"]
        assert abs(whole["grad_norm"] - cut["grad_norm"]) <= 1e-4 * whole["grad_norm"]


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory) -> Path:
    """A small random TorchScript network standing in for the Inception-v3 file (tests/test_evaluate.py)."""
    from tests.test_evaluate import RandomFeatureNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("net") / "inception-2015-12-05.pt"
    torch.jit.script(RandomFeatureNet().eval()).save(str(path))
    return path


def test_scores_during_training_and_the_best_checkpoint(tmp_path, feature_net):
    """--eval_interval logs KID (same numbers as evaluation.score_images) at steps 0, 3 and the last; --keep_best kid
    keeps checkpoints/best at the step of the lowest KID, and lora_best.safetensors holds its (EMA) weights."""
    run = run_train(tmp_path, "--image_size", "64", "--max_train_steps", "5", "--eval_interval", "3",
                    "--eval_num_images", "4", "--keep_best", "kid", "--inception_weights", str(feature_net),
                    "--use_ema", "--save_interval", "0", "--validation_interval", "0", "--val_data_dir", "")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    scores = {m["step"]: m["kid_mean"] for m in read_metrics(out) if "kid_mean" in m}
    assert list(scores) == [0, 3, 5]
    best_step = min(scores, key=scores.get)
    best = out / "checkpoints" / "best"
    assert (best / "COMPLETE").is_file()
    state = torch.load(best / "training_state.pt", weights_only=True)
    assert state["step"] == best_step and state["best_step"] == best_step
    from safetensors import safe_open

    with safe_open(str(out / "lora_best.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["sdxl_lora.best_metric"] == "kid" and float(meta["sdxl_lora.best_score"]) == scores[best_step]
    assert meta["sdxl_lora.best_step"] == str(best_step) and meta["sdxl_lora.weights"] == "ema"
    from sdxl.configs import unet_config_to_diffusers
    from sdxl.lora import read_lora_file
    from sdxl.tiny import TINY_UNET_CONFIG

    entries, _ = read_lora_file(out / "lora_best.safetensors", unet_config_to_diffusers(TINY_UNET_CONFIG))
    ema = load_file(best / "ema.safetensors")  # the best step's EMA weights, exactly (fp32 kohya file)
    assert len(entries) == len(ema) // 2 > 0
    for name, (down, up, _) in entries.items():
        assert torch.equal(down, ema[f"unet.{name}.lora_A.weight"])
        assert torch.equal(up, ema[f"unet.{name}.lora_B.weight"])
