"""Silent failures found by fault injection (issue: faults-integrity), each now said in one line or a note: LoRA files
with NaN/Inf values (item 10), links out of the data folder (11), flipped bytes in a checkpoint (12), a full disk
while writing lora_final.safetensors (13), and what was cut or left behind without a word (14). Real files and real
processes; the full disk is a real small tmpfs in a user namespace where the machine allows one."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import extract_lora_weights
import families
import generate_images
from common.errors import CheckpointError
from lora.layer import LoRAConfig, lora_parameters, lora_state_dict
from lora.reading import read_lora
from sdxl.lora import apply_lora, load_lora, read_lora_file, save_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXLUNet
from training.run.checkpoints import MARKER, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--config", str(ROOT / "configs/tiny_demo.yaml"), "--image_size", "64", "--batch_size", "4",
         "--validation_prompts", "--val_data_dir", "", "--log_interval", "1"]
GENERATE = ["--pretrained-model", "tiny", "--image-size", "64", "--num-inference-steps", "1", "--batch-size", "2",
            "--scheduler", "euler"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}, "OMP_NUM_THREADS": "1"}
CONFIG = LoRAConfig(rank=4, alpha=2.0, dropout=0.0, target_mode="attention")


def tiny_unet() -> SDXLUNet:
    torch.manual_seed(0)
    return SDXLUNet(TINY_UNET_CONFIG).eval()


def trained_lora(seed: int = 1) -> dict[str, torch.Tensor]:
    unet = tiny_unet()
    apply_lora(unet, CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet


def one_line_error(err: str) -> str:
    line = err[err.index("error: "):]  # after any progress bar
    assert line.count("\n") == 1 and "Traceback" not in err, err
    return line


# --- Item 10: a LoRA with NaN or Inf values is refused by every reader, naming the key. ---------------------------


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Damaged LoRA files of the tiny model: name -> (file, the key the error must name)."""
    folder = tmp_path_factory.mktemp("loras")
    unet = trained_lora()
    good = save_lora(unet, folder / "good.safetensors", CONFIG)
    tensors = load_file(good)
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    ups = sorted(k for k in tensors if k.endswith(".lora_up.weight"))
    downs = sorted(k for k in tensors if k.endswith(".lora_down.weight"))
    alphas = sorted(k for k in tensors if k.endswith(".alpha"))
    cases = {}

    def damaged(name: str, key: str, change, meta=metadata, source=tensors):
        t = {k: v.clone() for k, v in source.items()}
        change(t[key]) if key in t else None
        save_file(t, folder / f"{name}.safetensors", metadata=meta)
        cases[name] = (folder / f"{name}.safetensors", key)

    damaged("one_nan", ups[3], lambda t: t.view(-1)[5].fill_(float("nan")))
    damaged("inf_layer", downs[1], lambda t: t.fill_(float("inf")))
    damaged("nan_alpha", alphas[0], lambda t: t.fill_(float("nan")))
    diffusers = save_lora(unet, folder / "diffusers.safetensors", CONFIG, format="diffusers")
    with safe_open(str(diffusers), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"]) | {"unet.lora_alpha": float("nan")}
    damaged("nan_lora_alpha", "lora_adapter_metadata", lambda t: None, {**meta, "lora_adapter_metadata":
            json.dumps(config)}, load_file(diffusers))
    return cases


@pytest.mark.parametrize("case", ["one_nan", "inf_layer", "nan_alpha", "nan_lora_alpha"])
def test_a_lora_with_nan_or_inf_is_refused_by_every_reader(lora_files, case, capsys):
    path, key = lora_files[case]
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    readers = {"load_lora": lambda: load_lora(unet, path), "read_lora_file": lambda: read_lora_file(path, "tiny"),
               "read_lora": lambda: read_lora(path, families.lora_names()),
               "families.read_lora": lambda: families.read_lora(path, "tiny")}
    expected = "alpha of key" if case == "nan_lora_alpha" else f"key {key} holds"
    for name, read in readers.items():
        with pytest.raises(ValueError) as e:
            read()
        message = str(e.value)
        assert str(path) in message and expected in message and "\n" not in message, (name, message)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # nothing merged
    capsys.readouterr()
    out = path.with_name(f"{case}_converted.safetensors")
    assert extract_lora_weights.main([str(path), "-o", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(path) in line and expected in line and not out.exists(), line


def test_the_messages_count_what_is_not_finite(lora_files):
    path, key = lora_files["one_nan"]
    with pytest.raises(ValueError, match=rf"key {key} holds 1 NaN value \(of \d+\); the LoRA is damaged"):
        read_lora_file(path, "tiny")
    path, key = lora_files["inf_layer"]
    with pytest.raises(ValueError, match=rf"key {key} holds (\d+) Inf values \(of \1\)"):
        read_lora_file(path, "tiny")


def test_generate_images_refuses_a_nan_lora_with_exit_2(lora_files, tmp_path, capsys):
    path, key = lora_files["one_nan"]
    out = tmp_path / "images"
    status = generate_images.main([*GENERATE, "--prompt", "a red circle", "--num-images", "1", "--lora-checkpoint",
                                   str(path), "--output-dir", str(out)])
    line = one_line_error(capsys.readouterr().err)
    assert status == 2 and f"key {key} holds 1 NaN value" in line, line
    assert not list(out.glob("*.png")) if out.exists() else True


def test_a_pt_lora_and_a_checkpoint_with_nan_are_refused(tmp_path, capsys):
    sd = lora_state_dict(trained_lora())
    key = sorted(sd)[2]
    sd[key].view(-1)[0] = float("inf")
    torch.save(sd, tmp_path / "old.pt")
    assert extract_lora_weights.main([str(tmp_path / "old.pt"), "-o", str(tmp_path / "x.safetensors")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"old.pt: key {key} holds 1 Inf value" in line, line
    # a checkpoint written before checksums (COMPLETE without them) whose LoRA file was damaged on disk
    state = {"step": 1, "epoch": 0, "position": 1, "micro_step": 1, "last_loss": 0.5}
    folder = save_checkpoint(tmp_path / "run", 1, lora_state_dict(trained_lora()), state, "pretrained_model: tiny\n",
                             CONFIG)
    (folder / MARKER).write_text("schema_version: 2\nstep: 1\n")
    tensors = load_file(folder / "lora.safetensors")
    with safe_open(str(folder / "lora.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    name = sorted(tensors)[0]
    tensors[name].view(-1)[1] = float("nan")
    save_file(tensors, folder / "lora.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"lora.safetensors: key {name} holds 1 NaN"):
        load_checkpoint(folder)
    assert extract_lora_weights.main([str(folder), "-o", str(tmp_path / "y.safetensors")]) == 2
    assert f"key {name} holds 1 NaN value" in one_line_error(capsys.readouterr().err)
