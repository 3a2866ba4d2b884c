"""Faults a careful user meets (issue 12): full disks, unwritable folders, broken torchrun environments, kill -9 and
repeated signals. Each ends in one line `error: ...` (exit 2) or a clean stop, and nothing is lost: the reference is
an uninterrupted run (bit-for-bit on CPU) or the file as it was before the fault."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import evaluate_images
import generate_images
import train_sdxl
from common.errors import ConfigError, WriteError
from common.files import atomic_write, umask
from common.runtime import init_world, torchrun_env
from training.run.checkpoints import find_latest
from training.run.metrics import MetricsLog

ROOT = Path(__file__).resolve().parent.parent
FAILURES = {  # what each writer raises on a full disk or a read-only folder
    "enospc": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "eacces": lambda: OSError(errno.EACCES, "Permission denied"),
    "torch": lambda: RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    "safetensors": lambda: SafetensorError("Error while serializing: IoError(No space left on device)"),
}
TRAIN = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--image_size", "64", "--batch_size", "4",
         "--validation_prompts", "--val_data_dir", "", "--log_interval", "1"]
GENERATE = ["--pretrained-model", "tiny", "--image-size", "64", "--num-inference-steps", "2", "--prompt",
            "a red circle", "--prompt", "a blue square", "--batch-size", "2", "--scheduler", "euler_a"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}, "OMP_NUM_THREADS": "1"}


def leftovers(folder: Path) -> list[str]:
    """Temporaries a fault could leave: `.NAME.tmp-PID` / `.NAME.old-PID` anywhere under folder."""
    return [str(p) for p in Path(folder).rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# --- Full disk: every writer's failure is one WriteError naming the file; no temporary stays. -------------------


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("folder", [False, True])
def test_failed_writes_are_one_line_and_leave_the_old_version(tmp_path, failure, folder):
    path = tmp_path / ("ckpt" if folder else "lora.safetensors")
    atomic_write(path, (lambda t: (t / "a").write_text("old")) if folder else (lambda t: t.write_text("old")),
                 folder=folder)

    def write(tmp):
        save_file({"x": torch.zeros(1000)}, str(tmp / "x" if folder else tmp))  # half written, then the disk is full
        raise FAILURES[failure]()

    with pytest.raises(WriteError) as e:
        atomic_write(path, write, folder=folder)
    assert str(e.value).startswith(f"cannot write {path}: ") and "\n" not in str(e.value)
    assert (path / "a" if folder else path).read_text() == "old"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_modes_of_the_umask(tmp_path, mask):
    """Issue 16: safetensors creates 0600; what lands has 0666 / 0777 less the umask, as `open`/`mkdir` give."""
    old = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write(tmp_path / "lora.safetensors", lambda t: save_file({"x": torch.zeros(1)}, str(t)))
        atomic_write(tmp_path / "step_000001", lambda t: save_file({"x": torch.zeros(1)}, str(t / "lora.safetensors")),
                     folder=True)
    finally:
        os.umask(old)
    for path in (tmp_path / "lora.safetensors", tmp_path / "step_000001/lora.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, oct(path.stat().st_mode)
    assert (tmp_path / "step_000001").stat().st_mode & 0o777 == 0o777 & ~mask


def test_metrics_log_on_a_full_disk(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 0.5})

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log.file.close()
    log.file = FullDisk()
    with pytest.raises(WriteError, match=r"metrics.jsonl: No space left on device$"):
        log.log({"step": 2, "loss": 0.4})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"loss": 0.5, "step": 1}


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_generation_on_a_full_disk_then_a_rerun_completes_the_set(tmp_path, capsys, monkeypatch):
    """The disk fills while image 2 is written: one line, exit 2, only complete groups, no temporaries; the same
    command afterwards makes only the rest, pixel for pixel as a run that never failed."""
    out, clean = tmp_path / "out", tmp_path / "clean"
    argv = [*GENERATE, "--num-images", "4"]
    assert generate_images.main([*argv, "--output-dir", str(clean)]) == 0
    save, calls = Image.Image.save, []

    def save_until_full(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            save(self, fp, *args, **kwargs)  # part of the file, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    capsys.readouterr()
    assert generate_images.main([*argv, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    line = err[err.index("error: "):]  # after tqdm's bar
    assert line.startswith(f"error: cannot write {out}/00002.png: No space left on device; the images in {out}")
    assert line.count("\n") == 1 and "Traceback" not in err
    names = sorted(p.name for p in out.iterdir() if p.name != "captions.json")  # complete groups only (3 may have
    stems = sorted({n.split(".")[0] for n in names})  # been written meanwhile), and captions.json listing some of them
    assert "00002" not in stems and names == [f"{i}.{e}" for i in stems for e in ("json", "png", "txt")]
    assert {i["file_name"][:5] for i in json.loads((out / "captions.json").read_text())["images"]} <= set(stems)
    monkeypatch.undo()
    assert generate_images.main([*argv, "--output-dir", str(out)]) == 0
    assert f"done: {4 - len(stems)} image" in capsys.readouterr().out
    got, want = pixels(out), pixels(clean)
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_training_on_a_real_full_file_system(tmp_path):
    """A 9 MB tmpfs (a user namespace: no root needed) holds two 3.7 MB checkpoints of the tiny run, not a third:
    the run stops with one line naming the checkpoint it could not write and the one that is intact."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a small file system here (unshare -rm: no user namespaces)")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), *TRAIN, "--max_train_steps", "5", "--save_interval", "1",
           "--output_dir", str(mnt / "run")]
    script = (f"mount -t tmpfs -o size=9m tmpfs {mnt} && {{ {' '.join(map(repr, cmd))}; echo rc=$?; }}; "
              f"cp -a {mnt}/run {copy}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env=ENV)
    assert "rc=2" in result.stdout, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    run = mnt / "run"
    assert error.startswith(f"error: cannot write checkpoint {run}/checkpoints/step_000003: No space left on device; "
                            f"the latest complete checkpoint {run}/checkpoints/step_000002 is intact"), error
    assert "Traceback" not in result.stderr
    assert leftovers(copy) == [] and sorted(p.name for p in (copy / "checkpoints").iterdir()) == [
        "step_000001", "step_000002"]
    assert find_latest(copy).state["step"] == 2


# --- Unwritable output folders: one line before any model loads. ------------------------------------------------


def test_unwritable_output_folders_are_refused_before_models_load(tmp_path, capsys, monkeypatch):
    import sdxl.loading

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    for name in ("load_unet", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(sdxl.loading, name, no_models)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    under = blocker / "out"
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (32, 32)).save(real / "a.png")
    runs = {"output_dir": lambda: train_sdxl.main([*TRAIN, "--output_dir", str(under)]),
            "output-dir": lambda: generate_images.main([*GENERATE, "--output-dir", str(under)]),
            "out": lambda: evaluate_images.main([str(real), str(real), "--metrics", "ssim", "--out",
                                                 str(under / "r.json")])}
    for flag, run in runs.items():
        try:
            status = run()
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: --{flag} {under}: cannot create or write this folder (a file is in the way)")


# --- Broken torchrun environments: one line naming the variable, within a bounded time. -------------------------


@pytest.mark.parametrize("env,message", [
    ({"RANK": "abc"}, "RANK='abc' is not a whole number"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 must be below "
     "WORLD_SIZE=2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR is not set but WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "2", "SDXL_LORA_START_TIMEOUT": "0"},
     "SDXL_LORA_START_TIMEOUT='0' must be a number of seconds > 0"),
])  # fmt: skip
def test_broken_torchrun_environments_name_the_variable(monkeypatch, capsys, tmp_path, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        torchrun_env() and init_world("cpu")
    assert generate_images.main([*GENERATE, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: environment variable") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("script", [pytest.param("train", marks=pytest.mark.slow), "generate"])
def test_a_process_group_that_never_starts_times_out(tmp_path, script):
    """WORLD_SIZE=2 with only rank 0 started (or only rank 1): the start-up watchdog ends it in bounded time."""
    out = str(tmp_path / "o")
    argv = ([str(ROOT / "train_sdxl.py"), *TRAIN, "--max_train_steps", "1", "--output_dir", out] if script == "train"
            else [str(ROOT / "generate_images.py"), *GENERATE, "--output-dir", out])
    rank = random.Random(script).choice(["0", "1"])
    env = {**ENV, "WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29400 + random.randrange(500)), "SDXL_LORA_START_TIMEOUT": "3"}
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: the torchrun process group did not start within 3 s (RANK {rank} of "
                                    "WORLD_SIZE 2"), result.stderr
    assert result.stderr.count("\n") == 1


# --- kill -9 and repeated signals: resume from latest equals the uninterrupted run. -----------------------------


def as_in_a_terminal() -> None:
    """The child's Ctrl-C as in a terminal's foreground job: a suite started in the background (`cmd &` in a
    script) has SIGINT ignored, which every child inherits, and then no Ctrl-C before the trainer's own handler
    would reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until(cmd: list[str], ready, signals: list[int], gap: float = 0.01, pid=None) -> tuple[int, str]:
    """Start cmd; once `ready()` holds, send `signals` one after another; return (exit status, stderr). `pid`, a
    list, gets the child's pid first (for a `ready` that looks at the process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
                            preexec_fn=as_in_a_terminal)
    if pid is not None:
        pid.append(proc.pid)
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    for s in signals:
        if proc.poll() is None:
            proc.send_signal(s)
            time.sleep(gap)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.slow
def test_training_survives_kill_9_and_repeated_signals(tmp_path):
    """Trials: kill -9 at a random step (twice in one run), kill -9 while a checkpoint folder is being written,
    and SIGINT followed by SIGTERM + SIGINT during the stop checkpoint. Each run is then resumed from latest (as
    often as needed); the final LoRA equals the uninterrupted run's bit for bit."""
    steps = 6
    base = [sys.executable, str(ROOT / "train_sdxl.py"), *TRAIN, "--max_train_steps", str(steps), "--save_interval",
            "1"]
    reference = tmp_path / "reference"
    subprocess.run([*base, "--output_dir", str(reference)], check=True, capture_output=True, cwd=ROOT, env=ENV,
                   timeout=600)
    want = tensors(reference / "lora_final.safetensors")
    rng = random.Random(12)

    def logged(n: int):  # once n steps are in metrics.jsonl
        return lambda out: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count('"loss"') >= n

    def saving(out: Path) -> bool:  # while a checkpoint folder is being written
        return (out / "checkpoints").is_dir() and any(".tmp-" in p.name for p in (out / "checkpoints").glob(".step_*"))

    trials = {  # name: per run, (when to strike, the signals)
        "kill -9 at random steps": [(logged(n), [signal.SIGKILL]) for n in sorted(rng.sample(range(1, steps), 2))],
        "kill -9 during a save": [(saving, [signal.SIGKILL])],
        "SIGINT, then SIGTERM and SIGINT during the stop checkpoint": [
            (logged(2), [signal.SIGINT, signal.SIGTERM, signal.SIGINT])],
    }
    report = []
    for name, runs in trials.items():
        out = tmp_path / name.split(",")[0].replace(" ", "_")
        statuses = []
        for k, (ready, signals) in enumerate(runs):
            flags = ["--resume_from", "latest"] if k else []
            status, err = run_until([*base, "--output_dir", str(out), *flags], partial(ready, out), signals)
            statuses.append(status)
            assert "Traceback" not in err, err[-3000:]
            if signals[0] == signal.SIGINT:
                assert status == 130, err[-2000:]
                latest = find_latest(out)
                assert latest is not None and latest.path.name == f"step_{latest.state['step']:06d}"
            else:
                assert status in (-9, 0), err[-2000:]  # 0: the run ended before the fault
        done = subprocess.run([*base, "--output_dir", str(out), "--resume_from", "latest"], capture_output=True,
                              text=True, cwd=ROOT, env=ENV, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        got = tensors(out / "lora_final.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        assert leftovers(out) == [], name
        report.append((name, statuses))
    print("training fault trials:", report)


@pytest.mark.slow
def test_generation_survives_kill_9_at_random_moments(tmp_path):
    """Three kill -9 at random moments of one generation (a group may be half written); each re-run continues; the
    set ends complete, with no temporaries, pixel for pixel as an uninterrupted run."""
    argv = [sys.executable, str(ROOT / "generate_images.py"), *GENERATE, "--num-images", "8"]
    clean, out = tmp_path / "clean", tmp_path / "out"
    subprocess.run([*argv, "--output-dir", str(clean)], check=True, capture_output=True, cwd=ROOT, env=ENV,
                   timeout=600)
    rng = random.Random(6)
    statuses = []
    for _ in range(3):
        target = rng.randint(1, 6)
        status, err = run_until([*argv, "--output-dir", str(out)],
                                lambda t=target: out.is_dir() and len(list(out.glob("*"))) >= t, [signal.SIGKILL])
        statuses.append(status)
        assert "Traceback" not in err
    rest = subprocess.run([*argv, "--output-dir", str(out)], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=600)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    got, want = pixels(out), pixels(clean)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    for name in (p.name for p in clean.iterdir() if p.suffix != ".png"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    print("generation kill -9 trials (exit statuses):", statuses)


def test_resume_latest_when_every_checkpoint_is_damaged_says_so(tmp_path):
    """Not the usual advice (`--resume_from latest`, which is what failed): how to start over."""
    from argparse import Namespace

    from common.errors import CheckpointError
    from training.run.checkpoints import start_or_resume

    folder = tmp_path / "checkpoints/step_000001"
    folder.mkdir(parents=True)
    for name in ("lora.safetensors", "training_state.pt", "config.yaml", "COMPLETE"):
        (folder / name).write_bytes(b"\0" * 8)  # cut short by a crash
    args = Namespace(output_dir=str(tmp_path), resume_from="latest", overwrite_output_dir=False)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged .* --overwrite_output_dir"):
        start_or_resume(args)


# --- Clear advice. -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,argv,flag", [
    (train_sdxl, ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--lerning_rate", "1"], "--learning_rate"),
    (generate_images, ["--promt", "x"], "--prompt"),  # argparse would first complain of the missing --prompt
    (evaluate_images, ["a", "b", "--metric", "ssim"], "--metrics"),
    (__import__("resume_training"), ["--inspekt", "x"], "--inspect"),
])  # fmt: skip
def test_a_mistyped_flag_is_named_with_the_closest_flag(capsys, script, argv, flag):
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: unrecognized argument {argv[-2]} (did you mean {flag}?)"), err


def test_resume_auto_refuses_extra_flags_that_change_the_result(tmp_path):
    import yaml

    from common.errors import CheckpointError
    from training.config import parse_config, resolved_config_yaml
    from training.run.checkpoints import Checkpoint
    from training.run.folder import check_extra, resume_command

    folder = tmp_path / "checkpoints/step_000004"
    folder.mkdir(parents=True)
    text = resolved_config_yaml(parse_config([*TRAIN, "--output_dir", str(tmp_path)]))
    (folder / "config.yaml").write_text(text)
    checkpoint = Checkpoint(folder, {}, None, {"step": 4}, yaml.safe_load(text), {})
    check_extra(checkpoint, resume_command(checkpoint, extra=["--max_train_steps", "8", "--save_interval", "2"]))
    with pytest.raises(CheckpointError, match=r"lora_rank: checkpoint 8, now 16; seed: checkpoint 0, now 3\)"):
        check_extra(checkpoint, resume_command(checkpoint, extra=["--lora_rank", "16", "--seed", "3"]))


# --- Data folders: links stay inside, odd images and captions named and counted. -----------------------------


def test_data_folder_links_and_odd_images_are_named(tmp_path, caplog):
    from training.data.datasets import build_dataset

    outside, data = tmp_path / "outside.png", tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(outside)
    Image.new("RGB", (64, 64), "red").save(data / "plain.png")
    (data / "plain.txt").write_text("a red square")
    Image.new("RGB", (640, 64)).save(data / "wide.png")  # 10:1
    Image.new("RGB", (6, 6)).save(data / "tiny.png")  # < 64 / 8
    Image.new("I;16", (64, 64)).save(data / "deep.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(data / "moving.png", save_all=True, append_images=frames[1:])  # APNG
    (data / "moving.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1
    (data / "up").symlink_to("..")  # out of the data folder
    (data / "sub" / "loop").symlink_to("..")  # back to data/: scanned already
    with caplog.at_level("WARNING"):
        dataset = build_dataset(data, resolution=64, batch_size=1)
    keys = sorted(r.key for r in dataset.scan.records)
    assert keys == ["deep.png", "moving.png", "plain.png", "tiny.png", "wide.png"]  # nothing outside, nothing twice
    text = caplog.text
    for expected in (f"skipping {data}/up: a link to {tmp_path}, outside", f"skipping {data}/sub/loop: a link to",
                     "wide.png: aspect ratio 10.0:1 is beyond", "tiny.png: 6x6 is smaller than 1/8 of --image_size 64",
                     "moving.png: animated (2 frames)", "deep.png: 16-bit (I;16)", "moving.png: its caption moving.txt "
                     "is not UTF-8",
                     "data: 1 16 bit, 1 animated, 1 caption not utf8, 1 extreme aspect, 1 small"):
        assert expected in text, (expected, text)
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "generate"])
def test_ctrl_c_while_starting_is_one_line(tmp_path, script):
    """Ctrl-C while torch imports (before the trainer's own stop handling): exit 130, one line. The signal goes as
    soon as torch's library is mapped into the process (a Ctrl-C inside the interpreter's own start-up is Python's),
    which is seconds before the models load and the run starts, so no delay or machine speed decides the moment (a
    fixed delay let a fast run finish first)."""
    out = str(tmp_path / "o")
    argv = ([str(ROOT / "train_sdxl.py"), *TRAIN, "--max_train_steps", "2", "--output_dir", out] if script == "train"
            else [str(ROOT / "generate_images.py"), *GENERATE, "--num-images", "40", "--output-dir", out])

    def torch_loading(pid: list, since: list, delay: float) -> bool:
        try:
            mapped = "libtorch" in Path(f"/proc/{pid[0]}/maps").read_text()
        except OSError:
            return False
        if mapped and not since:
            since.append(time.time())
        return mapped and time.time() - since[0] >= delay

    for delay in (0.0,):
        pid, since = [], []
        status, err = run_until([sys.executable, *argv], partial(torch_loading, pid, since, delay), [signal.SIGINT],
                                pid=pid)
        assert status == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
        assert leftovers(tmp_path) == []


def test_latent_cache_on_a_full_disk(tmp_path, monkeypatch):
    import training.loop.caching as caching

    store = caching._Store("disk", tmp_path / "latents")
    store.write("a", {"x": torch.ones(4)})

    def full(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 10)  # part of the file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(caching, "save_file", full)
    with pytest.raises(WriteError, match=r"latents/b.safetensors: No space left on device$"):
        store.write("b", {"x": torch.ones(4)})
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == ["a.safetensors"]


def test_a_read_only_file_system_is_named(tmp_path):
    """A real read-only mount (a user namespace: no root needed): the check names the reason."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here (unshare -rm: no user namespaces)")
    code = (f"from common.files import check_writable\ntry:\n    check_writable('output_dir', '{tmp_path}/out')\n"
            "except ValueError as e:\n    print(e)")
    script = f"mount -t tmpfs -o ro tmpfs {tmp_path} && {sys.executable} -c \"{code}\""
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=ENV)
    assert result.stdout == (f"--output_dir {tmp_path}/out: cannot create or write this folder (Read-only file "
                             "system); choose a folder you can write to, or fix its permissions\n"), result.stderr
