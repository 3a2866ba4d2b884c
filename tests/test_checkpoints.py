"""Checkpoint folders: atomic writes, keep_last, disk errors, RNG states, settings checks (in-process, fast)."""

import errno
import json
import random

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import training.run.checkpoints as ck
from common.errors import WriteError
from lora.layer import LoRAConfig, lora_state_dict
from sdxl.loading import load_unet
from sdxl.lora import apply_lora, load_lora
from training.run.loop_state import capture_rng, restore_rng

CONFIG = LoRAConfig(rank=4, alpha=2.0, dropout=0.0, target_mode="attention")


@pytest.fixture(scope="module")
def lora():
    torch.manual_seed(0)
    unet = load_unet("tiny")
    for m in apply_lora(unet, CONFIG).values():
        torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    return lora_state_dict(unet)


def save(out, step, lora, **kw):
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}, "rng": capture_rng()}
    return ck.save_checkpoint(out, step, lora, state, "seed: 0\n", CONFIG, **kw)


def test_round_trip_is_exact_and_the_lora_file_loads_as_a_lora(tmp_path, lora):
    path = save(tmp_path, 7, lora, ema={k: v * 0.5 for k, v in lora.items()})
    assert path == tmp_path / "checkpoints/step_000007"
    got = ck.load_checkpoint(path)
    assert got.lora.keys() == lora.keys() and all(torch.equal(got.lora[k], lora[k]) for k in lora)
    assert all(torch.equal(got.ema[k], lora[k] * 0.5) for k in lora)
    assert got.state["step"] == 7 and got.state["schema_version"] == ck.SCHEMA_VERSION
    assert got.config == {"seed": 0} and got.lora_config == CONFIG
    # the folder is a LoRA too: its LoRA file is the EMA weights (as lora_final would be)
    a, b = load_unet("tiny"), load_unet("tiny")
    load_lora(a, ck.lora_file_of(path))
    load_lora(b, path / "ema.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000007"]  # no temp folders


def test_keep_last_and_incomplete_folders(tmp_path, lora):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, lora, keep_last=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    (tmp_path / "checkpoints/step_000009").mkdir()  # a save that never finished: no marker
    assert ck.find_latest(tmp_path).path.name == "step_000004"
    (tmp_path / "checkpoints/.step_000005.tmp-x").mkdir()  # left by a killed process: swept by the next save
    save(tmp_path, 5, lora)
    assert not (tmp_path / "checkpoints/.step_000005.tmp-x").exists()


def test_same_step_is_replaced_whole(tmp_path, lora):
    save(tmp_path, 3, lora)
    save(tmp_path, 3, {k: v + 1 for k, v in lora.items()})
    got = ck.load_checkpoint(tmp_path / "checkpoints/step_000003")
    assert all(torch.equal(got.lora[k], lora[k] + 1) for k in lora)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]


def test_non_finite_tensors_are_never_saved(tmp_path, lora):
    bad = dict(lora)
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(ck.CheckpointError, match=key):
        save(tmp_path, 1, bad)
    assert ck.complete_checkpoints(tmp_path) == []


FAILURES = {  # what each writer really raises on a full disk or a read-only folder
    "enospc": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "eacces": lambda: OSError(errno.EACCES, "Permission denied"),
    "torch": lambda: RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    "safetensors": lambda: SafetensorError("Error while serializing: IoError(No space left on device)"),
}


@pytest.mark.parametrize("error", list(FAILURES))
@pytest.mark.parametrize("writer", ["save_file", "torch_save"])
def test_disk_errors_leave_the_previous_checkpoint_intact(tmp_path, lora, monkeypatch, error, writer):
    save(tmp_path, 1, lora)

    def fail(*args, **kwargs):
        raise FAILURES[error]()

    if writer == "save_file":
        monkeypatch.setattr(ck, "save_file", fail)
    else:
        monkeypatch.setattr(ck.torch, "save", fail)
    with pytest.raises(WriteError) as e:
        save(tmp_path, 2, lora)
    message = f"{e.value}; {ck.what_is_intact(tmp_path)}"
    assert "step_000002" in message and "step_000001 is intact" in message and "\n" not in message
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]  # no temp folder left
    assert ck.find_latest(tmp_path).state["step"] == 1


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.randn(), torch.randn(1)  # mid-stream, with numpy's cached gaussian set
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(), np.random.randn(), torch.randn(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(), np.random.randn(), torch.randn(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_settings_differences_and_metrics_rewind(tmp_path):
    saved = {"lora_rank": 16, "lora_alpha": 16.0, "seed": 0, "data_dir": "/d"}
    now = ck.with_later_settings({}) | {"lora_rank": 8, "lora_alpha": 16, "seed": 0, "data_dir": "/d",
                                        "max_train_steps": 99}  # settings added later: at their defaults
    assert ck.settings_differences(saved, now) == ["lora_rank: checkpoint 16, now 8"]
    lines = [{"step": 0, "val_loss": 1.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    ck.rewind_metrics(tmp_path, 1)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:2]


def test_schema_1_checkpoints_are_upgraded_on_load(tmp_path, lora):
    """Version 1 (our own key names, no metadata, partial numpy/python RNG states) still resumes."""
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoints/step_000003"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, folder / "lora.safetensors")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
           "python": list(random.getstate()[1])}
    torch.save({"schema_version": 1, "step": 3, "rng": rng}, folder / "training_state.pt")
    (folder / "config.yaml").write_text("lora_rank: 4\nlora_alpha: 2.0\nlora_target_mode: attention\n")
    (folder / "COMPLETE").write_text("schema_version: 1\nstep: 3\n")
    got = ck.find_latest(tmp_path)
    assert got.state["schema_version"] == ck.SCHEMA_VERSION and got.lora_config == CONFIG
    assert all(torch.equal(got.lora[k], lora[k]) for k in lora)
    restore_rng(got.state["rng"])
    with pytest.raises(ValueError, match="extract_lora_weights.py"):
        ck.lora_file_of(folder)
