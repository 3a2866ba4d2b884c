"""Faults of the user's shell (issue: console): output piped to `tee` or `head -1`, Ctrl-C to the whole process
group, a closed terminal (SIGHUP), `--help` before torch, the libraries' progress bars. Every test runs the real
scripts in subprocesses with real pipes, process groups and signals; none asserts on time (the waits are bounds
that turn a hang into a failure).

A job is what a shell starts for `cmd 2>&1 | tee log`: cmd and its reader in a process group of their own, which a
Ctrl-C in the terminal signals as a whole (`os.killpg`), the reader and the DataLoader workers included.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_sdxl
from common.console import QUIET

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", *QUIET}} | {"OMP_NUM_THREADS": "1"}
BOUND = 300  # seconds: a run that has not ended by then hangs (the failure this file is about)
HEAVY = ("torch", "diffusers", "transformers")
SCRIPTS = ["train_sdxl.py", "train_sd3.py", "generate_images.py", "evaluate_images.py", "resume_training.py",
           "extract_lora_weights.py", "demo.py"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """4 captioned pictures of the demo set: 2 batches of 2 per epoch."""
    folder = tmp_path_factory.mktemp("images")
    for png in sorted((ROOT / "data/demo/train").glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


def train(images: Path, out: Path, *flags: str, script: str = "train_sdxl.py") -> list[str]:
    model = ["--config", str(ROOT / "tests/data/tiny_run.yaml")] if script == "train_sdxl.py" else [
        "--pretrained_model", "tiny-sd3", "--precision", "fp32", "--device", "cpu"]
    return [sys.executable, str(ROOT / script), *model, "--data_dir", str(images), "--image_size", "64",
            "--batch_size", "2", "--validation_prompts", "--val_data_dir", "", "--save_interval", "0",
            "--output_dir", str(out), *flags]


def generate(out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "generate_images.py"), "--pretrained-model", "tiny", "--image-size", "64",
            "--num-inference-steps", "2", "--prompt", "a red circle", "--output-dir", str(out), *flags]


# --- Process groups: start a job, signal it, find what is left of it. -------------------------------------------


def _join_group(pgid: int) -> None:
    """In the child, before exec: join process group `pgid` (0: a new one, led by the child), with the default
    SIGINT and SIGHUP a terminal's job has, whatever this test process runs under (nohup, a background job)."""
    os.setpgid(0, pgid)
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live processes (zombies left out) of process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append((int(stat.parent.name), name))
    return members


def survivors(pgid: int) -> list[tuple[int, str]]:
    """What is left of a job's process group once its processes have ended (a bounded wait: orphans are reaped by
    init, not at once)."""
    deadline = time.monotonic() + 30
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Job:
    """`cmd | reader` (`cmd 2>&1 | reader` with `both`) in a process group of its own, as a shell starts it; without
    `both`, cmd's stderr goes to `stderr_path`."""

    def __init__(self, cmd: list[str], reader: list[str], both: bool = True, stderr_path: Path | None = None):
        with open(stderr_path or os.devnull, "w") as stderr:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT if both else stderr,
                                         preexec_fn=lambda: _join_group(0))
        self.pgid = self.proc.pid
        self.reader = subprocess.Popen(reader, stdin=self.proc.stdout, stdout=subprocess.DEVNULL,
                                       preexec_fn=lambda: _join_group(self.pgid))
        self.proc.stdout.close()  # the reader holds the pipe's only read end: when it goes, writes fail (EPIPE)

    def members(self) -> list[str]:
        return [name for _, name in group_members(self.pgid)]

    def signal_when(self, ready, signum: int) -> int:
        """Once `ready()` holds (cmd still running), send `signum` to the whole group; return cmd's exit status."""
        deadline = time.monotonic() + BOUND
        while not ready() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.proc.poll() is None and ready(), "the job ended or never got ready before the signal"
        os.killpg(self.pgid, signum)
        status = self.proc.wait(timeout=BOUND)
        self.reader.wait(timeout=BOUND)
        return status

    def end(self) -> None:
        """Teardown: kill what is still running of this job, by process id (never a reused group id)."""
        for proc in (self.proc, self.reader):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid, _ in group_members(self.pgid):  # the group id cannot be reused while one of them lives
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def jobs():
    started = []
    yield lambda *args, **kwargs: started.append(Job(*args, **kwargs)) or started[-1]
    for job in started:
        job.end()


def steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.exists() else 0


def complete_groups(out: Path) -> list[str]:
    """The image indices of `out` whose .png, .json and .txt are all there; asserts nothing else is there (but the
    captions.json of the complete groups)."""
    names = sorted(p.name for p in out.iterdir() if p.name != "captions.json") if out.is_dir() else []
    stems = sorted({n.split(".")[0] for n in names})
    assert names == [f"{s}.{e}" for s in stems for e in ("json", "png", "txt")], names  # no half group, no temporary
    return stems


