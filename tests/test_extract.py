"""extract_lora_weights.py: weights-only LoRA files from checkpoint folders, and format conversions.

Oracle: our `load_lora` of the checkpoint folder's own file. Exact (torch.equal) where no arithmetic is
involved: a checkpoint or kohya file to kohya (fp32), diffusers to diffusers or kohya. Writing the diffusers
format folds alpha / rank into lora_B (one fp32 multiplication per weight, here by 0.5: exact too, but
the tests do not rely on it): merged UNet weights are compared with rel. L2 < 1e-6 (one rounding of
W + dW, ~6e-8). Checkpoints are built in-process with save_checkpoint (no training run needed).
"""

import functools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import extract_lora_weights
from lora.files import LoRAWeights, write_lora
from lora.layer import LoRAConfig, lora_parameters, lora_state_dict
from sdxl.configs import unet_config_to_diffusers
from sdxl.lora import apply_lora, load_lora, lora_names, lora_target_names, read_lora_file
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet
from training.run.checkpoints import lora_file_of, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = LoRAConfig(rank=4, alpha=2.0, dropout=0.1, target_mode="attention_out")
RUN_CONFIG = "pretrained_model: tiny\nseed: 3\nlearning_rate: 0.0001\nimage_size: 64\n"
TINY = unet_config_to_diffusers(TINY_UNET_CONFIG)


def tiny_unet() -> SDXLUNet:
    torch.manual_seed(0)
    return SDXLUNet(TINY_UNET_CONFIG).eval()


