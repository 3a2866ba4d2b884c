"""--shard_base (training/loop/shard.py): the frozen base sharded across torchrun processes by FSDP2, the LoRA whole
on each. 2 gloo processes on CPU with batch 2 train what 1 process with batch 4 trains (tiny-flux, the base stored
in fp8, DoRA on every linear, gradient checkpointing: recomputation re-gathers each block), validation loss and
sample grid included; a sharded run stopped at step 2 resumes on 1 process, unsharded, and ends where the
uninterrupted run ends.

Tolerances: fp32 compute; only the order of sums differs (all-reduce of two half-batch means vs one mean), so
losses within 1e-5 relative (measured ~1e-7) and the LoRA within 1e-3 relative (Adam's 1/sqrt(v) amplifies
rounding; as tests/test_distributed.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_distributed import free_port, lora_error

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--pretrained_model", "tiny-flux", "--data_dir", str(ROOT / "data/demo/train"), "--image_size", "64",
         "--device", "cpu", "--num_workers", "0", "--log_interval", "1", "--learning_rate", "1e-3",
         "--base_dtype", "fp8", "--use_dora", "--lora_target_mode", "all", "--gradient_checkpointing",
         "--val_data_dir", str(ROOT / "data/demo/val"), "--validation_interval", "2", "--validation_prompts",
         "a red circle", "--num_validation_images", "1", "--save_interval", "2"]


def train(out: Path, processes: int, batch: int, steps: int, *extra) -> str:
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
        "127.0.0.1", "--master_port", str(free_port())]
    done = subprocess.run([*launch, "train_flux.py", *FLAGS, "--batch_size", str(batch), "--max_train_steps",
                           str(steps), "--output_dir", str(out), *extra], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def metric(out: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_a_sharded_base_trains_the_same_run_and_resumes_unsharded(tmp_path):
    one, two, stopped = tmp_path / "one", tmp_path / "two", tmp_path / "stopped"
    train(one, 1, 4, 4)
    log = train(two, 2, 2, 4, "--shard_base")
    assert "--shard_base: the frozen base" in log and "sharded across 2 processes" in log
    assert log.count("done: steps 4") == 1  # rank 0 reports
    print(f"losses: 1 process {metric(one, 'loss')}, 2 sharded {metric(two, 'loss')}; "
          f"LoRA vs 1 process {lora_error(one, two):.1e}")
    assert close(metric(one, "loss"), metric(two, "loss"))
    assert close(metric(one, "val_loss"), metric(two, "val_loss")) and len(metric(two, "val_loss")) == 3
    assert lora_error(one, two) < 1e-3
    for name in ("step_000002.png", "step_000004.png"):  # every rank sampled, rank 0 wrote
        a, b = (np.asarray(Image.open(run / "samples" / name), dtype=np.int16) for run in (one, two))
        assert np.abs(a - b).max() <= 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_000002", "step_000004"]

    train(stopped, 2, 2, 2, "--shard_base")
    train(stopped, 1, 4, 4, "--resume_from", "latest")  # the checkpoint holds the whole LoRA: resumes unsharded
    print(f"stopped sharded at 2, resumed on 1: losses {metric(stopped, 'loss')}, "
          f"LoRA vs 1 process {lora_error(one, stopped):.1e}")
    assert close(metric(one, "loss"), metric(stopped, "loss"))
    assert lora_error(one, stopped) < 1e-3
    back = tmp_path / "back"
    train(back, 1, 4, 2)
    train(back, 2, 2, 4, "--shard_base", "--resume_from", "latest")  # and an unsharded run resumes sharded
    assert close(metric(one, "loss"), metric(back, "loss")) and lora_error(one, back) < 1e-3
