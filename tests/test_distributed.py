"""Data-parallel training (docs/ARCHITECTURE.md, "Seeds"): 2 gloo processes under torchrun with batch_size 2
compute what one process with batch_size 4 computes: the same global batches, noise and timesteps, gradients
averaged over ranks by torch DDP (no_sync on the first of 2 micro-batches, gradient checkpointing on)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--config", str(ROOT / "configs/tiny_demo.yaml"), "--image_size", "64", "--gradient_accumulation_steps", "2",
         "--max_train_steps", "3", "--learning_rate", "1e-3",
         "--gradient_checkpointing", "--noise_offset", "0.05", "--caption_dropout", "0.2",
         "--validation_prompts", "--val_data_dir", "", "--save_interval", "2", "--log_interval", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    one = subprocess.run([sys.executable, "train_sdxl.py", *FLAGS, "--batch_size", "4", "--output_dir",
                          str(tmp_path / "one")], capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "train_sdxl.py", *FLAGS, "--batch_size", "2",
                          "--output_dir", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout and two.stdout.count("done: steps 3") == 1  # rank 0 reports

    # fp32; only the order of sums differs (all-reduce of two half-batch means vs one mean): measured ~1e-8
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True))
    for name in ("lora_final.safetensors", "checkpoints/step_000002/lora.safetensors"):
        wa, wb = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert wa.keys() == wb.keys()
        # Adam divides by sqrt(v): rounding-level gradient differences stay small relative to the weights
        err = max(((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa if wa[k].norm() > 0)
        assert err < 1e-3, (name, err)
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step_000002", "step_000003"]
    trained = load_file(tmp_path / "two/lora_final.safetensors")
    assert all(trained[k].abs().sum() > 0 for k in trained if "lora_up" in k)  # every layer learned something
