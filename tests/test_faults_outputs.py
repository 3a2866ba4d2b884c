"""What other tools read, and two runs on one folder (the fault-injection issue, items 5, 6 and 8).

- captions.json: a COCO captions file of exactly the complete images, kept right through a kill -9 and a re-run,
  and read by evaluate_images.py --groups prompt;
- the evaluation table: group sizes, the whole set first, set-wide values in the row "all" only;
- one run per output folder: a second training or generation on a locked folder says in one line who holds it
  (exit 2, nothing written), the first completes, and the lock of a kill -9'd run does not block.

Real processes throughout; a first run is held with SIGSTOP once it holds the lock and has made progress, so the
second meets it deterministically (no timing).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import evaluate_images
import generate_images
from common.errors import FolderInUse
from common.lock import LOCK_NAME, take_lock

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train_sdxl.py"), "--config", str(ROOT / "tests/data/tiny_run.yaml"),
         "--image_size", "64", "--batch_size", "4", "--validation_prompts", "--val_data_dir", "", "--log_interval", "1"]
GENERATE = ["--pretrained-model", "tiny", "--image-size", "64x48", "--num-inference-steps", "2", "--prompt",
            "a red circle", "--prompt", "a blue square", "--prompt", "a green star", "--scheduler", "euler_a"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}, "OMP_NUM_THREADS": "1"}
DEADLINE_S = 300  # a guard against a hung test, never a measurement


def generate_cmd(out: Path, *argv) -> list[str]:
    return [sys.executable, str(ROOT / "generate_images.py"), *GENERATE, *map(str, argv), "--output-dir", str(out)]


def complete(out: Path) -> list[int]:
    """Indices of the complete groups (.png with its .txt) in a generated folder."""
    return sorted(int(p.stem) for p in out.glob("[0-9]*.txt") if p.with_suffix(".png").is_file())


def check_captions(out: Path, indices: list[int] | None = None) -> dict:
    """captions.json is COCO captions of exactly `indices` (default: the complete groups), each once, id = index."""
    coco = json.loads((out / "captions.json").read_text(encoding="utf-8"))
    indices = complete(out) if indices is None else indices
    assert [i["id"] for i in coco["images"]] == indices
    assert [a["image_id"] for a in coco["annotations"]] == [a["id"] for a in coco["annotations"]] == indices
    for image, annotation in zip(coco["images"], coco["annotations"], strict=True):
        png = out / image["file_name"]
        assert image["file_name"] == f"{image['id']:05d}.png"
        with Image.open(png) as im:
            assert im.size == (image["width"], image["height"])
        assert annotation["caption"] == png.with_suffix(".txt").read_text(encoding="utf-8")
    return coco


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (hidden ones included) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A process whose output goes to a file (a pipe nobody reads could block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)


def wait_for(proc: subprocess.Popen, ready, log: Path) -> None:
    """Until ready() holds while proc still runs (its log on failure)."""
    import time

    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert proc.poll() is None, f"the first run ended before it was ready:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)


def holder_pid(out: Path) -> int:
    return json.loads((out / LOCK_NAME).read_text())["pid"]


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line] \
        if path.is_file() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Item 8: one run per output folder ------------------------------------------------------------------------


def test_the_lock_in_one_process(tmp_path):
    """The lock file names its holder; a second taker (even in the same process: flock is per open file) is
    refused in one line naming it; release removes the file and the folders made for it; a lock file whose holder
    is gone is taken over."""
    out = tmp_path / "a" / "out"
    lock = take_lock(out, "output_dir")
    info = json.loads((out / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"] and info["command"]
    with pytest.raises(FolderInUse) as e:
        take_lock(out, "output_dir")
    message = str(e.value)
    assert message.startswith(f"--output_dir {out} is in use by another run (pid {os.getpid()} on host ")
    assert "\n" not in message and message.endswith("wait for it to end or stop it, or give another --output_dir")
    lock.release()
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed

    out.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with take_lock(out, "output_dir"):  # a killed run's lock file: nobody holds the flock
        assert holder_pid(out) == os.getpid()
    assert out.is_dir() and list(out.iterdir()) == []


def test_two_trainings_on_one_folder(tmp_path):
    """The second (which would even clear the folder: --overwrite_output_dir) stops at once with one line naming
    the first's pid, exit 2, the folder untouched; the first then completes with its own steps, config and LoRA."""
    out = tmp_path / "run"
    first = start([*TRAIN, "--max_train_steps", "12", "--save_interval", "4", "--output_dir", str(out)],
                  tmp_path / "first.log")
    try:
        wait_for(first, lambda: (out / LOCK_NAME).is_file() and logged_steps(out), tmp_path / "first.log")
        first.send_signal(signal.SIGSTOP)  # holds the lock (and everything else) until SIGCONT
        assert first.poll() is None and holder_pid(out) == first.pid
        before = snapshot(out)
        second = subprocess.run([*TRAIN, "--max_train_steps", "4", "--learning_rate", "1e-3",
                                 "--overwrite_output_dir", "--output_dir", str(out)], capture_output=True, text=True,
                                cwd=ROOT, env=ENV, timeout=DEADLINE_S)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.count("\n") == 1 and second.stderr.startswith(
            f"error: --output_dir {out} is in use by another run (pid {first.pid} on host {socket.gethostname()}, "
            "started "), second.stderr
        assert "train_sdxl.py" in second.stderr and "Traceback" not in second.stderr
        assert snapshot(out) == before  # nothing read-modified, cleared or written
    finally:
        first.send_signal(signal.SIGCONT)
        status = first.wait(timeout=DEADLINE_S)
    assert status == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert logged_steps(out) == list(range(1, 13))
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 4e-3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000008", "step_000012"]
    assert (out / "lora_final.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_a_killed_training_leaves_a_lock_that_does_not_block(tmp_path):
    out = tmp_path / "run"
    argv = [*TRAIN, "--max_train_steps", "8", "--save_interval", "2", "--output_dir", str(out)]
    first = start(argv, tmp_path / "first.log")
    wait_for(first, lambda: (out / LOCK_NAME).is_file() and len(logged_steps(out)) >= 3, tmp_path / "first.log")
    first.kill()
    assert first.wait(timeout=DEADLINE_S) == -signal.SIGKILL
    assert holder_pid(out) == first.pid  # its lock file stays, naming a process that is gone
    again = subprocess.run([*argv, "--resume_from", "latest"], capture_output=True, text=True, cwd=ROOT, env=ENV,
                           timeout=DEADLINE_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and logged_steps(out)[-1] == 8 and not (out / LOCK_NAME).exists()


def test_two_generations_on_one_folder(tmp_path):
    """As for training: the second (with --overwrite) names the first's pid and exits 2 with the folder as it was;
    the first makes all its images."""
    out = tmp_path / "out"
    first = start(generate_cmd(out, "--num-images", 16), tmp_path / "first.log")
    try:
        wait_for(first, lambda: (out / LOCK_NAME).is_file() and complete(out), tmp_path / "first.log")
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and holder_pid(out) == first.pid
        before = snapshot(out)
        second = subprocess.run(generate_cmd(out, "--num-images", 16, "--overwrite"), capture_output=True, text=True,
                                cwd=ROOT, env=ENV, timeout=DEADLINE_S)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.count("\n") == 1 and second.stderr.startswith(
            f"error: --output-dir {out} is in use by another run (pid {first.pid} on host "), second.stderr
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
        status = first.wait(timeout=DEADLINE_S)
    assert status == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert complete(out) == list(range(16)) and not (out / LOCK_NAME).exists()
    check_captions(out)


def test_under_torchrun_only_rank_0_takes_the_lock_and_says_who_holds_it(tmp_path):
    """Two gloo ranks on a folder this test process holds: one line (rank 0's) naming this pid; rank 1 waits for
    rank 0's answer and ends too (no hang); nothing is written."""
    out = tmp_path / "out"
    with take_lock(out, "output-dir"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), str(ROOT / "generate_images.py"), *GENERATE,
                               "--num-images", "4", "--output-dir", str(out)], capture_output=True, text=True,
                              cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=DEADLINE_S)
        assert proc.returncode != 0
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        started = json.loads((out / LOCK_NAME).read_text())["started"]
        assert len(lines) == 1 and lines[0].startswith(
            f"error: --output-dir {out} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, "
            f"started {started}: "), proc.stderr[-3000:]
        assert lines[0].endswith("; wait for it to end or stop it, or give another --output-dir")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# --- Item 5: captions.json --------------------------------------------------------------------------------------


