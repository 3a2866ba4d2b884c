"""generate_images.py end to end on the tiny model (CPU): prompt files, the COCO-style folder, resume,
settings checks, bad input, and 2 gloo processes under torchrun == 1 process, byte for byte.

The CLI runs in-process (`generate_images.main(argv)`) except for the torchrun test. Images are 64x48
(width != height catches a swapped size), 3 steps: the point is the bookkeeping, not the pictures;
pixel parity with diffusers is tests/test_inference.py's.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import generate_images
from common.errors import PromptError
from sampling.config import build_parser, parse_args
from sampling.inference import ImageGenerator
from sampling.prompts import ImageJob, PromptSpec, plan_images, read_prompt_file
from sampling.writer import is_complete, missing_jobs, write_group

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--pretrained-model", "tiny", "--image-size", "64x48", "--num-inference-steps", "3"]


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        status = generate_images.main([*FAST, *map(str, argv)])
    except SystemExit as e:  # argparse's own errors (common.cli.Parser.error): one line, exit 2
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mtime_ns, bytes) of every file, hidden ones included."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def lora(tiny_dir, tmp_path_factory):
    from tests.test_inference import make_lora

    return make_lora(tiny_dir, tmp_path_factory.mktemp("lora") / "lora.safetensors")


# --- prompt files and the plan ------------------------------------------------------------------


def test_txt_prompt_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na red circle\n\n   \n  # indented comment\n  a blue square  \n", encoding="utf-8")
    assert read_prompt_file(path) == [PromptSpec("a red circle"), PromptSpec("a blue square")]


def test_jsonl_prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "negative_prompt": "dark", "seed": 7}\n\n{"prompt": "a dog"}\n')
    assert read_prompt_file(path) == [PromptSpec("a cat", "dark", 7), PromptSpec("a dog")]


@pytest.mark.parametrize("name,text,match", [
    ("p.txt", "# only a comment\n\n", "holds no prompts"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": 3}\n', r"line 2: needs a \"prompt\" string"),
    ("p.jsonl", '{"prompt": "a", "seed": -1}\n', "seed.*must be an integer"),
    ("p.jsonl", '{"prompt": "a", "steps": 3}\n', "unknown key 'steps'"),
    ("p.jsonl", "not json\n", "line 1: not valid JSON"),
    ("p.csv", "a\n", "unknown kind '.csv'"),
])  # fmt: skip
def test_bad_prompt_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptError, match=match):
        read_prompt_file(tmp_path / name)


def test_plan_cycles_prompts_with_seeds():
    specs = [PromptSpec("a"), PromptSpec("b", "ugly", 50)]
    jobs = plan_images(specs, 5, base_seed=10, negative_prompt="dark")
    assert [(j.index, j.prompt, j.negative_prompt, j.seed) for j in jobs] == [
        (0, "a", "dark", 10), (1, "b", "ugly", 50), (2, "a", "dark", 12), (3, "b", "ugly", 51), (4, "a", "dark", 14)]
    shuffled = plan_images([PromptSpec(str(i)) for i in range(8)], 16, base_seed=3, shuffle=True)
    order = [j.prompt for j in shuffled]
    assert order[:8] == order[8:] and sorted(order[:8]) == [str(i) for i in range(8)] and order[:8] != sorted(order[:8])
    assert order == [j.prompt for j in plan_images([PromptSpec(str(i)) for i in range(8)], 16, 3, shuffle=True)]
    assert [j.seed for j in shuffled] == list(range(3, 19))


# --- the output folder --------------------------------------------------------------------------


def test_group_is_complete_only_when_its_txt_is_in_place(tmp_path, monkeypatch):
    """A crash between the renames leaves a group without its .txt: not complete, so regenerated."""
    image, job = Image.new("RGB", (8, 8)), ImageJob(0, "p", "", 0)
    real_replace = os.replace

    def crash_on_txt(src, dst):
        if str(dst).endswith(".txt"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_txt)
    with pytest.raises(KeyboardInterrupt):
        write_group(tmp_path, 0, image, "p", {"prompt": "p"})
    assert (tmp_path / "00000.png").is_file() and not is_complete(tmp_path, 0)
    assert missing_jobs(tmp_path, [job], {}) == [job]
    monkeypatch.setattr(os, "replace", real_replace)
    write_group(tmp_path, 0, image, "p", None)
    assert is_complete(tmp_path, 0) and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "00000.png", "00000.txt"]


# --- the script ---------------------------------------------------------------------------------


def test_writes_coco_folder_and_resumes(tmp_path, capsys, lora):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na blue square\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--prompt-file", prompts, "--num-images", 5, "--batch-size", 2, "--seed", 100, "--negative-prompt",
            "blurry", "--lora-checkpoint", lora, "--lora-scale", 0.7, "--output-dir", out]
    status, stdout, err = run(capsys, *args)
    assert status == 0, err
    assert "done: 5 images" in stdout and "img/s" in err  # the summary and tqdm's rate
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:05d}.{ext}" for i in range(5) for ext in ("json", "png", "txt")] + ["captions.json"]
    coco = json.loads((out / "captions.json").read_text())  # no temporary files, no lock file; COCO captions:
    assert coco["images"][3] == {"id": 3, "file_name": "00003.png", "width": 64, "height": 48}
    assert [a["caption"] for a in coco["annotations"]] == ["a red circle", "a blue square"] * 2 + ["a red circle"]
    meta = json.loads((out / "00003.json").read_text())
    assert meta == {"format_version": 1, "index": 3, "file_name": "00003.png", "prompt": "a blue square",
                    "negative_prompt": "blurry", "seed": 103, "num_inference_steps": 3, "guidance_scale": 5.0,
                    "sampler": "euler", "width": 64, "height": 48, "base_model": "tiny", "vae_model": None,
                    "loras": [{"path": str(lora), "scale": 0.7}], "precision": "fp32"}
    assert [(out / f"{i:05d}.txt").read_text() for i in range(5)] == ["a red circle", "a blue square"] * 2 + [
        "a red circle"]

    # The PNG is the API's image for the same batch (indices 2 and 3), byte for byte in pixels.
    gen = ImageGenerator.from_pretrained("tiny", loras=[(lora, 0.7)])
    images = gen.generate_unique_batch(["a red circle", "a blue square"], [102, 103], ["blurry", "blurry"],
                                       width=64, height=48, steps=3)
    with Image.open(out / "00003.png") as png:
        assert png.size == (64, 48) and np.array_equal(np.asarray(png), np.asarray(images[1]))

    # Re-run: index 1 lost its .txt (a crash mid-group), index 3 is gone; only those two are made again.
    (out / "00001.txt").unlink()
    for ext in ("png", "json", "txt"):
        (out / f"00003.{ext}").unlink()
    before = snapshot(out)
    status, stdout, err = run(capsys, *args)
    assert status == 0, err
    assert "done: 2 images" in stdout and "3 already there" in stdout
    after = snapshot(out)
    assert sorted(after) == sorted([*before, "00001.txt", "00003.json", "00003.png", "00003.txt"])
    assert all(after[name] == before[name] for name in before if not name.startswith(("00001", "00003", "cap")))
    assert json.loads((out / "captions.json").read_text()) == coco  # listed again once complete
    with Image.open(out / "00003.png") as png:  # same seed and prompt; another batch: rounding at most
        assert np.abs(np.asarray(png).astype(int) - np.asarray(images[1]).astype(int)).max() <= 1

    status, stdout, _ = run(capsys, *args)
    assert status == 0 and "nothing to do: all 5 images" in stdout and snapshot(out) == after


@pytest.mark.parametrize("change,match", [
    (["--num-inference-steps", 4], "00000.json was made with num_inference_steps 3 but this run has 4"),
    (["--seed", 1], "seed 0 but this run has 1"),
    (["--image-size", 64], "height 48 but this run has 64"),
    (["--guidance-scale", 7], "guidance_scale 5.0"),
    (["--scheduler", "euler_a"], "sampler 'euler'"),
    (["--prompt", "another"], "prompt 'a cat'"),
])  # fmt: skip
def test_settings_mismatch_is_an_error_and_overwrite_remakes(tmp_path, capsys, change, match):
    out = tmp_path / "out"
    assert run(capsys, "--prompt", "a cat", "--num-images", 2, "--output-dir", out)[0] == 0
    before = snapshot(out)
    argv = ["--prompt", "a cat", "--num-images", 2, "--output-dir", out]
    argv = [*change, *argv] if change[0] != "--prompt" else [*change, *argv[2:]]
    status, _, err = run(capsys, *argv)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    assert "--overwrite" in err and snapshot(out) == before
    if change[0] == "--num-inference-steps":
        assert run(capsys, *argv, "--overwrite")[0] == 0
        assert json.loads((out / "00000.json").read_text())["num_inference_steps"] == 4


def test_jsonl_prompts_without_metadata(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "negative_prompt": "dark", "seed": 7}\n{"prompt": "a dog"}\n')
    out = tmp_path / "out"
    status, _, err = run(capsys, "--prompt_file", prompts, "--num_images", 3, "--no-save-metadata",
                         "--output_dir", out, "--batch_size", 3)
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.{e}" for i in range(3) for e in ("png", "txt")] + [
        "captions.json"]
    gen = ImageGenerator.from_pretrained("tiny")
    images = gen.generate_unique_batch(["a cat", "a dog", "a cat"], [7, 1, 8], ["dark", "", "dark"],
                                       width=64, height=48, steps=3)
    for i, image in enumerate(images):
        with Image.open(out / f"{i:05d}.png") as png:
            assert np.array_equal(np.asarray(png), np.asarray(image))


def test_underscore_and_dash_spellings_are_the_same_flags(tmp_path, lora):
    dashed = parse_args(["--pretrained-model", "tiny", "--prompt", "x", "--lora-checkpoint", str(lora),
                             "--lora-scale", "0.5", "--num-images", "2", "--image-size", "64", "--output-dir",
                             str(tmp_path), "--num-inference-steps", "2", "--guidance-scale", "3", "--shuffle-prompts",
                             "--no-save-metadata", "--batch-size", "2", "--negative-prompt", "n", "--seed", "4",
                             "--device", "cpu", "--precision", "fp32", "--scheduler", "ddim", "--overwrite"])
    under = parse_args(["--pretrained_model", "tiny", "--prompt", "x", "--lora_checkpoint", str(lora),
                            "--lora_scale", "0.5", "--num_images", "2", "--image_size", "64", "--output_dir",
                            str(tmp_path), "--num_inference_steps", "2", "--guidance_scale", "3", "--shuffle_prompts",
                            "--no-save_metadata", "--batch_size", "2", "--negative_prompt", "n", "--seed", "4",
                            "--device", "cpu", "--precision", "fp32", "--scheduler", "ddim", "--overwrite"])
    assert vars(dashed) == vars(under)
    assert (dashed.width, dashed.height, dashed.loras, dashed.save_metadata) == (64, 64, [(str(lora), 0.5)], False)
    help_text = build_parser().format_help()
    assert all(a.help for a in build_parser()._actions)  # help= on every flag
    for group in ("model:", "prompts:", "sampling:", "output:", "hardware:"):
        assert group in help_text


def bad_lora(tmp_path) -> Path:
    """A LoRA for another model: SD 1.5 has attentions in down_blocks.0, SDXL does not."""
    import torch
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "sd15_lora.safetensors"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 320), f"{key}.lora_up.weight": torch.zeros(320, 4),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    return path


BAD = [  # (argv after FAST and before --output-dir, text the error must contain)
    (["--prompt-file", "{tmp}/empty.txt"], "empty.txt: the file holds no prompts"),
    (["--prompt-file", "{tmp}/missing.txt"], "missing.txt: the file does not exist"),
    (["--prompt", "x", "--lora-checkpoint", "{tmp}/nope.safetensors"], "nope.safetensors: does not exist"),
    (["--prompt", "x", "--lora-checkpoint", "{bad_lora}"], "names no module of the"),
    (["--prompt", "x", "--image-size", "100"], "--image-size 100: 100 is not a positive multiple of 8"),
    (["--prompt", "x", "--image-size", "64x60"],
     "64x60: 60 is not a positive multiple of 8 (the VAE downsamples by 8); use e.g. 56 or 64"),
    (["--prompt", "x", "--num-inference-steps", "0"], "--num-inference-steps 0: must be in 1..1000"),
    (["--prompt", "x", "--guidance-scale", "-1"], "--guidance-scale -1.0: must be >= 0"),
    (["--prompt", "x", "--guidance-scale", "nan"], "--guidance-scale nan: must be a finite number"),
    (["--prompt", "x", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--prompt", "x", "--num-images", "0"], "--num-images 0: must be >= 1"),
    (["--prompt", "x", "--seed", "-3"], "--seed -3: must be in [0, 2^63"),
    (["--prompt", "x", "--scheduler", "heun"], "--scheduler heun: invalid choice"),
    (["--prompt", "x", "--num-images", "many"], "invalid int value: 'many'"),
    (["--prompt", "x", "--prompt-file", "{tmp}/empty.txt"], "not allowed with argument"),
    (["--num-images", "2"], "one of the arguments --prompt --prompt-file/--prompt_file is required"),
    (["--prompt", "x", "--lora-scale", "0.5"], "--lora-scale 0.5: needs a --lora-checkpoint"),
    (["--prompt", "x", "--lora-checkpoint", "{bad_lora}", "--lora-scale", "1", "--lora-scale", "2"],
     "2 scales for 1 --lora-checkpoint"),
    (["--prompt", "x", "--pretrained-model", "{tmp}/no_model"], "no_model: does not exist"),
    (["--prompt", "x", "--device", "tpu"], "--device tpu: must be auto, cpu, cuda or cuda:N"),
    (["--prompt", "x", "--device", "cpu", "--precision", "fp16"], "fp16 needs a CUDA GPU"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    fill = {"tmp": tmp_path, "bad_lora": bad_lora(tmp_path)}
    out = tmp_path / "out"
    status, stdout, err = run(capsys, *[a.format(**fill) for a in argv], "--output-dir", out)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken.png"
    out.write_bytes(b"not a folder")
    status, _, err = run(capsys, "--prompt", "x", "--output-dir", out)
    assert status == 2 and err.count("\n") == 1 and "taken.png: is an existing file; give a folder" in err
    assert out.read_bytes() == b"not a folder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    """Batches are formed in index order and dealt to ranks whole, so each image comes from a batch of the
    same composition as in one process: identical bytes (captions.json too: rank 0 lists every rank's images).
    OMP_NUM_THREADS=1 in both runs, since the float summation order of a CPU matmul may depend on the thread
    count (torchrun sets 1 per process anyway)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    argv = [*FAST, "--prompt-file", str(prompts), "--num-images", "5", "--batch-size", "2", "--scheduler", "euler_a"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(ROOT / "generate_images.py"), *argv, "--output-dir",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "done: 5 images" in two.stdout and "on 2 processes" in two.stdout
    one = subprocess.run([sys.executable, str(ROOT / "generate_images.py"), *argv, "--output-dir",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) == 16 and files == sorted(p.name for p in (tmp_path / "two").iterdir())  # + captions.json
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
