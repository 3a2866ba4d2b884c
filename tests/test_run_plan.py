"""Resuming a finished run changes nothing; extending one follows --lr_schedule_total (training/run/plan.py).

One tiny run (64 px, 36 images, batch 12: 3 whole steps an epoch) trained by epochs with a validation set and
prompts is resumed as it is (by epochs, then by steps once extended): each time exit 0, "already finished",
and every file of the run folder keeps its bytes and modification time. Extending it from 3 to 5 steps under
a cosine schedule of --lr_schedule_total 6 logs at each step k the learning rate lr * lr_multiplier(k, 0, 6),
i.e. lr * (1 + cos(pi k / 6)) / 2 (relative tolerance 1e-6: the logged value is a float32 product).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from training.loop.optim import lr_multiplier
from training.run.plan import schedule_note

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LR = 4e-3


def train(out: Path, config: Path, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(config), "--output_dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_resumes_to_nothing_and_extends_on_the_same_schedule(tmp_path):
    demo = yaml.safe_load((ROOT / "tests/data/tiny_run.yaml").read_text())
    del demo["max_train_steps"]  # a run by epochs
    demo.update(batch_size=12, num_epochs=1, lr_scheduler="cosine", lr_schedule_total=6, save_every_n_epochs=1,
                save_interval=0, num_validation_images=1, validation_interval=0, learning_rate=LR,
                data_dir=str(ROOT / "data/demo/train"), val_data_dir=str(ROOT / "data/demo/val"))
    config, out = tmp_path / "run.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(demo))
    first = train(out, config)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints/step_000003/COMPLETE").is_file()

    def resume_changes_nothing(*extra):
        before = files_of(out)
        again = train(out, config, "--resume_from", "latest", *extra)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "the run is already finished" in again.stdout and "step_000003" not in again.stderr
        assert files_of(out) == before  # no validation, no samples, no config.yaml, no LoRA rewritten

    resume_changes_nothing()  # by epochs: 1 epoch = 3 steps
    extended = train(out, config, "--resume_from", "latest", "--max_train_steps", "5")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "note: the cosine LR schedule" not in extended.stdout  # same schedule length: nothing to say
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    for k, lr in lrs.items():
        expected = LR * 0.5 * (1 + math.cos(math.pi * k / 6))
        assert math.isclose(lr, LR * lr_multiplier(k, 0, 6, "cosine"), rel_tol=1e-6)
        assert math.isclose(lr, expected, rel_tol=1e-6), (k, lr, expected)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 5]
    resume_changes_nothing("--max_train_steps", "5")  # by steps


def test_schedule_note_says_how_the_schedule_changes():
    checkpoint = SimpleNamespace(state={"step": 90}, config={"max_train_steps": 90})
    args = SimpleNamespace(lr_scheduler="cosine", learning_rate=3e-3, warmup_steps=0)
    note = schedule_note(checkpoint, args, total=180, steps_per_epoch=None)
    now = 3e-3 * 0.5 * (1 + math.cos(math.pi * 90 / 180))  # 1.5e-3, after 0 at the old schedule's end
    assert f"learning rate of step 91 is {now:.4g}, where the old schedule had 0" in note
    assert "--lr_schedule_total 90 keeps the old schedule" in note
    assert schedule_note(checkpoint, args, total=90, steps_per_epoch=None) is None
    assert schedule_note(checkpoint, SimpleNamespace(**{**vars(args), "lr_scheduler": "constant"}), 180, None) is None
    by_epochs = SimpleNamespace(state={"step": 6}, config={"num_epochs": 2, "gradient_accumulation_steps": 2})
    assert "ran over 6)" in schedule_note(by_epochs, args, total=12, steps_per_epoch=3)  # 2 epochs x 3 steps