def assert_stop_checkpoint(out: Path, steps_before: int) -> None:
    """One checkpoint, the stop checkpoint: complete, loadable, after the `steps_before` logged before the signal."""
    from training.run.checkpoints import MARKER, find_latest

    folders = sorted(p.name for p in (out / "checkpoints").iterdir())
    latest = find_latest(out)
    assert latest is not None and folders == [latest.path.name], folders
    assert (latest.path / MARKER).is_file() and latest.state["step"] >= steps_before
    assert latest.path.name == f"step_{latest.state['step']:06d}"


# --- 1, 9: Ctrl-C through a pipe, SIGHUP: the step finishes, the stop checkpoint is written, nothing survives. ----


@pytest.mark.parametrize("both,workers", [(True, 2), (False, 2), (True, 0)],
                         ids=["2>&1 | tee, 2 workers", "| tee, 2 workers", "2>&1 | tee, 0 workers"])
def test_ctrl_c_through_a_pipe_saves_the_stop_checkpoint(tmp_path, images, jobs, both, workers):
    """Before: with workers, 2/2 hung (no message, no checkpoint; the workers alive, the trainer joining them);
    `| tee` wrote the checkpoint, then a BrokenPipeError traceback from tqdm.write, then hung; 0 workers: exit 1
    and nothing saved."""
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    job = jobs(train(images, out, "--max_train_steps", "100000", "--num_workers", str(workers)),
               ["tee", str(tmp_path / "log")], both=both, stderr_path=err)

    def ready() -> bool:  # training, its data workers running
        return steps_logged(out) >= 1 and job.members().count("pt_data_worker") == workers

    status = job.signal_when(ready, signal.SIGINT)
    assert status == 130, (tmp_path / "log").read_text()[-3000:] + (err.read_text()[-3000:] if err.exists() else "")
    assert_stop_checkpoint(out, 1)
    assert survivors(job.pgid) == []
    if not both:  # stderr is ours to read: the stop's lines, no traceback
        text = err.read_text()
        assert "SIGINT: finishing this step, then saving a checkpoint and exiting" in text
        assert f"stopped by SIGINT; checkpoint {out}/checkpoints/step_" in text
        assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_data_workers_end_with_a_killed_trainer(tmp_path, images, jobs):
    """kill -9 of the trainer alone: its workers (which ignore the job's signals) go too, and with them the last
    holders of the pipe, so `tee` ends."""
    out = tmp_path / "out"
    job = jobs(train(images, out, "--max_train_steps", "100000", "--num_workers", "2"), ["tee", str(tmp_path / "log")])
    deadline = time.monotonic() + BOUND
    while not (steps_logged(out) >= 1 and job.members().count("pt_data_worker") == 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.members().count("pt_data_worker") == 2 and job.proc.poll() is None
    os.kill(job.proc.pid, signal.SIGKILL)
    assert job.proc.wait(timeout=BOUND) == -signal.SIGKILL
    assert survivors(job.pgid) == []


def test_ctrl_c_through_a_pipe_keeps_every_complete_image(tmp_path, jobs):
    """Before: `2>&1 | tee`, Ctrl-C: the message failed with EPIPE, exit 1 with a traceback."""
    out = tmp_path / "out"
    job = jobs(generate(out, "--num-images", "500"), ["tee", str(tmp_path / "log")])
    status = job.signal_when(lambda: len(list(out.glob("*.txt"))) >= 2, signal.SIGINT)
    assert status == 130, (tmp_path / "log").read_text()[-3000:]
    assert len(complete_groups(out)) >= 2
    assert survivors(job.pgid) == []


def test_sighup_stops_training_like_sigterm(tmp_path, images, jobs):
    """Before: a closed terminal (SIGHUP) killed the run at once: no message, no stop checkpoint (4/4)."""
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    job = jobs(train(images, out, "--max_train_steps", "100000", "--num_workers", "2"), ["tee", str(tmp_path / "log")],
               both=False, stderr_path=err)
    status = job.signal_when(lambda: steps_logged(out) >= 1 and "pt_data_worker" in job.members(), signal.SIGHUP)
    text = err.read_text()
    assert status == 129, text[-3000:]
    assert_stop_checkpoint(out, 1)
    assert survivors(job.pgid) == []
    assert "SIGHUP: finishing this step, then saving a checkpoint and exiting" in text
    assert f"stopped by SIGHUP; checkpoint {out}/checkpoints/step_" in text
    assert f"continue with: python train_sdxl.py --config {out}/config.yaml --resume_from latest" in text
    assert "Traceback" not in text


def test_sighup_keeps_every_complete_image(tmp_path, jobs):
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    job = jobs(generate(out, "--num-images", "500"), ["tee", str(tmp_path / "log")], both=False, stderr_path=err)
    status = job.signal_when(lambda: len(list(out.glob("*.txt"))) >= 2, signal.SIGHUP)
    text = err.read_text()
    assert status == 129, text[-3000:]
    assert len(complete_groups(out)) >= 2
    assert survivors(job.pgid) == []
    assert f"interrupted (SIGHUP); the images in {out} with their .txt are complete and kept" in text
    assert "Traceback" not in text


# --- 3: `| head -1`: every script exits quietly, status 0 when its work is done. -------------------------------


def after_head(cmd: list[str], both: bool) -> tuple[int, str]:
    """Run cmd with stdout (and stderr with `both`) on a pipe whose reader, `head -1`, has read its line and left:
    every write fails (EPIPE), as after `cmd | head -1` once head is gone. Returns (exit status, stderr)."""
    read, write = os.pipe()
    head = subprocess.Popen(["head", "-1"], stdin=read, stdout=subprocess.PIPE)
    os.close(read)
    os.write(write, b"the line head -1 prints\n")
    assert head.communicate(timeout=60)[0] == b"the line head -1 prints\n"  # head has left: the pipe has no reader
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=write, stderr=write if both else subprocess.PIPE,
                                text=True, timeout=BOUND)
    finally:
        os.close(write)
    return result.returncode, result.stderr or ""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, images) -> Path:
    """A finished tiny run with one checkpoint (trained in this process: no import time)."""
    out = tmp_path_factory.mktemp("run")
    assert train_sdxl.main(train(images, out, "--max_train_steps", "1", "--save_interval", "1")[2:]) == 0
    return out