def trained_lora(seed: int) -> dict[str, torch.Tensor]:
    unet = tiny_unet()
    apply_lora(unet, CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in lora_state_dict(unet).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint with EMA weights (different from its LoRA weights) of a tiny-model run at step 7."""
    out = tmp_path_factory.mktemp("run")
    state = {"step": 7, "epoch": 0, "position": 7, "micro_step": 7, "last_loss": 0.5}
    return save_checkpoint(out, 7, trained_lora(1), state, RUN_CONFIG, CONFIG, ema=trained_lora(2))


@pytest.fixture(scope="module")
def checkpoint_without_ema(tmp_path_factory):
    state = {"step": 3, "epoch": 0, "position": 3, "micro_step": 3, "last_loss": 0.5}
    return save_checkpoint(tmp_path_factory.mktemp("run"), 3, trained_lora(3), state, RUN_CONFIG, CONFIG)


def run(*argv) -> int:
    try:
        return extract_lora_weights.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        return e.code


@functools.cache
def base_unet() -> tuple[SDXLUNet, dict[str, torch.Tensor]]:
    unet = tiny_unet()
    return unet, {k: v.clone() for k, v in unet.state_dict().items()}


def merged(path) -> dict[str, torch.Tensor]:
    """The tiny UNet's weights after `load_lora` of a file, or of a checkpoint folder's `lora_file_of` (one UNet,
    reset each time: fast)."""
    unet, weights = base_unet()
    unet.load_state_dict(weights)
    load_lora(unet, lora_file_of(path))
    return {k: v.clone() for k, v in unet.state_dict().items()}


@functools.cache
def reference(path) -> dict[str, torch.Tensor]:
    """`merged` of a checkpoint's own file or folder (they never change)."""
    return merged(path)


def assert_same_weights(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert ((a[k] - b[k]).norm() <= 1e-6 * b[k].norm() + 1e-12), k


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("ema", [False, True])
def test_checkpoint_to_file_loads_like_the_checkpoint(checkpoint, tmp_path, capsys, fmt, ema):
    out = tmp_path / "out.safetensors"
    assert run(checkpoint, "-o", out, "--format", fmt, *(["--ema"] if ema else [])) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and ("add --ema" in printed) != ema  # the checkpoint has EMA weights
    source = checkpoint / ("ema.safetensors" if ema else "lora.safetensors")
    # a checkpoint folder's LoRA file is its EMA weights when there are some (as lora_final is)
    assert_same_weights(merged(out), reference(checkpoint if ema else source), exact=fmt == "kohya")
    meta = metadata(out)
    assert meta["sdxl_lora.rank"] == "4" and meta["sdxl_lora.target_mode"] == "attention_out"
    assert meta["sdxl_lora.weights"] == ("ema" if ema else "lora") and meta["ss_steps"] == "7"
    assert meta["sdxl_lora.training"] == RUN_CONFIG and meta["ss_seed"] == "3"
    if fmt == "kohya":  # the trained tensors themselves, and kohya's metadata
        entries, _ = read_lora_file(out, TINY)
        sd = load_file(source)
        for name, (down, up, alpha) in entries.items():
            assert torch.equal(down, sd[f"unet.{name}.lora_A.weight"]) and alpha == 2.0
            assert torch.equal(up, sd[f"unet.{name}.lora_B.weight"])
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    else:
        assert "ss_network_dim" not in meta and meta["sdxl_lora.alpha"] == "2.0"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtypes(checkpoint, tmp_path, dtype):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for fmt in ("kohya", "diffusers"):
        full, half = tmp_path / f"{fmt}32.safetensors", tmp_path / f"{fmt}16.safetensors"
        assert run(checkpoint, "-o", full, "--format", fmt) == 0
        assert run(checkpoint, "-o", half, "--format", fmt, "--dtype", dtype) == 0
        a, b = load_file(full), load_file(half)
        assert a.keys() == b.keys() and all(v.dtype == torch_dtype for v in b.values())
        assert all(torch.equal(a[k].to(torch_dtype), b[k]) for k in a)  # one rounding of the fp32 file
        assert half.stat().st_size < 0.6 * full.stat().st_size


def test_info(checkpoint, tmp_path, capsys):
    assert run(checkpoint, "--info") == 0
    out = capsys.readouterr().out
    n = len(lora_target_names(tiny_unet(), "attention_out"))
    for line in ("weights   checkpoint LoRA", "base      tiny", "rank      4", "alpha     2",
                 "targets   attention_out", f"modules   {n}", "dtype     float32", "  ss_steps: 7",
                 "  sdxl_lora.training: pretrained_model: tiny..."):
        assert line in out, line
    assert list(tmp_path.iterdir()) == []  # --info alone writes nothing
    kohya = tmp_path / "k.safetensors"
    assert run(checkpoint, "-o", kohya, "--format", "diffusers", "--info", "--ema") == 0
    assert "weights   checkpoint EMA" in capsys.readouterr().out and kohya.is_file()
    assert run(kohya, "--info") == 0
    out = capsys.readouterr().out
    assert "weights   diffusers file" in out
    assert "alpha     4 (alpha / rank folded into lora_B; trained with alpha 2)" in out


def test_conversions_round_trip(checkpoint, tmp_path):
    k1, d1, k2, d2 = (tmp_path / f"{n}.safetensors" for n in ("k1", "d1", "k2", "d2"))
    assert run(checkpoint, "-o", k1) == 0
    assert run(k1, "-o", d1, "--format", "diffusers") == 0
    assert run(d1, "-o", k2) == 0
    assert run(k2, "-o", d2, "--format", "diffusers") == 0
    first, second = load_file(k1), load_file(k2)
    assert first.keys() == second.keys()
    for k in first:  # down exact; alpha / rank * up (alpha is rank after folding) within one rounding
        if k.endswith("lora_down.weight"):
            assert torch.equal(first[k], second[k]), k
        elif k.endswith("lora_up.weight"):
            torch.testing.assert_close(first[k] * 0.5, second[k], rtol=0, atol=0), k
    assert {v.item() for k, v in second.items() if k.endswith(".alpha")} == {4.0}
    a, b = load_file(d1), load_file(d2)  # diffusers -> kohya -> diffusers: no arithmetic at all
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for path in (k1, d1, k2, d2):
        assert_same_weights(merged(path), reference(checkpoint / "lora.safetensors"))
    k3 = tmp_path / "k3.safetensors"  # kohya -> kohya: identical tensors
    assert run(k1, "-o", k3) == 0
    a, b = load_file(k1), load_file(k3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_spellings_convert(checkpoint, tmp_path):
    """kohya with diffusers-style names, and a bare peft file (no metadata: alpha = rank), to kohya."""
    entries, _ = read_lora_file(checkpoint / "lora.safetensors", TINY)
    kohya_names, peft = {}, {}
    for name, (down, up, alpha) in entries.items():
        key = "lora_unet_" + name.replace(".", "_")
        kohya_names |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha)}
        peft |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * (alpha / down.shape[0])}
    save_file(kohya_names, tmp_path / "kohya_diffusers_names.safetensors")
    save_file(peft, tmp_path / "peft.safetensors")
    for name in ("kohya_diffusers_names", "peft"):
        out = tmp_path / f"{name}_out.safetensors"
        assert run(tmp_path / f"{name}.safetensors", "-o", out) == 0
        assert_same_weights(merged(out), reference(checkpoint / "lora.safetensors"), exact=name.startswith("kohya"))
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in load_file(out))


