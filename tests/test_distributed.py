"""Data-parallel training (docs/ARCHITECTURE.md, "Seeds"): 2 gloo processes under torchrun with batch_size 2
compute what one process with batch_size 4 computes: the same global batches, noise and timesteps, gradients
averaged over ranks by torch DDP (no_sync on the first of 2 micro-batches, gradient checkpointing on)."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--image_size", "64", "--gradient_accumulation_steps", "2",
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


def mixed_folder(root: Path) -> Path:
    """21 captioned images of four sizes: at 128 px, three aspect buckets of 10, 5 and 6 images (one odd)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(128, 128)] * 7 + [(256, 64)] * 5 + [(64, 256)] * 6 + [(160, 120)] * 3
    root.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h)).save(
            root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a picture number {i}")
    return root


MIXED = ["--pretrained_model", "tiny", "--image_size", "128", "--learning_rate", "1e-3", "--lora_rank", "4",
         "--validation_prompts", "--save_interval", "2", "--log_interval", "1", "--num_workers", "0", "--device", "cpu",
         "--precision", "fp32", "--noise_offset", "0.05", "--caption_dropout", "0.2", "--random_flip"]


def run(tmp_path, name, processes, batch, accumulation, steps, *extra):
    """train_sdxl.py on the mixed folder with `processes` gloo processes (torchrun when more than one)."""
    out = tmp_path / name
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                      str(processes), "--master_addr", "127.0.0.1", "--master_port",
                                                      str(free_port())]
    done = subprocess.run([*launch, "train_sdxl.py", *MIXED, "--data_dir", str(tmp_path / "mixed"), "--batch_size",
                           str(batch), "--gradient_accumulation_steps", str(accumulation), "--max_train_steps",
                           str(steps), "--output_dir", str(out), *extra], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def lora_error(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "lora_final.safetensors"), load_file(b / "lora_final.safetensors")
    assert wa.keys() == wb.keys()
    return max(((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa if wa[k].norm() > 0)


@pytest.mark.slow
def test_one_two_and_three_processes_train_the_same_run_and_resume_across_them(tmp_path):
    """A bucketed folder of mixed sizes (one bucket with an odd count), 6 images per step, cut as 1 process x
    batch 3 x accumulation 2, 2 processes x batch 3, and 3 processes x batch 1 x accumulation 2: the same images in
    the same steps, each with its own noise and time, so the same losses and LoRA up to float rounding. A 2-process
    run stopped at step 2 and resumed on 1 process and on 3 processes ends where the uninterrupted run ends; a
    resume that would change the images per step is refused in one line."""
    mixed_folder(tmp_path / "mixed")
    one = run(tmp_path, "one", 1, 3, 2, 4)
    two = run(tmp_path, "two", 2, 3, 1, 4)
    three = run(tmp_path, "three", 3, 1, 2, 4)
    reference = losses(one)
    for name, out in (("1 x batch 3 x accum 2", one), ("2 x batch 3", two), ("3 x batch 1 x accum 2", three)):
        print(f"{name:>22}: losses {[round(x, 6) for x in losses(out)]}, LoRA vs 1 process {lora_error(one, out):.1e}")
    for other in (two, three):  # fp32, sums in another order: measured within 1e-7 relative
        assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(reference, losses(other), strict=True))
        assert lora_error(one, other) < 1e-3  # Adam's 1/sqrt(v) amplifies rounding; measured ~1e-5..1e-4
    stopped = run(tmp_path, "stopped", 2, 3, 1, 2)
    for processes, batch, accumulation in ((1, 6, 1), (3, 1, 2)):
        resumed = tmp_path / f"resumed_on_{processes}"
        shutil.copytree(stopped, resumed)
        run(tmp_path, resumed.name, processes, batch, accumulation, 4, "--resume_from", "latest")
        print(f"stopped on 2, resumed on {processes}: losses {[round(x, 6) for x in losses(resumed)]}, LoRA vs 1 "
              f"process {lora_error(one, resumed):.1e}")
        assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(reference, losses(resumed), strict=True))
        assert lora_error(one, resumed) < 1e-3
    refused = subprocess.run([sys.executable, "train_sdxl.py", *MIXED, "--data_dir", str(tmp_path / "mixed"),
                              "--batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", "4",
                              "--output_dir", str(stopped), "--resume_from", "latest"], capture_output=True,
                             text=True, cwd=ROOT)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "images per optimizer step: checkpoint 6, now 4" in refused.stderr