@pytest.mark.parametrize("script", ["train_sdxl.py", "train_sd3.py"])
def test_training_after_head_is_gone(tmp_path, images, script):
    """Before: `2>&1 | head -1` ended the run with a BrokenPipeError at the first bar update."""
    out = tmp_path / "out"
    status, _ = after_head(train(images, out, "--max_train_steps", "2", script=script), both=True)
    assert status == 0 and (out / "lora_final.safetensors").is_file()


def test_generation_after_head_is_gone(tmp_path):
    """Before: `2>&1 | head -1` exited 1 every time although every image was written."""
    out = tmp_path / "out"
    status, _ = after_head(generate(out, "--num-images", "2"), both=True)
    assert status == 0 and complete_groups(out) == ["00000", "00001"]


@pytest.mark.parametrize("argv", [
    ["resume_training.py", "--inspect", "{run}"],  # before: a BrokenPipeError traceback in 5/12 runs
    ["resume_training.py", "--find-latest", "{run}"],
    ["resume_training.py", "--auto", "{run}"],  # before: 7/12
    ["extract_lora_weights.py", "{run}/checkpoints/step_000001", "--info"],  # before: 10/12
    ["evaluate_images.py", "{images}", "{images}", "--metrics", "ssim", "--ssim-size", "64", "--groups", "none"],
    ["demo.py", "--help"],
], ids=lambda argv: " ".join(argv[:2]))  # fmt: skip
def test_scripts_after_head_is_gone(run_dir, images, argv):
    cmd = [sys.executable, str(ROOT / argv[0]), *(a.format(run=run_dir, images=images) for a in argv[1:])]
    status, err = after_head(cmd, both=False)
    assert status == 0, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err[-3000:]


# --- 4: --help and flag errors answer before torch, diffusers and transformers import. ---------------------------


@pytest.mark.parametrize("flag", ["--help", "--no_such_flag"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_flag_errors_import_no_heavy_library(script, flag):
    """Before: ~3-5 s for each (torch, diffusers and transformers imported first); now they are imported after the
    flags are parsed."""
    code = (f"import runpy, sys\nsys.argv = [{script!r}, {flag!r}]\ntry:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as e:\n    status = e.code\n"
            f"print('status', status, 'heavy', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    *lines, report = result.stderr.splitlines()
    if flag == "--help":
        assert report == "status 0 heavy" and result.stdout.startswith("usage: ") and lines == [], result.stderr
    else:
        assert report == "status 2 heavy", result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), lines  # one line (argparse's, made ours)


def test_the_precision_names_of_the_flags_are_the_dtypes():
    from common.runtime import DTYPES
    from sampling.config import PRECISIONS

    assert PRECISIONS == tuple(DTYPES)


# --- 7: the libraries' progress bars and chatter only with --verbose; ours always. ------------------------------


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_library_progress_bars_only_with_verbose(tmp_path, images, verbose):
    """Before: transformers' "Loading weights" and "Writing model shards" bars in every script's output. The tiny
    model is written afresh into an empty cache (its shards), then loaded by a training and a generation."""
    env = {**ENV, "SDXL_LORA_CACHE": str(tmp_path / "cache")}
    flags = ["--verbose"] if verbose else []
    trained = subprocess.run(train(images, tmp_path / "run", "--max_train_steps", "1", *flags), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=BOUND)
    made = subprocess.run(generate(tmp_path / "images", *flags), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=BOUND)
    assert trained.returncode == 0 and made.returncode == 0, trained.stderr[-3000:] + made.stderr[-3000:]
    train_output, generate_output = trained.stdout + trained.stderr, made.stdout + made.stderr
    assert "training: 100%" in trained.stderr and "generating: 100%" in made.stderr  # our own bars
    for text, theirs in ((train_output, ["Writing model shards", "Loading weights"]),
                         (generate_output, ["Loading weights"])):
        for bar in theirs:
            assert (bar in text) == verbose, (bar, text[-3000:])