def test_full_sdxl_lora_is_recognised_without_building_sdxl(tmp_path, capsys):
    """A LoRA for SDXL base (rank 1, attention): found as `sdxl` from its shapes, converted on the meta device."""
    with torch.device("meta"):
        unet = SDXLUNet(SDXL_CONFIG)
    g = torch.Generator().manual_seed(0)
    modules = {}
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k"):  # cross-attention keys: 2048 -> width
            down, up = torch.randn(1, m.in_features, generator=g), torch.randn(m.out_features, 1, generator=g)
            modules[name] = (down, up, 1.0)
    path = write_lora(LoRAWeights(modules, {}, lora_names("sdxl"), "test"), tmp_path / "sdxl.safetensors")
    out = tmp_path / "sdxl_diffusers.safetensors"
    assert run(path, "-o", out, "--format", "diffusers", "--info") == 0
    text = capsys.readouterr().out
    assert "base      sdxl" in text and f"modules   {len(modules)}" in text and "targets   attention" in text
    entries, _ = read_lora_file(out)
    assert entries.keys() == modules.keys()
    assert all(torch.equal(entries[n][0], modules[n][0]) and torch.equal(entries[n][1], modules[n][1]) for n in modules)
    assert run(path, "-o", tmp_path / "x.safetensors", "--base", "tiny") == 2  # not a tiny-model LoRA
    assert "names no module" in capsys.readouterr().err


def assert_error(capsys, argv, *fragments) -> str:
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def test_bad_inputs_are_one_line_errors(checkpoint, checkpoint_without_ema, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert_error(capsys, [tmp_path / "missing", "-o", out], "missing does not exist")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    assert_error(capsys, [tmp_path / "folder", "-o", out], "folder is not a complete checkpoint")
    assert_error(capsys, [checkpoint.parent.parent, "-o", out], "training output folder", checkpoint.name)
    assert_error(capsys, [checkpoint_without_ema, "-o", out, "--ema"], "has no EMA weights", "leave out --ema")
    assert_error(capsys, [tmp_path / "folder" / "notes.txt", "--info"], "notes.txt", "not a complete .safetensors")
    save_file({}, tmp_path / "folder" / "empty.safetensors")
    assert_error(capsys, [tmp_path / "folder" / "empty.safetensors", "--info"], "holds no LoRA weights")
    assert_error(capsys, [checkpoint, "-o", out, "--dtype", "fp8"], "--dtype", "fp8")
    assert_error(capsys, [checkpoint, "-o", tmp_path / "out.pt"], "must be a .safetensors file")
    assert_error(capsys, [checkpoint, "-o", out, "--base", tmp_path / "nowhere"], "--base", "nowhere")
    assert_error(capsys, [checkpoint], "give -o")
    assert run(checkpoint, "-o", out) == 0
    before = out.read_bytes()
    assert_error(capsys, [checkpoint, "-o", out, "--format", "diffusers"], "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert_error(capsys, [out, "-o", tmp_path / "again.safetensors", "--ema"], "--ema is for checkpoint folders")
    assert run(checkpoint, "-o", out, "--format", "diffusers", "--overwrite") == 0
    assert out.read_bytes() != before and "lora_adapter_metadata" in metadata(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.safetensors"]  # no temporary files left


def test_lora_for_another_base_is_refused(tmp_path, capsys):
    """An SD 1.5 LoRA (attention in input_blocks.1, 320 wide) names modules neither SDXL nor tiny has."""
    sd15 = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}
    save_file(sd15, tmp_path / "sd15.safetensors")
    assert_error(capsys, [tmp_path / "sd15.safetensors", "-o", tmp_path / "o.safetensors"],
                 "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "(tried sdxl, tiny")
    assert not (tmp_path / "o.safetensors").exists()
