"""download_weights.sh, run as a subprocess with no network: dry runs, flag errors, and a real run
whose download tool is a fake script on PATH (one that fails, one that writes nothing, one that
writes the files it is asked for)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "download_weights.sh"
BASH = shutil.which("bash")
FP16 = [
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/model.fp16.safetensors",
]
FP32 = [name.replace(".fp16", "") for name in FP16]


@pytest.fixture
def bare_path(tmp_path):
    """A PATH holding bash only: no hf, no huggingface-cli (the script needs nothing else)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(BASH)
    return bin_dir


def run(*args, path=None, cwd=None):
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = os.pathsep.join(str(p) for p in path)
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    """A Python script named like the download tool; it logs its argv to bin_dir/calls."""
    tool = bin_dir / name
    tool.write_text(
        f"#!{sys.executable}\nimport sys, pathlib\n"
        f"pathlib.Path({str(bin_dir / 'calls')!r}).open('a').write(' '.join(sys.argv[1:]) + '\\n')\n" + body
    )
    tool.chmod(0o755)


# Writes every positional file name under --local-dir, as the real tool would.
WRITE_FILES = """
args = sys.argv[2:]
dest = pathlib.Path(args[args.index('--local-dir') + 1])
for name in args[1:args.index('--local-dir')]:
    (dest / name).parent.mkdir(parents=True, exist_ok=True)
    (dest / name).write_text('x')
"""


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run([BASH, "-n", str(SCRIPT)]).returncode == 0


def test_help():
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--dir", "--full-precision", "--vae-fp16-fix", "--dry-run"):
        assert flag in out.stdout


def test_dry_run_fp16(bare_path, tmp_path):
    # Works without the tool installed, and fetches nothing.
    out = run("--dry-run", path=[bare_path], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stabilityai/stable-diffusion-xl-base-1.0" in out.stdout
    for name in [*FP16, "model_index.json", "scheduler/scheduler_config.json", "tokenizer_2/vocab.json"]:
        assert name in out.stdout
    assert "--local-dir ./weights/sdxl-base-1.0" in out.stdout
    assert "pip install -U huggingface_hub" in out.stdout
    assert "madebyollin" not in out.stdout
    assert not (tmp_path / "weights").exists()


def test_dry_run_full_precision():
    out = run("--full-precision", "--dry-run", "--dir", "/data/sdxl")
    assert out.returncode == 0, out.stderr
    for name in FP32:
        assert name in out.stdout
    assert "fp16" not in out.stdout
    assert "--local-dir /data/sdxl" in out.stdout


def test_dry_run_vae_fp16_fix():
    out = run("--vae-fp16-fix", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "madebyollin/sdxl-vae-fp16-fix config.json diffusion_pytorch_model.safetensors" in out.stdout
    assert "--local-dir ./weights/sdxl-vae-fp16-fix" in out.stdout


@pytest.mark.parametrize("args", [["--no-such-flag"], ["--dry-run", "--no-such-flag"]])
def test_unknown_flag(args):
    out = run(*args)
    assert out.returncode == 2
    assert "--no-such-flag" in out.stderr and "--help" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_dir_needs_a_value():
    out = run("--dir")
    assert out.returncode == 2 and "--dir" in out.stderr


def test_missing_tool(bare_path, tmp_path):
    out = run(path=[bare_path], cwd=tmp_path)
    assert out.returncode == 2
    assert "pip install -U huggingface_hub" in out.stderr
    assert not (tmp_path / "weights").exists()


def test_download_failure(bare_path, tmp_path):
    fake_tool(bare_path, "hf", "print('ConnectionError: no network', file=sys.stderr); sys.exit(1)\n")
    out = run("--dir", str(tmp_path / "sdxl"), path=[bare_path], cwd=tmp_path)
    assert out.returncode == 1
    assert "stabilityai/stable-diffusion-xl-base-1.0 failed" in out.stderr
    assert "hf auth login" in out.stderr
    assert "--pretrained_model" not in out.stdout  # no success claim


def test_download_that_writes_nothing_is_an_error(bare_path, tmp_path):
    fake_tool(bare_path, "hf", "")  # exits 0 but fetched nothing
    out = run("--dir", str(tmp_path / "sdxl"), path=[bare_path], cwd=tmp_path)
    assert out.returncode == 1
    assert "lacks" in out.stderr and "unet/diffusion_pytorch_model.fp16.safetensors" in out.stderr
    assert "--pretrained_model" not in out.stdout


@pytest.mark.parametrize("tool", ["hf", "huggingface-cli"])
def test_successful_download(bare_path, tmp_path, tool):
    fake_tool(bare_path, tool, WRITE_FILES)
    sdxl, vae = tmp_path / "sdxl", tmp_path / "vae-fix"
    out = run("--dir", str(sdxl), "--vae-fp16-fix", "--vae-dir", str(vae), path=[bare_path], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    calls = (bare_path / "calls").read_text().splitlines()
    assert calls[0].startswith("download stabilityai/stable-diffusion-xl-base-1.0 ")
    assert calls[1].startswith("download madebyollin/sdxl-vae-fp16-fix ")
    assert all((sdxl / name).is_file() for name in FP16)
    assert (vae / "diffusion_pytorch_model.safetensors").is_file()
    assert f"--pretrained_model {sdxl}" in out.stdout
    assert f"--vae_model {vae}" in out.stdout
