"""metrics.jsonl, and W&B in offline mode (no account, no network): MetricsLog alone and a short training run."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from training.run.metrics import MetricsLog

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """WANDB_MODE=offline with every folder W&B writes to (cache, config, data, home) inside tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_dir",
           "WANDB_CACHE_DIR": home / ".cache", "WANDB_CONFIG_DIR": home / ".config", "WANDB_DATA_DIR": home / "data",
           "HOME": home, "XDG_CACHE_HOME": home / ".cache", "XDG_CONFIG_HOME": home / ".config"}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    for key in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)


def offline_run_file(output_dir: Path) -> Path:
    runs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0, files
    return files[0]


def logged_rows(output_dir: Path, steps, timeout: float = 60.0) -> dict[int, dict]:
    """The rows of the run's .wandb file once it holds every step in `steps`: W&B's writer is a background
    process that may still be appending after `finish()` returns, so poll (a row that never arrives fails)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = history_rows(offline_run_file(output_dir))
        if set(steps) <= set(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def history_rows(run_file: Path) -> dict[int, dict]:
    """The logged rows of a .wandb file, by step. The file is a LevelDB-style log of protobuf Records
    (7-byte file header `:W&B` + magic + version; 32 KiB blocks; records with a 7-byte header: crc32,
    length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), the format `wandb sync` reads."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, chunk, block = {}, 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.setdefault(items["_step"], {}).update(items)
    return rows


def test_jsonl_one_line_per_record_appends_across_instances(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25, "lr": 1e-4})
    log.log_image(2, "samples", tmp_path / "absent.png")  # no W&B: nothing to do, and no error
    log.close()
    again = MetricsLog(tmp_path)  # e.g. a resumed run
    again.log({"step": 3, "val_loss": 0.75})
    again.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "lr": 1e-4}, {"step": 3, "val_loss": 0.75}]
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_logs_scalars_and_image(tmp_path, wandb_offline):
    out = tmp_path / "out"
    out.mkdir()
    image = tmp_path / "grid.png"
    Image.new("RGB", (16, 8), (255, 0, 0)).save(image)
    log = MetricsLog(out, wandb_project="test", wandb_run_name="r1", config={"lora_rank": 4, "data_dir": tmp_path})
    log.log({"step": 1, "loss": 0.5, "lr": 1e-4})
    log.log({"step": 2, "loss": 0.25, "lr": 2e-4})
    log.log_image(2, "samples", image)
    log.close()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    rows = logged_rows(out, [1, 2])
    assert rows[1]["loss"] == 0.5 and rows[2]["loss"] == 0.25 and rows[2]["lr"] == 2e-4
    assert rows[2]["samples/_type"] == "image-file" and (rows[2]["samples/width"], rows[2]["samples/height"]) == (16, 8)
    assert list(out.glob("wandb/offline-run-*/files/media/images/samples_2_*.png"))


def test_wandb_init_failure_is_an_actionable_error(tmp_path, wandb_offline, monkeypatch):
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(ValueError, match="--wandb_project test: .*No API key.*WANDB_MODE=offline"):
        MetricsLog(tmp_path, wandb_project="test")


def test_training_run_logs_to_wandb_offline(tmp_path, wandb_offline):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
           "--output_dir", str(out), "--max_train_steps", "2", "--save_interval", "0", "--validation_interval", "0",
           "--num_validation_images", "1", "--validation_prompts", "a red circle",
           "--wandb_project", "test", "--wandb_run_name", "r1"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = logged_rows(out, [0, 1, 2])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert {s: rows[s]["loss"] for s in (1, 2)} == losses  # W&B got the same numbers as metrics.jsonl
    assert "val_loss" in rows[0] and "samples/path" in rows[0] and "samples/path" in rows[2]
