"""resume_training.py: --inspect, --find-latest, --auto [--execute], and its errors.

One short real run (tiny model, 64 px, 2 steps, a checkpoint after each, EMA on) is trained once per
module in a subprocess and copied where a test changes it. `--auto --execute` runs the printed command
for real: it continues the copied run to step 3 in the copy's folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import resume_training
from training.run.folder import human_size

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--image_size", "64", "--batch_size", "2",
         "--max_train_steps", "2", "--save_interval", "1", "--validation_prompts", "--val_data_dir", "",
         "--lora_rank", "4", "--lora_alpha", "2", "--lora_target_mode", "all", "--use_ema", "--ema_decay", "0.999",
         "--learning_rate", "0.02", "--lr_scheduler", "cosine", "--warmup_steps", "0", "--precision", "fp32",
         "--random_flip", "--bucketing", "--seed", "0", "--gradient_accumulation_steps", "1"]  # as test_inspect expects
# Tiny tensors: one intra-op thread is as fast, and on a busy machine several times faster.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_training") / "run"
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), *FLAGS, "--output_dir", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def main(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = resume_training.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_inspect(run_dir, capsys):
    code, out, err = main(capsys, "--inspect", run_dir)
    assert code == 0 and err == ""
    newest = run_dir / "checkpoints/step_000002"
    assert out.splitlines()[0] == f"checkpoint   {newest}"
    for line in ("step         2 of 2; epoch 0, 2 batches into it, micro-step 2",
                 f"last loss    {losses(run_dir)[2]:.6g}", "base model   tiny",
                 f"data         {ROOT / 'data/demo/train'} at 64 px, bucketing, random flip",
                 "LoRA         rank 4, alpha 2, targets all (", "EMA weights  yes (decay 0.999)",
                 "optimizer    adamw, lr 0.02 (cosine schedule, 0 warmup steps); lr now ",
                 "batch        2 images per step (batch_size 2 x accumulation 1 x 1 process)", "precision    fp32",
                 "max steps    2", "seed         0", "files        5, "):
        assert line in out, line
    rows = {row.split()[0]: row.split(maxsplit=1)[1] for row in out.splitlines() if row.startswith("  ")}
    assert rows == {p.name: human_size(p.stat().st_size) for p in newest.iterdir()}
    code, out, _ = main(capsys, "--inspect", run_dir / "checkpoints/step_000001")  # a checkpoint folder itself
    assert code == 0 and "step         1 of 2" in out and "step_000001" in out.splitlines()[0]


def test_find_latest_skips_a_damaged_newest(run_dir, tmp_path, capsys, caplog):
    for where in (run_dir, run_dir / "checkpoints"):
        assert main(capsys, "--find-latest", where) == (0, f"{run_dir / 'checkpoints/step_000002'}\n", "")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    state = copy / "checkpoints/step_000002/training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated: a crash while copying the folder elsewhere
    code, out, _ = main(capsys, "--find-latest", copy)
    assert (code, out) == (0, f"{copy / 'checkpoints/step_000001'}\n")
    assert "skipping step_000002" in caplog.text  # on stderr as `warning: ...` outside pytest
    for marker in (copy / "checkpoints").glob("*/COMPLETE"):
        marker.unlink()
    for mode in ("--find-latest", "--auto", "--inspect"):  # a run folder with nothing to resume: exit 1
        code, out, err = main(capsys, mode, copy)
        assert code == 1 and out == "" and err.startswith("error: no complete checkpoint in") and err.count("\n") == 1


def test_auto_prints_the_command(run_dir, capsys):
    code, out, err = main(capsys, "--auto", run_dir)
    newest = run_dir / "checkpoints/step_000002"
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"latest checkpoint: {newest} (step 2)"
    assert lines[1].startswith("resume with: ") and lines[1].endswith(
        f"train_sdxl.py --config {newest}/config.yaml --resume_from {newest}")
    assert "already reached its max_train_steps 2" in lines[2]  # resuming would stop at once: say so
    assert lines[2].endswith(f"python resume_training.py --auto {run_dir} --execute -- --max_train_steps 4")


def test_auto_execute_resumes_the_run(run_dir, tmp_path):
    """The printed command, run: a moved copy of the run continues from step 2 to 3 in its new folder."""
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy)
    cmd = [sys.executable, str(ROOT / "resume_training.py"), "--auto", str(copy), "--execute", "--",
           "--max_train_steps", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV)  # from another folder
    assert done.returncode == 0, done.stderr[-3000:]
    newest = copy / "checkpoints/step_000002"
    assert f"--resume_from {newest} --output_dir {copy} --max_train_steps 3" in done.stdout
    assert f"resuming from {newest} at step 2" in done.stdout and "already reached" not in done.stdout
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert list(losses(copy)) == [1, 2, 3]
    assert {k: v for k, v in losses(copy).items() if k < 3} == losses(run_dir)
    assert not (run_dir / "checkpoints/step_000003").exists()  # the original run is untouched


def test_errors(run_dir, tmp_path, capsys):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "half").mkdir()
    shutil.copytree(run_dir / "checkpoints/step_000001", tmp_path / "half/step_000001")
    (tmp_path / "half/step_000001/COMPLETE").unlink()  # a save that never finished
    cases = {tmp_path / "random": "is not a training output folder", tmp_path / "empty": "is not a training output",
             tmp_path / "random/notes.txt": "is a file", tmp_path / "missing": "does not exist",
             run_dir / "lora_final.safetensors": "extract_lora_weights.py FILE --info",
             tmp_path / "half/step_000001": "is not a complete checkpoint"}
    for path, message in cases.items():
        for mode in ("--inspect", "--find-latest", "--auto"):
            code, out, err = main(capsys, mode, path)
            assert code == 2 and out == "" and err.count("\n") == 1, (mode, path, err)
            assert err.startswith("error: ") and str(path) in err, (mode, path, err)
            if mode == "--inspect" or "half" not in str(path):
                assert message in err, (mode, path, err)
            else:  # --find-latest and --auto take run folders
                assert f"is a checkpoint folder; give its run folder {tmp_path}" in err
    for argv in ([], ["--execute", "--inspect", run_dir], ["--find-latest", run_dir, "--", "--seed", "1"]):
        code, out, err = main(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