def test_captions_json_grows_with_the_set_and_follows_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate_images.main([*GENERATE, "--num-images", "2", "--output-dir", str(out)]) == 0
    check_captions(out, [0, 1])
    assert generate_images.main([*GENERATE, "--num-images", "5", "--batch-size", "2", "--output-dir", str(out)]) == 0
    coco = check_captions(out, [0, 1, 2, 3, 4])
    assert [a["caption"] for a in coco["annotations"]] == ["a red circle", "a blue square", "a green star",
                                                           "a red circle", "a blue square"]
    assert set(coco) == {"info", "licenses", "images", "annotations"}

    # A run killed before it listed its last images (here: the file lost two): the next run, even one with
    # nothing to make, lists them again; the file is rewritten whole, never appended to.
    coco["images"], coco["annotations"] = coco["images"][:3], coco["annotations"][:3]
    (out / "captions.json").write_text(json.dumps(coco))
    assert generate_images.main([*GENERATE, "--num-images", "5", "--output-dir", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    check_captions(out, [0, 1, 2, 3, 4])

    # --overwrite with other prompts: every caption is the new one, each image once.
    argv = ["--pretrained-model", "tiny", "--image-size", "64", "--num-inference-steps", "2", "--prompt", "a cat",
            "--num-images", "3", "--overwrite", "--output-dir", str(out)]
    assert generate_images.main(argv) == 0
    coco = check_captions(out, [0, 1, 2, 3, 4])
    assert [a["caption"] for a in coco["annotations"]] == ["a cat"] * 3 + ["a red circle", "a blue square"]
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(64, 64)] * 3 + [(64, 48)] * 2
    assert sorted(p.name for p in out.iterdir() if not p.name[0].isdigit()) == ["captions.json"]  # no lock left


def test_captions_json_after_kill_9_and_a_rerun(tmp_path):
    """kill -9 once the file lists two images: it lists only complete ones (each once); the re-run (the lock the
    killed run left does not block it) ends with the file of an uninterrupted run, byte for byte."""
    clean, out = tmp_path / "clean", tmp_path / "out"
    argv = ("--num-images", 16, "--batch-size", 1)
    subprocess.run(generate_cmd(clean, *argv), check=True, capture_output=True, cwd=ROOT, env=ENV,
                   timeout=DEADLINE_S)

    def listed() -> int:
        try:
            return len(json.loads((out / "captions.json").read_text())["images"])
        except (OSError, ValueError):
            return 0

    first = start(generate_cmd(out, *argv), tmp_path / "first.log")
    wait_for(first, lambda: listed() >= 2, tmp_path / "first.log")
    first.kill()
    assert first.wait(timeout=DEADLINE_S) == -signal.SIGKILL
    coco = json.loads((out / "captions.json").read_text())
    ids = [i["id"] for i in coco["images"]]
    assert ids == sorted(set(ids)) and set(ids) <= set(complete(out)) and len(ids) >= 2
    assert holder_pid(out) == first.pid
    rest = subprocess.run(generate_cmd(out, *argv), capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=DEADLINE_S)
    assert rest.returncode == 0, rest.stderr[-3000:]
    check_captions(out, list(range(16)))
    assert (out / "captions.json").read_bytes() == (clean / "captions.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())


def smooth(rng: np.random.Generator, size: int = 64) -> Image.Image:
    small = Image.fromarray((rng.random((6, 6, 3)) * 200).astype(np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def test_evaluate_reads_prompts_from_captions_json(tmp_path, capsys):
    """A generated folder with captions.json: its prompts win over the .txt files (and a folder of PNGs with only
    a captions.json, as other tools write, has prompts too)."""
    from sampling.captions import Captions

    rng = np.random.default_rng(0)
    real, gen = tmp_path / "real", tmp_path / "gen"
    real.mkdir()
    gen.mkdir()
    for i in range(4):
        smooth(rng).save(real / f"{i}.png")
        (real / f"{i}.txt").write_text("a cat" if i < 2 else "a dog")
    captions = Captions(gen)
    for i in range(4):
        smooth(rng).save(gen / f"{i:05d}.png")
        (gen / f"{i:05d}.txt").write_text("a bird")  # not what captions.json says: captions.json wins
        captions.add(i, 64, 64, "a cat" if i % 2 else "a dog")
    captions.write()
    report = tmp_path / "r.json"
    assert evaluate_images.main([str(real), str(gen), "--metrics", "ssim", "--ssim-size", "64", "--groups", "prompt",
                                 "--out", str(report)]) == 0
    groups = {g["name"]: (g["n_real"], g["n_generated"]) for g in json.loads(report.read_text())["groups"]}
    assert groups == {"all": (4, 4), "a cat": (2, 2), "a dog": (2, 2)}
    for i in range(4):
        (gen / f"{i:05d}.txt").unlink()
    assert evaluate_images.main([str(real), str(gen), "--metrics", "ssim", "--ssim-size", "64", "--groups", "auto",
                                 "--out", str(report)]) == 0
    assert {g["name"] for g in json.loads(report.read_text())["groups"]} == {"all", "a cat", "a dog"}


# --- Item 6: the evaluation table -------------------------------------------------------------------------------


def test_table_shows_group_sizes_whole_set_first_and_set_wide_values_once(tmp_path, capsys):
    """--groups auto -> prompt: a prompt with 1 real image, one with 3, one REAL lacks (compared with all 12) and a
    prompt named "all". The table: the whole set first, each row's sizes, the borrowed whole-set MS-SSIM of real
    pairs only in the row all (a footnote says why); the JSON keeps every value, marked, and the sizes."""
    rng = np.random.default_rng(1)
    real, gen = tmp_path / "real", tmp_path / "gen"
    real.mkdir()
    gen.mkdir()
    real_prompts = ["one"] + ["three"] * 3 + ["other"] * 8
    for i, prompt in enumerate(real_prompts):
        smooth(rng).save(real / f"r{i:02d}.png")
        (real / f"r{i:02d}.txt").write_text(prompt)
    for i, prompt in enumerate(["one", "one", "three", "three", "missing", "missing", "all", "all"]):
        smooth(rng).save(gen / f"{i:05d}.png")
        (gen / f"{i:05d}.txt").write_text(prompt)
    report = tmp_path / "r.json"
    status = evaluate_images.main([str(real), str(gen), "--metrics", "ssim,ms_ssim", "--ssim-size", "64",
                                   "--out", str(report), "--target", "ms_ssim_real_pairs<2"])
    assert status == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index(next(line for line in out if line.startswith("group")))
    assert out[header].split() == ["group", "n_real", "n_gen", "SSIM", "nn", "MS-SSIM", "gen", "MS-SSIM", "real"]
    table = {line.split()[0] if not line.startswith("all (") else "all (prompt)": line.split()
             for line in out[header + 2: header + 7]}
    assert out[header + 2].split()[0] == "all"  # the whole set first
    rep = json.loads(report.read_text())
    whole_real = next(r for r in rep["results"] if r["group"] == "all" and r["metric"] == "ms_ssim_real_pairs")
    assert table["all"][1:3] == ["12", "8"] and table["all"][-1] == f"{whole_real['value']:.4g}"
    assert table["one"][1:3] == ["1", "2"] and table["one"][-1] == "-"  # 1 real image: no pairs
    assert table["three"][1:3] == ["3", "2"] and table["three"][-1] not in ("-", table["all"][-1])  # its own
    assert table["missing"][1:3] == ["12*", "2"] and table["missing"][-1] == "-"  # the whole set's: row all only
    assert table["all (prompt)"][2:4] == ["12*", "2"]  # a prompt named "all" is not the whole set
    assert out[header + 7] == "* REAL has no image of this prompt: compared with all 12 real images (MS-SSIM real: " \
                              "see the row all)"
    targets = [line for line in out if line.startswith("target ms_ssim_real_pairs")]
    assert [line.split(" in ")[1].split(":")[0] for line in targets] == ["all", "three"]  # checked where it is own

    # The JSON report keeps every value (the borrowed one marked) and gains the groups' sizes and marks.
    groups = {g["name"]: g for g in rep["groups"]}
    assert [g["name"] for g in rep["groups"]][0] == "all"
    assert (groups["missing"]["n_real"], groups["missing"]["n_generated"], groups["missing"]["whole_real_set"]) == \
        (12, 2, True)
    assert groups["three"]["whole_real_set"] is False and groups["all (prompt)"]["whole_real_set"] is True
    borrowed = next(r for r in rep["results"] if r["group"] == "missing" and r["metric"] == "ms_ssim_real_pairs")
    assert borrowed["set_wide"] is True and borrowed["value"] == whole_real["value"] and "target" not in borrowed
    assert len(rep["results"]) == 5 * 3  # every group still has every metric's row
