"""configs/sdxl_lora_128px_small_data.yaml runs as written (only the model, the data, the device and the run's length
given) on the tiny model with 2 CPU processes (gloo): 2 x batch 4 x accumulation 4 = 32 images per step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_distributed import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_small_data_preset_runs_on_two_processes(tmp_path, tiny_dir):  # tiny_dir: built before the 2 ranks start
    classes = tmp_path / "classes.yaml"  # the demo images twice over, as two "classes" with their own trigger words
    classes.write_text(yaml.safe_dump({"subsets": [
        {"image_dir": str(ROOT / "data/demo/train"), "num_repeats": 1, "caption_prefix": "class_a,"},
        {"image_dir": str(ROOT / "data/demo/train"), "num_repeats": 1, "caption_prefix": "class_b,"}]}))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "train_sdxl.py",
                          "--config", "configs/sdxl_lora_128px_small_data.yaml", "--dataset_config", str(classes),
                          "--pretrained_model", "tiny", "--device", "cpu", "--output_dir", str(out),
                          "--max_train_steps", "2"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 72 images, 2 steps" in run.stdout and "2 processes" in run.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["batch_size"] * saved["gradient_accumulation_steps"] * 2 == 32
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all(s["loss"] > 0 for s in steps if "loss" in s)
    assert (out / "lora_final.safetensors").is_file() and (out / "checkpoints/step_000002/COMPLETE").is_file()
