"""Silent failures found by fault injection (issue: faults-integrity), each now said in one line or a note: LoRA files
with NaN/Inf values (item 10), links out of the data folder (11), flipped bytes in a checkpoint (12), a full disk
while writing lora_final.safetensors (13), and what was cut or left behind without a word (14). Real files and real
processes; the full disk is a real small tmpfs in a user namespace where the machine allows one."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import extract_lora_weights
import families
import generate_images
import resume_training
from common.errors import CheckpointError
from lora.layer import LoRAConfig, lora_parameters, lora_state_dict
from lora.reading import read_lora
from sdxl.lora import apply_lora, load_lora, read_lora_file, save_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXLUNet
from training.run.checkpoints import MARKER, find_latest, load_checkpoint, lora_file_of, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--config", str(ROOT / "tests/data/tiny_run.yaml"), "--image_size", "64", "--batch_size", "4",
         "--validation_prompts", "--val_data_dir", "", "--log_interval", "1"]
GENERATE = ["--pretrained-model", "tiny", "--image-size", "64", "--num-inference-steps", "1", "--batch-size", "2",
            "--scheduler", "euler"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}, "OMP_NUM_THREADS": "1"}
CONFIG = LoRAConfig(rank=4, alpha=2.0, dropout=0.0, target_mode="attention")


def tiny_unet() -> SDXLUNet:
    torch.manual_seed(0)
    return SDXLUNet(TINY_UNET_CONFIG).eval()


def lora_unet(seed: int = 1) -> SDXLUNet:
    """The tiny UNet with a LoRA of random (trained-looking) values."""
    unet = tiny_unet()
    apply_lora(unet, CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet


def one_line_error(err: str) -> str:
    line = err[err.index("error: "):]  # after any progress bar
    assert line.count("\n") == 1 and "Traceback" not in err, err
    return line


# --- Item 10: a LoRA with NaN or Inf values is refused by every reader, naming the key. ---------------------------


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Damaged LoRA files of the tiny model: name -> (file, the key the error must name)."""
    folder = tmp_path_factory.mktemp("loras")
    unet = lora_unet()
    good = save_lora(unet, folder / "good.safetensors", CONFIG)
    tensors = load_file(good)
    with safe_open(str(good), framework="pt") as f:
        metadata = f.metadata()
    ups = sorted(k for k in tensors if k.endswith(".lora_up.weight"))
    downs = sorted(k for k in tensors if k.endswith(".lora_down.weight"))
    alphas = sorted(k for k in tensors if k.endswith(".alpha"))
    cases = {}

    def damaged(name: str, key: str, change, meta=metadata, source=tensors):
        t = {k: v.clone() for k, v in source.items()}
        change(t[key]) if key in t else None
        save_file(t, folder / f"{name}.safetensors", metadata=meta)
        cases[name] = (folder / f"{name}.safetensors", key)

    damaged("one_nan", ups[3], lambda t: t.view(-1)[5].fill_(float("nan")))
    damaged("inf_layer", downs[1], lambda t: t.fill_(float("inf")))
    damaged("nan_alpha", alphas[0], lambda t: t.fill_(float("nan")))
    diffusers = save_lora(unet, folder / "diffusers.safetensors", CONFIG, format="diffusers")
    with safe_open(str(diffusers), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"]) | {"unet.lora_alpha": float("nan")}
    damaged("nan_lora_alpha", "lora_adapter_metadata", lambda t: None, {**meta, "lora_adapter_metadata":
            json.dumps(config)}, load_file(diffusers))
    return cases


@pytest.mark.parametrize("case", ["one_nan", "inf_layer", "nan_alpha", "nan_lora_alpha"])
def test_a_lora_with_nan_or_inf_is_refused_by_every_reader(lora_files, case, capsys):
    path, key = lora_files[case]
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    readers = {"load_lora": lambda: load_lora(unet, path), "read_lora_file": lambda: read_lora_file(path, "tiny"),
               "read_lora": lambda: read_lora(path, families.lora_names()),
               "families.read_lora": lambda: families.read_lora(path, "tiny")}
    expected = "alpha of key" if case == "nan_lora_alpha" else f"key {key} holds"
    for name, read in readers.items():
        with pytest.raises(ValueError) as e:
            read()
        message = str(e.value)
        assert str(path) in message and expected in message and "\n" not in message, (name, message)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # nothing merged
    capsys.readouterr()
    out = path.with_name(f"{case}_converted.safetensors")
    assert extract_lora_weights.main([str(path), "-o", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(path) in line and expected in line and not out.exists(), line


def test_the_messages_count_what_is_not_finite(lora_files):
    path, key = lora_files["one_nan"]
    with pytest.raises(ValueError, match=rf"key {key} holds 1 NaN value \(of \d+\); the LoRA is damaged"):
        read_lora_file(path, "tiny")
    path, key = lora_files["inf_layer"]
    with pytest.raises(ValueError, match=rf"key {key} holds (\d+) Inf values \(of \1\)"):
        read_lora_file(path, "tiny")


def test_generate_images_refuses_a_nan_lora_with_exit_2(lora_files, tmp_path, capsys):
    path, key = lora_files["one_nan"]
    out = tmp_path / "images"
    status = generate_images.main([*GENERATE, "--prompt", "a red circle", "--num-images", "1", "--lora-checkpoint",
                                   str(path), "--output-dir", str(out)])
    line = one_line_error(capsys.readouterr().err)
    assert status == 2 and f"key {key} holds 1 NaN value" in line, line
    assert not out.exists() or not list(out.glob("*.png"))


def test_a_pt_lora_and_a_checkpoint_with_nan_are_refused(tmp_path, capsys):
    sd = lora_state_dict(lora_unet())
    key = sorted(sd)[2]
    sd[key].view(-1)[0] = float("inf")
    torch.save(sd, tmp_path / "old.pt")
    assert extract_lora_weights.main([str(tmp_path / "old.pt"), "-o", str(tmp_path / "x.safetensors")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"old.pt: key {key} holds 1 Inf value" in line, line
    # a checkpoint written before checksums (COMPLETE without them) whose LoRA file was damaged on disk
    state = {"step": 1, "epoch": 0, "position": 1, "micro_step": 1, "last_loss": 0.5}
    folder = save_checkpoint(tmp_path / "run", 1, lora_state_dict(lora_unet()), state, "pretrained_model: tiny\n",
                             CONFIG)
    (folder / MARKER).write_text("schema_version: 2\nstep: 1\n")
    tensors = load_file(folder / "lora.safetensors")
    with safe_open(str(folder / "lora.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    name = sorted(tensors)[0]
    tensors[name].view(-1)[1] = float("nan")
    save_file(tensors, folder / "lora.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"lora.safetensors: key {name} holds 1 NaN"):
        load_checkpoint(folder)
    assert extract_lora_weights.main([str(folder), "-o", str(tmp_path / "y.safetensors")]) == 2
    assert f"key {name} holds 1 NaN value" in one_line_error(capsys.readouterr().err)


# --- Items 12 and 13: one short real run, the reference. ----------------------------------------------------------

RUN = [*TRAIN, "--max_train_steps", "2", "--save_interval", "1", "--use_ema", "--ema_decay", "0.9"]


def train(out: Path, *extra, cwd=ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), *RUN, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=900)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A 2-step tiny run with EMA and a checkpoint after each step (never changed: tests copy it)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = train(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def flip_a_tensor_byte(path: Path) -> None:
    """One byte in the middle of a file's tensor data changed (after a safetensors header: the file still loads)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else len(data) // 4
    data[(start + len(data)) // 2] ^= 0x40
    path.write_bytes(bytes(data))


# --- Item 12: a checkpoint file changed on disk is found by its SHA-256 and skipped. -------------------------------


def small_run(folder: Path, steps: int = 2) -> list[Path]:
    """Checkpoints of a LoRA at steps 1..steps (in-process, no training), with EMA."""
    for step in range(1, steps + 1):
        state = {"step": step, "epoch": 0, "position": step, "micro_step": step, "last_loss": 0.5}
        save_checkpoint(folder, step, lora_state_dict(lora_unet(step)), state, "pretrained_model: tiny\n", CONFIG,
                        ema=lora_state_dict(lora_unet(10 + step)))
    return sorted((folder / "checkpoints").iterdir())


@pytest.mark.parametrize("name", ["lora.safetensors", "ema.safetensors", "training_state.pt", "config.yaml"])
def test_a_changed_byte_in_the_newest_checkpoint_is_found_and_skipped(tmp_path, caplog, capsys, name):
    first, newest = small_run(tmp_path)
    assert yaml.safe_load((newest / MARKER).read_text())["sha256"].keys() == {
        "lora.safetensors", "ema.safetensors", "training_state.pt", "config.yaml"}
    assert load_checkpoint(newest).checksums  # verified
    if name == "config.yaml":
        (newest / name).write_text((newest / name).read_text().replace("tiny", "tinY"))
    else:
        flip_a_tensor_byte(newest / name)
    if name.endswith(".safetensors"):
        load_file(newest / name)  # still a loadable file: only the checksum tells
    with caplog.at_level("WARNING"):
        latest = find_latest(tmp_path)
    assert latest.path == first and latest.state["step"] == 1
    assert f"skipping step_000002: {newest / name} is not the file that was written (its SHA-256 differs" in caplog.text
    with pytest.raises(CheckpointError, match=f"{newest / name} is not the file that was written"):
        load_checkpoint(newest)
    # resume_training.py: --inspect of the run (its latest) and --find-latest take step 1; of the folder: exit 2
    assert resume_training.main(["--inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(str(first)) and "checksums    SHA-256 of 4 files verified" in out
    assert resume_training.main(["--find-latest", str(tmp_path)]) == 0 and capsys.readouterr().out == f"{first}\n"
    assert resume_training.main(["--inspect", str(newest)]) == 2
    assert f"{newest / name} is not the file that was written" in one_line_error(capsys.readouterr().err)
    if name in ("lora.safetensors", "ema.safetensors"):  # generate_images/load_lora(folder) use the EMA file
        if name == "lora.safetensors":
            assert lora_file_of(newest) == newest / "ema.safetensors"
        else:
            with pytest.raises(ValueError, match="ema.safetensors is not the file that was written"):
                lora_file_of(newest)
        assert extract_lora_weights.main([str(newest), "-o", str(tmp_path / "x.safetensors")]) == 2
        assert "is not the file that was written" in one_line_error(capsys.readouterr().err)


def test_a_checkpoint_without_checksums_still_loads_and_says_so(tmp_path, capsys):
    _, newest = small_run(tmp_path)
    (newest / MARKER).write_text("schema_version: 2\nstep: 2\n")  # as written before the checksums
    flip_a_tensor_byte(newest / "lora.safetensors")  # cannot be told: loads unchecked
    assert find_latest(tmp_path).path == newest and load_checkpoint(newest).checksums == {}
    assert resume_training.main(["--inspect", str(newest)]) == 0
    assert "checksums    none recorded (written before checkpoints had them)" in capsys.readouterr().out
    (newest / MARKER).write_text("schema_version: 2\nstep: 2\nsha256: [\n")  # a damaged marker
    with pytest.raises(CheckpointError, match=f"{newest / MARKER} is damaged"):
        load_checkpoint(newest)


@pytest.mark.slow
def test_resume_after_a_flipped_byte_falls_back_and_ends_bit_exact(reference, tmp_path):
    """A flipped LoRA value in the newest checkpoint: `--resume_from latest` warns, naming the file, resumes from the
    one before, and ends with the uninterrupted run's LoRA bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "lora_final.safetensors").unlink()
    newest = run / "checkpoints/step_000002"
    flip_a_tensor_byte(newest / "lora.safetensors")
    done = train(run, "--resume_from", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"skipping step_000002: {newest / 'lora.safetensors'} is not the file that was written"
            in done.stderr), done.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints/step_000001'} at step 1" in done.stdout
    assert same_tensors(run / "lora_final.safetensors", reference / "lora_final.safetensors")
    assert load_checkpoint(newest).checksums  # rewritten whole by the resumed run


# --- Item 13: a full disk while lora_final.safetensors is written; `--resume_from latest` then writes it. ----------

FULL_DISK = '''
import json, os, subprocess, sys
from pathlib import Path
mnt, budget, result, cmd = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
st = os.statvfs(mnt)
with open(mnt / "filler", "wb") as f:  # leave `budget` bytes free
    f.write(b"\\0" * (st.f_bavail * st.f_frsize - budget))
runs = [subprocess.run(cmd, capture_output=True, text=True)]  # the disk fills while lora_final is written
(mnt / "filler").unlink()  # "free disk space, then continue with --resume_from latest"
final = mnt / "run" / "lora_final.safetensors"
runs.append(subprocess.run(cmd + ["--resume_from", "latest"], capture_output=True, text=True))
first = final.stat() if final.exists() else None
runs.append(subprocess.run(cmd + ["--resume_from", "latest"], capture_output=True, text=True))  # nothing to do
same = first is not None and (final.stat().st_ino, final.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
names = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
if final.exists():
    (result.parent / "final.safetensors").write_bytes(final.read_bytes())
result.write_text(json.dumps({"runs": [(r.returncode, r.stdout, r.stderr) for r in runs], "unchanged": same,
                              "names": names}))
'''


@pytest.mark.slow
def test_a_full_disk_while_writing_lora_final_then_resume_writes_it(reference, tmp_path):
    """A real tmpfs with room for the whole run but half of lora_final: one line naming lora_final (exit 2); after
    freeing space, `--resume_from latest` writes it from the last checkpoint's EMA weights, equal to the
    uninterrupted run's bit for bit, and says so; once more: nothing to do, nothing written."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a small file system here (unshare -rm: no user namespaces)")
    page = 4096
    used = sum(-(-p.stat().st_size // page) * page for p in reference.rglob("*")
               if p.is_file() and p.name != "lora_final.safetensors")
    final_size = (reference / "lora_final.safetensors").stat().st_size
    mnt, result = tmp_path / "mnt", tmp_path / "result.json"
    mnt.mkdir()
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), *RUN, "--output_dir", str(mnt / "run")]
    script = (f"mount -t tmpfs -o size=64m tmpfs {mnt} && {sys.executable} {tmp_path / 'full_disk.py'} {mnt} "
              f"{used + final_size // 2} {result} {shlex.quote(json.dumps(cmd))}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=1800,
                          cwd=ROOT, env=ENV)
    assert done.returncode == 0 and result.exists(), done.stderr[-3000:]
    report = json.loads(result.read_text())
    (full, _, full_err), (again, again_out, again_err), (third, third_out, _) = report["runs"]
    run = mnt / "run"
    assert full == 2, full_err[-3000:]
    line = full_err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {run}/lora_final.safetensors: No space left on device; the latest "
                           f"complete checkpoint {run}/checkpoints/step_000002 is intact"), line
    assert "continue with --resume_from latest" in line and "Traceback" not in full_err
    assert again == 0, again_err[-3000:]
    assert (f"the run is already finished ({run}/checkpoints/step_000002 is at step 2 of 2) but lora_final.safetensors "
            f"was missing (its write failed?): wrote {run}/lora_final.safetensors from that checkpoint's EMA weights"
            in again_out), again_out
    assert same_tensors(tmp_path / "final.safetensors", reference / "lora_final.safetensors")
    assert third == 0 and "the run is already finished" in third_out and "nothing to do" in third_out
    assert report["unchanged"]  # the third run wrote nothing
    assert not [n for n in report["names"] if ".tmp-" in n or ".old-" in n]


def test_final_files_of_a_finished_run_are_written_once(tmp_path, capsys):
    """training/run/plan.py on checkpoints made in-process: without EMA the trained weights; lora_best from
    checkpoints/best with --keep_best; with every file there, AlreadyFinished and nothing written."""
    from common.errors import AlreadyFinished
    from training.run.checkpoints import checkpoint_lora
    from training.run.plan import finish_files, missing_final_files

    state = {"step": 3, "epoch": 0, "position": 3, "micro_step": 3, "last_loss": 0.5}
    lora = lora_state_dict(lora_unet(3))
    save_checkpoint(tmp_path, 3, lora, state, "pretrained_model: tiny\n", CONFIG)
    save_checkpoint(tmp_path, 2, lora_state_dict(lora_unet(4)), {**state, "step": 2}, "pretrained_model: tiny\n",
                    CONFIG, name="best", metadata={"sdxl_lora.best_metric": "kid"})
    checkpoint = load_checkpoint(tmp_path / "checkpoints/step_000003")
    assert missing_final_files(tmp_path, "none") == ["lora_final.safetensors"]
    assert missing_final_files(tmp_path, "kid") == ["lora_final.safetensors", "lora_best.safetensors"]
    written = finish_files(checkpoint, 3, tmp_path, "kohya", "kid")
    assert written == [tmp_path / "lora_final.safetensors", tmp_path / "lora_best.safetensors"]
    out = capsys.readouterr().out
    assert "wrote" in out and "EMA" not in out and "lora_best.safetensors was missing" in out
    want = checkpoint_lora(checkpoint).modules
    got = read_lora_file(tmp_path / "lora_final.safetensors", "tiny")[0]
    assert got.keys() == want.keys() and all(torch.equal(got[k][i], want[k][i]) for k in want for i in (0, 1))
    best = load_file(tmp_path / "lora_best.safetensors")
    with safe_open(str(tmp_path / "lora_best.safetensors"), framework="pt") as f:
        assert f.metadata()["sdxl_lora.best_metric"] == "kid"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("*.safetensors")}
    with pytest.raises(AlreadyFinished, match="nothing to do"):
        finish_files(checkpoint, 3, tmp_path, "kohya", "kid")
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("*.safetensors")} == before
    assert load_file(tmp_path / "lora_best.safetensors").keys() == best.keys()


# --- Item 11: links out of the data folder are skipped, named and counted; links inside keep working. -------------

SECRET = "root:x:0:0:SECRET-CONTENT:/root:/bin/bash"


def linked_folder(tmp_path: Path) -> Path:
    """data/ with a plain image, links inside it (image and caption), and links out: an image, a caption file (to a
    'passwd'), metadata.jsonl, a folder; an empty caption file; a 1,200-word caption."""
    outside, data = tmp_path / "outside", tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "passwd").write_text(SECRET + "\n")
    Image.new("RGB", (64, 64), "purple").save(outside / "far.png")
    (outside / "metadata.jsonl").write_text(json.dumps({"file_name": "plain.png", "text": "SECRET-METADATA"}) + "\n")
    colours = {"plain": "red", "secret": "blue", "empty": "green", "long": "yellow", "sub/real": "white"}
    for name, colour in colours.items():
        Image.new("RGB", (64, 64), colour).save(data / f"{name}.png")
    (data / "plain.txt").write_text("a red square")
    (data / "secret.txt").symlink_to(outside / "passwd")  # the caption of a real image, a link out
    (data / "empty.txt").write_text("")
    (data / "long.txt").write_text(" ".join(["a yellow square"] * 400))  # 1,200 words
    (data / "sub/real.txt").write_text("a white square")
    (data / "inside.png").symlink_to(data / "sub/real.png")  # links that stay inside
    (data / "inside.txt").symlink_to("sub/real.txt")
    (data / "far.png").symlink_to(outside / "far.png")  # an image link out
    (data / "metadata.jsonl").symlink_to(outside / "metadata.jsonl")
    (data / "elsewhere").symlink_to(outside, target_is_directory=True)  # a folder link out (skipped before)
    return data


def test_links_out_of_the_data_folder_are_skipped_and_counted(tmp_path, caplog):
    from training.data.datasets import build_dataset

    data = linked_folder(tmp_path)
    outside = tmp_path / "outside"
    with caplog.at_level("WARNING"):
        dataset = build_dataset(data, resolution=64, batch_size=1)
    captions = {r.key: r.caption for r in dataset.scan.records}
    assert sorted(captions) == ["empty.png", "inside.png", "long.png", "plain.png", "sub/real.png"]
    assert captions["inside.png"] == captions["sub/real.png"] == "a white square"  # links inside: followed
    assert captions["plain.png"] == "a red square"  # from plain.txt: the linked metadata.jsonl is not read
    assert not any("SECRET" in c for c in captions.values())
    summary = dataset.summary()
    assert sorted(summary["links_outside"]) == sorted([
        (str(data / "elsewhere"), str(outside)), (str(data / "far.png"), str(outside / "far.png")),
        (str(data / "metadata.jsonl"), str(outside / "metadata.jsonl")),
        (str(data / "secret.txt"), str(outside / "passwd"))])
    assert summary["empty_captions"] == [str(data / "empty.png")] and summary["bad_files"] == []
    text = caplog.text
    for expected in (f"skipping {data / 'far.png'}: a link to {outside / 'far.png'}, outside {data}",
                     f"skipping {data / 'metadata.jsonl'}: a link to {outside / 'metadata.jsonl'}, outside {data}",
                     f"skipping {data / 'secret.png'}: its caption {data / 'secret.txt'} is a link to "
                     f"{outside / 'passwd'}, outside {data}",
                     f"skipping {data / 'elsewhere'}: a link to {outside}, outside",
                     f"note: 1 of 5 images have an empty caption ({data / 'empty.png'}); they train with an empty "
                     "caption"):
        assert expected in text, (expected, text)
    assert "SECRET" not in text


@pytest.mark.parametrize("where", ["beside", "mask_dir"])
def test_a_mask_linked_out_of_its_folder_skips_its_image(tmp_path, caplog, where):
    from training.data.datasets import build_dataset
    from training.data.masks import MaskSource

    data, masks, outside = tmp_path / "data", tmp_path / "masks", tmp_path / "outside"
    for folder in (data, masks, outside):
        folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), "red").save(data / f"{name}.png")
    Image.new("L", (64, 64), 255).save(outside / "mask.png")
    Image.new("L", (64, 64), 128).save(masks / "kept.png")
    folder, suffix = (data, "_mask.png") if where == "beside" else (masks, ".png")
    (folder / f"a{suffix}").symlink_to(outside / "mask.png")  # out: a is skipped
    (folder / f"b{suffix}").symlink_to(masks / "kept.png" if where == "mask_dir" else data / "c.png")  # inside
    source = MaskSource(masks if where == "mask_dir" else None)
    with caplog.at_level("WARNING"):
        dataset = build_dataset(data, resolution=64, batch_size=1, masks=source)
    assert sorted(r.key for r in dataset.scan.records) == ["b.png", "c.png"]
    assert (str(folder / f"a{suffix}"), str(outside / "mask.png")) in dataset.summary()["links_outside"]
    assert (f"skipping {data / 'a.png'}: its mask {folder / f'a{suffix}'} is a link to {outside / 'mask.png'}, "
            "outside") in caplog.text


# --- Item 14: cut prompts and captions, empty captions and cache temporaries are said or cleared. ----------------


def test_cut_prompts_are_counted_for_clip_and_t5():
    from diffusion.prompt_limits import cut_note, token_count

    text_encoder = families.get("sd3").load_text_encoder("tiny-sd3", dtype=torch.float32, device="cpu")
    assert [(label, n) for label, _, n in text_encoder.token_limits()] == [("CLIP", 77), ("T5", 32)]
    prompts = ["a red circle", "a blue square " * 10, "word " * 1000, "a red circle"]
    note = cut_note(text_encoder, prompts, ["a", "b", "c", "a"], "captions")
    clip, t5 = (token_count(text_encoder.tokenizer, prompts[2]), token_count(text_encoder.tokenizer_3, prompts[2]))
    assert note == (f"note: 2 of 4 captions are longer than CLIP's 77 tokens and are cut (the longest, c, has {clip} "
                    f"tokens); 1 of 4 captions is longer than T5's 32 tokens and is cut (the longest, c, has {t5} "
                    "tokens): the text past a limit is not read")
    assert cut_note(text_encoder, ["a red circle"]) is None


def test_a_long_prompt_is_noted_once_per_generation_run(tmp_path, capsys):
    long = "a red circle on a white background, " * 140  # 5,000 characters
    argv = [*GENERATE, "--prompt", long, "--prompt", "a blue square", "--num-images", "4"]
    assert generate_images.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("note: ") == 1, out
    assert "note: 1 of 2 prompts is longer than CLIP's 77 tokens and is cut (the longest, image 00000, has " in out
    assert generate_images.main([*GENERATE, "--prompt", "a blue square", "--num-images", "1", "--output-dir",
                                 str(tmp_path / "short")]) == 0
    assert "note:" not in capsys.readouterr().out


def killed_writer_temporary(folder: Path, name: str) -> Path:
    """The 0-byte temporary a process killed (-9) while writing `name` in `folder` leaves (common/files.py)."""
    code = ("import os, sys, time\nfrom pathlib import Path\n"
            f"Path({str(folder)!r}, '.{name}.tmp-' + str(os.getpid())).write_bytes(b'')\n"
            "print('ready', flush=True)\ntime.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return folder / f".{name}.tmp-{proc.pid}"


def test_cache_temporaries_of_killed_writers_are_cleared_but_not_of_live_ones(tmp_path):
    from training.loop.caching import clear_cache_temporaries

    (tmp_path / "latents").mkdir()
    (tmp_path / "text").mkdir()
    dead = [killed_writer_temporary(tmp_path / part, "0123abcd.safetensors") for part in ("latents", "text")]
    live = tmp_path / "latents" / f".feed.safetensors.tmp-{os.getpid()}"  # a writer still at work
    live.write_bytes(b"")
    kept = tmp_path / "latents" / "0123abcd.safetensors"
    kept.write_bytes(b"entry")
    assert all(p.exists() for p in dead)
    clear_cache_temporaries(tmp_path)
    assert not any(p.exists() for p in dead) and live.exists() and kept.exists()


@pytest.mark.slow
def test_training_on_a_linked_folder_publishes_nothing_from_outside_and_notes_what_is_cut(tmp_path):
    """A real run on `linked_folder` with a disk latent cache: the links out are named and counted, nothing of the
    linked 'passwd' reaches lora_final.safetensors (ss_tag_frequency), the long and empty captions are noted once;
    a resume clears the 0-byte cache temporary a killed writer left."""
    data, out = linked_folder(tmp_path), tmp_path / "run"
    flags = [*TRAIN, "--data_dir", str(data), "--batch_size", "1", "--save_interval", "1", "--cache_latents", "disk",
             "--output_dir", str(out)]
    cmd = [sys.executable, str(ROOT / "train_sdxl.py"), *flags]
    first = subprocess.run([*cmd, "--max_train_steps", "1"], capture_output=True, text=True, cwd=ROOT, env=ENV,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"its caption {data / 'secret.txt'} is a link to {tmp_path / 'outside/passwd'}" in first.stderr
    assert first.stderr.count("note: 1 of 5 images have an empty caption") == 1
    assert first.stdout.count("note: ") == 1 and "note: 1 of 5 captions is longer than CLIP's 77 tokens and is " \
        f"cut (the longest, {data / 'long.png'}, has " in first.stdout, first.stdout
    assert "links_outside 4" in first.stdout and "missing_captions 0" in first.stdout
    with safe_open(str(out / "lora_final.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert not any("SECRET" in v or "root:x" in v for v in metadata.values())
    tags = json.loads(metadata["ss_tag_frequency"])["data"]
    assert tags["a white square"] == 2 and tags["a red square"] == 1  # the links inside the folder count
    stale = killed_writer_temporary(out / "cache/latents", "ffff0000.safetensors")
    again = subprocess.run([*cmd, "--max_train_steps", "2", "--resume_from", "latest"], capture_output=True,
                           text=True, cwd=ROOT, env=ENV, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not stale.exists() and not [p for p in (out / "cache").rglob(".*") if ".tmp-" in p.name]
