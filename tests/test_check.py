"""The demo command (`python -m sdxl.check`) works on the tiny model and fails clearly on a bad path."""

import subprocess
import sys

from PIL import Image


def test_check_tiny(tmp_path):
    out = tmp_path / "check.png"
    run = subprocess.run([sys.executable, "-m", "sdxl.check", "--pretrained_model", "tiny", "--image_size", "64",
                          "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "(ok)" in run.stdout
    assert Image.open(out).size == (64, 64)


def test_check_bad_path(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sdxl.check", "--pretrained_model", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "does not exist" in run.stderr
