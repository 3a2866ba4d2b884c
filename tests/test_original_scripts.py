"""Habits of the original scripts' users: --use_lora, --resolution, .pt LoRA files, RUN/checkpoints/latest.

Fast and model-free except the .pt conversion, which reads the tiny UNet's config only. The reference for a
converted .pt file is its own tensors: the LoRA file written from it holds the same down/up weights exactly
(fp32) and the alphas the .pt stated (or the rank, or --alpha).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import extract_lora_weights
from common.errors import ConfigError
from families import read_lora
from sampling.config import parse_args as parse_generate_args
from training.config import parse_config, resolved_config_yaml
from training.run.folder import output_dir_of

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--data_dir", str(ROOT / "data/demo/train"), "--pretrained_model", "tiny"]
TINY_MODULES = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # tiny UNet Linears
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")


def test_use_lora_is_accepted_and_says_once_that_lora_is_always_on(tmp_path, capsys):
    args = parse_config([*BASE, "--output_dir", str(tmp_path), "--use_lora"])
    err = capsys.readouterr().err
    assert err.count("--use_lora does nothing") == 1 and err.count("\n") == 1
    assert not hasattr(args, "use_lora") and "\nuse_lora:" not in resolved_config_yaml(args)
    parse_config([*BASE, "--output_dir", str(tmp_path)])
    assert capsys.readouterr().err == ""  # without the flag: nothing said


def test_resolution_is_the_image_size_everywhere(tmp_path, capsys):
    assert parse_config([*BASE, "--output_dir", str(tmp_path), "--resolution", "512"]).image_size == 512
    config = tmp_path / "old.yaml"
    config.write_text("resolution: 256\n")  # a YAML key of the old name
    assert parse_config(["--config", str(config), *BASE, "--output_dir", str(tmp_path)]).image_size == 256
    gen = parse_generate_args(["--pretrained-model", "tiny", "--prompt", "a", "--output-dir", str(tmp_path / "g"),
                               "--resolution", "64x128"])
    assert (gen.width, gen.height) == (64, 128)
    from sdxl.check import parse_args as parse_check_args

    for flag in ("--resolution", "--image_size"):
        assert parse_check_args([flag, "64"]).image_size == 64


def test_checkpoints_latest_names_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert output_dir_of(run / "checkpoints" / "latest") == run
    assert output_dir_of(f"{run}/checkpoints/latest/") == run


def tiny_lora_modules() -> dict[str, tuple[int, int]]:
    """module path -> (in, out) features of a few Linears of the tiny UNet (built on the meta device)."""
    from sdxl.tiny import TINY_UNET_CONFIG
    from sdxl.unet import SDXLUNet

    with torch.device("meta"):
        modules = dict(SDXLUNet(TINY_UNET_CONFIG).named_modules())
    return {name: (modules[name].in_features, modules[name].out_features) for name in TINY_MODULES}


def run_extract(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = extract_lora_weights.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("naming", ["state_dict", "old_processors"])
def test_a_pt_lora_of_the_original_scripts_converts_exactly(tmp_path, capsys, naming):
    g = torch.Generator().manual_seed(0)
    shapes, rank, tensors, expected = tiny_lora_modules(), 4, {}, {}
    for i, (module, (fan_in, fan_out)) in enumerate(shapes.items()):
        down, up = torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g)
        expected[module] = (down, up, 2.0 if i == 0 else 3.0)  # module 0 states alpha 2; the others get --alpha 3
        if naming == "state_dict":
            tensors |= {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up}
            if i == 0:
                tensors[f"{module}.alpha"] = torch.tensor(2.0)
        else:  # diffusers' old attention processors: no alphas
            parent, _, proj = module.removesuffix(".0").rpartition(".")
            tensors |= {f"unet.{parent}.processor.{proj}_lora.down.weight": down,
                        f"unet.{parent}.processor.{proj}_lora.up.weight": up}
            expected[module] = (down, up, 3.0)
    pt, out = tmp_path / "old.pt", tmp_path / "new.safetensors"
    torch.save(tensors, pt)
    code, stdout, err = run_extract(capsys, pt, "-o", out, "--alpha", "3")
    assert code == 0, err
    assert "original .pt file" in stdout
    weights = read_lora(out, base="tiny")
    assert set(weights.modules) == set(expected)
    for module, (down, up, alpha) in expected.items():
        got_down, got_up, got_alpha = weights.modules[module]
        assert torch.equal(got_down, down) and torch.equal(got_up, up) and got_alpha == alpha, module


def test_a_pt_that_is_not_plain_tensors_is_refused_and_never_run(tmp_path, capsys):
    witness = tmp_path / "witness"

    class Evil:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    cases = {"evil.pt": {"x.lora_down.weight": Evil()}, "nested.pt": {"state_dict": {"a": torch.zeros(1)}},
             "odd_key.pt": {"model.weight": torch.zeros(2, 2)}}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        code, out, err = run_extract(capsys, tmp_path / name, "-o", tmp_path / f"{name}.safetensors")
        assert code == 2 and out == "" and err.startswith(f"error: {tmp_path / name}") and err.count("\n") == 1, err
    assert not witness.exists()


def test_generate_images_names_the_convert_command_for_a_pt(tmp_path):
    pt = tmp_path / "old.pt"
    torch.save({"a.lora_down.weight": torch.zeros(1, 1)}, pt)
    with pytest.raises(ConfigError) as e:
        parse_generate_args(["--pretrained-model", "tiny", "--prompt", "a", "--output-dir", str(tmp_path / "g"),
                             "--lora-checkpoint", str(pt)])
    assert f"python extract_lora_weights.py {pt} -o {tmp_path / 'old.safetensors'}" in str(e.value)
    run = subprocess.run([sys.executable, str(ROOT / "generate_images.py"), "--pretrained-model", "tiny", "--prompt",
                          "a", "--output-dir", str(tmp_path / "g"), "--lora-checkpoint", str(pt)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "extract_lora_weights.py" in run.stderr
