"""Exact resume, end to end in subprocesses (docs/ARCHITECTURE.md, "Seeds"): a run stopped by SIGTERM, resumed, stopped
by SIGINT, resumed again, equals a run that was never stopped, bit for bit (CPU, tiny model)."""

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import CheckpointError
from training.run.checkpoints import find_latest, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24  # 36 images, batch 2, accumulation 2: 9 optimizer steps per epoch, so the run crosses two epochs
FLAGS = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--image_size", "64", "--batch_size", "2",
         "--gradient_accumulation_steps", "2", "--max_train_steps", str(STEPS), "--lr_scheduler", "cosine",
         "--warmup_steps", "3", "--random_flip", "--caption_dropout", "0.2", "--noise_offset", "0.05",
         "--lora_dropout", "0.1", "--use_ema", "--bucketing", "--validation_prompts", "--val_data_dir", "",
         "--save_interval", "100", "--log_interval", "1"]


def command(out: Path, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "train_sdxl.py"), *FLAGS, "--output_dir", str(out), *extra]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats or reorders steps"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def stop_after(cmd: list[str], out: Path, at_least: int, signum: int, twice: bool = False) -> tuple[int, str]:
    """Run `cmd`, send `signum` once `at_least` new steps are logged; return (exit code, stderr)."""
    before = logged_steps(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while logged_steps(out) < before + at_least and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    if twice:  # a second signal while the step finishes / the checkpoint is written
        time.sleep(0.05)
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def optimizer_tensors(checkpoint: Path) -> list[torch.Tensor]:
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    return [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]


@pytest.fixture(scope="module")
def scoring(tmp_path_factory) -> list[str]:
    """Scores during training and the best checkpoint, on a stand-in Inception file (tests/test_evaluate.py)."""
    from tests.test_evaluate import RandomFeatureNet

    torch.manual_seed(0)
    net = tmp_path_factory.mktemp("net") / "inception-2015-12-05.pt"
    torch.jit.script(RandomFeatureNet().eval()).save(str(net))
    return ["--validation_prompts", "a red circle on a white background", "--validation_interval", "0",
            "--num_validation_images", "1", "--eval_interval", "5", "--eval_num_images", "2", "--keep_best", "kid",
            "--inception_weights", str(net)]


def scores(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["kid_mean"] for r in records if "kid_mean" in r}


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, scoring):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run = subprocess.run(command(full, *scoring), capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]

    code, err = stop_after(command(cut, *scoring), cut, 3, signal.SIGTERM, twice=True)
    assert code == 143, err[-3000:]
    first = sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(first) == 1 and first[0] < f"step_{STEPS:06d}" and first[0] in err  # path printed
    code, err = stop_after(command(cut, *scoring, "--resume_from", "latest"), cut, 6, signal.SIGINT)
    assert code == 130, err[-3000:]
    run = subprocess.run(command(cut, *scoring, "--resume_from", "latest"), capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from" in run.stdout

    assert losses(cut) == losses(full)  # every step's loss, bit for bit
    assert list(losses(full)) == list(range(1, STEPS + 1))
    assert scores(cut) == scores(full) and list(scores(full)) == [0, 5, 10, 15, 20, 24]
    for name in ("lora_final.safetensors", f"checkpoints/step_{STEPS:06d}/lora.safetensors",
                 f"checkpoints/step_{STEPS:06d}/ema.safetensors", "checkpoints/best/ema.safetensors",
                 "lora_best.safetensors"):
        a, b = load_file(full / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    last = f"checkpoints/step_{STEPS:06d}"
    a, b = optimizer_tensors(full / last), optimizer_tensors(cut / last)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_refuses_changed_settings_and_fresh_runs_keep_old_outputs(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(command(out, "--max_train_steps", "2"), capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    before = (out / "lora_final.safetensors").read_bytes()

    run = subprocess.run(command(out, "--resume_from", "latest", "--lora_rank", "4", "--seed", "3"),
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "lora_rank: checkpoint 8, now 4" in run.stderr and "seed: checkpoint 0, now 3" in run.stderr

    run = subprocess.run(command(out, "--max_train_steps", "2"), capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "--overwrite_output_dir" in run.stderr and run.stderr.count("\n") == 1
    assert (out / "lora_final.safetensors").read_bytes() == before  # nothing lost

    # a longer run continues the finished one (--max_train_steps may change)
    run = subprocess.run(command(out, "--resume_from", "latest", "--max_train_steps", "3"),
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(losses(out)) == [1, 2, 3]

    run = subprocess.run(command(out, "--max_train_steps", "1", "--overwrite_output_dir"),
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(losses(out)) == [1] and [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "out"
    run = subprocess.run(command(out, "--max_train_steps", "2", "--save_interval", "1"), capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


class Evil:
    """A pickle whose loading would create a file."""

    def __init__(self, witness: Path):
        self.witness = str(witness)

    def __reduce__(self):
        return (open, (self.witness, "w"))


def damage(folder: Path, how: str, witness: Path) -> None:
    if how == "truncated_state":
        data = (folder / "training_state.pt").read_bytes()
        (folder / "training_state.pt").write_bytes(data[: len(data) // 2])
    elif how == "malicious_state":
        (folder / "training_state.pt").write_bytes(pickle.dumps(Evil(witness)))
    elif how == "truncated_lora":
        (folder / "lora.safetensors").write_bytes((folder / "lora.safetensors").read_bytes()[:100])
    elif how == "no_marker":
        (folder / "COMPLETE").unlink()
    elif how == "no_state":
        (folder / "training_state.pt").unlink()


@pytest.mark.parametrize("how", ["truncated_state", "malicious_state", "truncated_lora", "no_marker", "no_state"])
def test_damaged_checkpoint_is_a_clear_error_and_latest_falls_back(two_checkpoints, tmp_path, how):
    out, witness = tmp_path / "out", tmp_path / "pwned"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints/step_000002"
    damage(newest, how, witness)
    with pytest.raises(CheckpointError, match=str(newest)) as error:
        load_checkpoint(newest)
    assert "\n" not in str(error.value)
    assert find_latest(out).path.name == "step_000001"
    assert not witness.exists()


def test_resume_from_a_malicious_checkpoint_exits_2_then_latest_continues(two_checkpoints, tmp_path):
    out, witness = tmp_path / "out", tmp_path / "pwned"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints/step_000002"
    damage(newest, "malicious_state", witness)
    run = subprocess.run(command(out, "--resume_from", str(newest)), capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and str(newest) in run.stderr, run.stderr
    assert not witness.exists()
    run = subprocess.run(command(out, "--resume_from", "latest", "--max_train_steps", "2", "--save_interval", "1"),
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from" in run.stdout and "step_000001" in run.stdout
    assert torch.load(newest / "training_state.pt", weights_only=True)["step"] == 2  # replaced by a good one
    assert not witness.exists()


@pytest.mark.parametrize("optimizer", [pytest.param("prodigy", marks=pytest.mark.slow), "adamw_schedulefree",
                                       pytest.param("adafactor", marks=pytest.mark.slow),
                                       pytest.param("adamw8bit", marks=pytest.mark.gpu)])
def test_each_optimizer_resumes_exactly(tmp_path, optimizer):
    """3 steps, then resumed to 6, == 6 steps in one go: losses, LoRA and optimizer state bit for bit; with the
    timestep, noise and weighting recipes on. Schedule-free's resumed run went through eval mode at step 3."""
    flags = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
             "--batch_size", "4", "--gradient_accumulation_steps", "2", "--warmup_steps", "2", "--random_flip",
             "--optimizer", optimizer, "--timestep_sampling", "logit_normal", "--loss_weighting", "debiased",
             "--multires_noise_iterations", "3", "--input_perturbation", "0.05", "--validation_prompts",
             "--val_data_dir", "", "--save_interval", "100"]
    if optimizer == "adamw8bit":
        flags += ["--device", "cuda", "--learning_rate", "1e-3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for out, steps, resume in ((full, 6, []), (cut, 3, []), (cut, 6, ["--resume_from", "latest"])):
        run = subprocess.run([*flags, "--output_dir", str(out), "--max_train_steps", str(steps), *resume],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming from" in run.stdout
    assert losses(cut) == losses(full) and list(losses(full)) == list(range(1, 7))
    for name in ("lora_final.safetensors", "checkpoints/step_000006/lora.safetensors"):
        a, b = load_file(full / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = optimizer_tensors(full / "checkpoints/step_000006"), optimizer_tensors(cut / "checkpoints/step_000006")
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_checkpoint_of_the_per_process_plan_is_refused_in_one_line_and_keeps_its_lora(tmp_path):
    """tests/data/checkpoint_before_families: step 2 of a 4-step run (rank-1 attention LoRA on the tiny model,
    data/demo/train at 64 px, batch 4) written by the trainer before model families, typed settings and the
    per-step batch plan existed (schema 2: batches planned per process, noise drawn per micro-batch). Continuing it
    with today's plan would change the run, so resuming is refused in one line saying what to do; its LoRA still
    extracts (the same tensors as its lora.safetensors)."""
    fixture = ROOT / "tests/data/checkpoint_before_families"
    out = tmp_path / "run"
    shutil.copytree(fixture / "step_000002", out / "checkpoints/step_000002")
    config = out / "checkpoints/step_000002/config.yaml"  # the run's folders as on this machine (a moved run)
    text = config.read_text()
    for key, value in (("data_dir", ROOT / "data/demo/train"), ("output_dir", out), ("cache_dir", out / "cache")):
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines())
    config.write_text(text + "\n")
    done = subprocess.run([sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(config), "--resume_from",
                           "latest"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "cannot resume" in done.stderr and "extract_lora_weights.py" in done.stderr
    assert not (out / "lora_final.safetensors").exists()
    extracted = subprocess.run([sys.executable, str(ROOT / "extract_lora_weights.py"),
                                str(out / "checkpoints/step_000002"), "-o", str(tmp_path / "lora.safetensors"),
                                "--format", "diffusers"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert extracted.returncode == 0, extracted.stderr
    ours, theirs = load_file(tmp_path / "lora.safetensors"), load_file(fixture / "step_000002/lora.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours if ".lora_A." in k)
