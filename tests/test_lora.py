"""LoRA layers and files, checked against peft (the layer and its gradients) and diffusers (the files).

Tolerances (fp32 unless stated):
- LoRA with up = 0 leaves the UNet output bit-identical (y + 0 is exact).
- vs peft on diffusers' UNet: outputs rel. L2 < 1e-5 (same float32 ops; only summation order may
  differ, as in test_unet.py); LoRA gradients rel. L2 < 1e-4 per tensor (a gradient is a sum over
  all tokens and passes back through the whole UNet, so reordering errors grow by ~10x). Both are
  measured 0 on CPU today (identical op order); the margins cover other BLAS builds and threads.
- merged vs unmerged, and a file merged by `load_lora` vs the live wrapper: rel. L2 < 1e-5 (merging
  rounds W + dW once per weight, ~6e-8 relative; measured ~1e-6 on the output).
- diffusers' pipeline with our file vs our UNet with `load_lora`: rel. L2 < 2e-5 (peft's unmerged
  branch vs our merged weight, plus the UNet-vs-diffusers difference).
"""

import json
import logging
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora.layer import LoRAConfig, LoRALayer, load_lora_state_dict, lora_modules, lora_parameters, lora_state_dict
from sdxl.configs import unet_config_to_diffusers
from sdxl.loading import load_unet
from sdxl.lora import apply_lora, load_lora, lora_target_names, read_lora_file, save_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXLUNet, UNetConfig

MODES = ["attention", "attention_out", "all"]
OTHER_CONFIG = UNetConfig(  # same block structure (so the same module names) as tiny, other widths
    block_out_channels=(32, 64, 96),
    transformer_layers_per_block=(1, 1, 2),
    num_attention_heads=(2, 4, 4),
    cross_attention_dim=40,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(cfg=TINY_UNET_CONFIG, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(b, 4, 8, 8, generator=g),
        timestep=torch.tensor([999, 250][:b]),
        encoder_hidden_states=torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(b, pooled, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b)},
    )


def tiny_unet(seed=0, cfg=TINY_UNET_CONFIG) -> SDXLUNet:
    torch.manual_seed(seed)
    return SDXLUNet(cfg).eval()


def randomize_lora(unet, seed=1, std=0.05):
    """'Trained-ish' LoRA: random down and non-zero up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def trained_unet(mode, rank=4, alpha=3.0, cfg=TINY_UNET_CONFIG):
    unet = tiny_unet(cfg=cfg)
    config = LoRAConfig(rank=rank, alpha=alpha, target_mode=mode)
    apply_lora(unet, config)
    randomize_lora(unet)
    return unet, config


def output(unet, x=None):
    with torch.no_grad():
        return unet(**(x or inputs()))


# ---------------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("mode", MODES)
def test_zero_up_is_identity(mode):
    unet = tiny_unet()
    expected = output(unet)
    wrapped = apply_lora(unet, LoRAConfig(rank=4, alpha=8, target_mode=mode))
    assert wrapped and all(isinstance(m, LoRALayer) for m in wrapped.values())
    assert torch.equal(output(unet), expected)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(unet)}
    assert all(p.dtype == torch.float32 for p in trainable)


def test_target_modes_pick_the_documented_layers():
    unet = tiny_unet()
    block = "down_blocks.1.attentions.0"
    per_block = {mode: sorted(n.removeprefix(f"{block}.") for n in lora_target_names(unet, mode)
                              if n.startswith(f"{block}.")) for mode in MODES}
    qkv = [f"transformer_blocks.0.attn{i}.to_{p}" for i in (1, 2) for p in "kqv"]
    assert per_block["attention"] == sorted(qkv)
    assert per_block["attention_out"] == sorted(qkv + [f"transformer_blocks.0.attn{i}.to_out.0" for i in (1, 2)])
    assert per_block["all"] == sorted(per_block["attention_out"] + ["proj_in", "proj_out"] +
                                      ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"])


@pytest.mark.parametrize("mode", MODES)
def test_matches_peft(mode):
    """Same weights, same LoRA values: our wrapper == peft's LoRA on diffusers' UNet, output and grads."""
    cfg = {k: v for k, v in unet_config_to_diffusers(TINY_UNET_CONFIG).items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**cfg).eval()
    ours = SDXLUNet(TINY_UNET_CONFIG).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = inputs()
    without_lora = output(ref, x).sample
    rank, alpha = 4, 3.0
    apply_lora(ours, LoRAConfig(rank=rank, alpha=alpha, target_mode=mode))
    randomize_lora(ours, std=0.1)
    names = list(lora_modules(ours))
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0))
    peft_layers = {n: m for n, m in ref.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(peft_layers) == sorted(names)
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            peft_layers[name].lora_A["default"].weight.copy_(m.lora_down.weight)
            peft_layers[name].lora_B["default"].weight.copy_(m.lora_up.weight)

    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    got, expected = ours(**x), ref(**x).sample
    assert rel_err(got, expected) < 1e-5
    assert rel_err(without_lora, expected) > 1e-2  # the LoRA changes the output: the comparison means something

    ((got - target) ** 2).mean().backward()
    ((expected - target) ** 2).mean().backward()
    for name, m in lora_modules(ours).items():
        assert rel_err(m.lora_down.weight.grad, peft_layers[name].lora_A["default"].weight.grad) < 1e-4, name
        assert rel_err(m.lora_up.weight.grad, peft_layers[name].lora_B["default"].weight.grad) < 1e-4, name


@pytest.mark.parametrize("rank", [1, 4])
def test_sdxl_attention_parameter_count(rank):
    with torch.device("meta"):
        unet = SDXLUNet()
    apply_lora(unet, LoRAConfig(rank=rank, alpha=rank, target_mode="attention"))
    assert sum(p.numel() for p in lora_parameters(unet)) == 1_118_720 * rank
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == 1_118_720 * rank


def test_merge_unmerge():
    unet, _ = trained_unet("all")
    for m in lora_modules(unet).values():
        m.scale = 0.7
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unmerged = output(unet)
    for m in lora_modules(unet).values():
        m.merge()
        m.merge()  # a no-op
    assert rel_err(output(unet), unmerged) < 1e-5
    for m in lora_modules(unet).values():
        m.unmerge()
        m.unmerge()  # a no-op
    after = unet.state_dict()
    for k, v in before.items():  # one fp32 rounding of W + dW, then of (W + dW) - dW
        assert torch.allclose(after[k], v, rtol=0, atol=1e-6), k
    # Each weight now carries at most 2 roundings, relative 2u (u = 2^-24 = 6e-8); relative errors add along the
    # ~40 Linear layers of the UNet's longest path: <= 40 * 2u = 4.8e-6, so 1e-5 (and the forward's own rounding,
    # summation order differs with the thread count, is far below that).
    assert rel_err(output(unet), unmerged) < 1e-5


def test_bf16_base_under_autocast():
    unet = tiny_unet().to(torch.bfloat16)
    apply_lora(unet, LoRAConfig(rank=4, alpha=4, target_mode="all", dropout=0.1))
    randomize_lora(unet)
    unet.train()
    assert all(p.dtype == torch.float32 for p in lora_parameters(unet))
    assert all(m.base.weight.dtype == torch.bfloat16 for m in lora_modules(unet).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(**inputs())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in lora_parameters(unet)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(m.base.weight.grad is None for m in lora_modules(unet).values())


def test_lora_state_dict_round_trip():
    unet, config = trained_unet("attention_out")
    sd = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in sd)
    fresh = tiny_unet()
    apply_lora(fresh, config)
    load_lora_state_dict(fresh, sd)
    assert torch.equal(output(fresh), output(unet))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(fresh, dict(list(sd.items())[1:]))


# ---------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(tmp_path, fmt, mode):
    unet, config = trained_unet(mode)
    path = save_lora(unet, tmp_path / "lora.safetensors", config, format=fmt, metadata={"lr": "1e-4"})
    fresh = tiny_unet()
    metadata = load_lora(fresh, path)
    assert metadata["lr"] == "1e-4" and metadata["sdxl_lora.target_mode"] == mode
    assert rel_err(output(fresh), output(unet)) < 1e-5
    # into a UNet that already has (zero) LoRA layers: the update goes into their frozen base
    wrapped = tiny_unet()
    apply_lora(wrapped, config)
    load_lora(wrapped, path)
    assert rel_err(output(wrapped), output(unet)) < 1e-5
    entries, _ = read_lora_file(path, unet_config_to_diffusers(TINY_UNET_CONFIG))
    assert sorted(entries) == sorted(lora_modules(unet))


def test_kohya_file_layout(tmp_path):
    unet, config = trained_unet("attention")
    path = save_lora(unet, tmp_path / "k.safetensors", config, metadata={"steps": "500"})
    sd = load_file(path)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # = down_blocks.1.attentions.0
    assert sd[f"{name}.alpha"].ndim == 0 and sd[f"{name}.alpha"].item() == 3.0
    assert sd[f"{name}.lora_down.weight"].shape == (4, 96) and sd[f"{name}.lora_up.weight"].shape == (96, 4)
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in sd)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 3.0 and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["steps"] == "500"


def test_other_spellings_and_scales(tmp_path):
    """kohya with diffusers-style names, peft without `unet.`, scale, and two loads adding up."""
    unet, config = trained_unet("attention_out", alpha=2.0)
    sd = lora_state_dict(unet)
    kohya_diffusers_names, peft_bare = {}, {}
    for name in lora_modules(unet):
        key = "lora_unet_" + name.replace(".", "_")
        kohya_diffusers_names[f"{key}.lora_down.weight"] = sd[f"{name}.lora_down.weight"]
        kohya_diffusers_names[f"{key}.lora_up.weight"] = sd[f"{name}.lora_up.weight"]
        kohya_diffusers_names[f"{key}.alpha"] = torch.tensor(2.0)
        peft_bare[f"{name}.lora_A.weight"] = sd[f"{name}.lora_down.weight"]
        peft_bare[f"{name}.lora_B.weight"] = sd[f"{name}.lora_up.weight"] * (2.0 / 4)  # no metadata: scale 1
    expected = output(unet)
    for i, tensors in enumerate([kohya_diffusers_names, peft_bare]):
        save_file(tensors, tmp_path / f"{i}.safetensors")
        fresh = tiny_unet()
        load_lora(fresh, tmp_path / f"{i}.safetensors")
        assert rel_err(output(fresh), expected) < 1e-5
    twice = tiny_unet()
    load_lora(twice, tmp_path / "0.safetensors", scale=0.5)
    load_lora(twice, tmp_path / "1.safetensors", scale=0.5)
    assert rel_err(output(twice), expected) < 1e-5


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("mode", MODES)
def test_loads_in_diffusers(tmp_path, tiny_dir, pipe, fmt, mode):
    """Our file through `StableDiffusionXLPipeline.load_lora_weights` == our UNet with `load_lora`."""
    unet = load_unet(tiny_dir)
    config = LoRAConfig(rank=4, alpha=3.0, target_mode=mode)
    apply_lora(unet, config)
    randomize_lora(unet)
    path = save_lora(unet, tmp_path / "lora.safetensors", config, format=fmt)
    ours = load_unet(tiny_dir)
    load_lora(ours, path)

    records = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name=f"{mode}_{fmt}")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    # The only warnings allowed: our file has (rightly) no text-encoder LoRA keys.
    problems = [m for m in records.messages + [str(w.message) for w in caught]
                if not m.startswith("No LoRA keys associated to CLIPText")]
    try:
        assert not problems
        assert len([m for m in pipe.unet.modules() if hasattr(m, "lora_A")]) == len(lora_modules(unet))
        x = inputs()
        with torch.no_grad():
            expected = pipe.unet(**x).sample
        assert rel_err(output(ours, x), expected) < 2e-5
        assert rel_err(output(load_unet(tiny_dir), x), expected) > 1e-3  # the LoRA did change the output
    finally:
        pipe.unload_lora_weights()


def test_diffusers_metadata_alpha(tmp_path):
    """A peft file whose lora_adapter_metadata says lora_alpha != r (as diffusers' trainers write)."""
    unet, _ = trained_unet("attention", alpha=3.0)
    sd = lora_state_dict(unet)
    tensors = {}
    for name in lora_modules(unet):
        tensors[f"unet.{name}.lora_A.weight"] = sd[f"{name}.lora_down.weight"]
        tensors[f"unet.{name}.lora_B.weight"] = sd[f"{name}.lora_up.weight"]
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 3.0}), "format": "pt"}
    save_file(tensors, tmp_path / "d.safetensors", metadata=meta)
    entries, _ = read_lora_file(tmp_path / "d.safetensors")
    assert {alpha for _, _, alpha in entries.values()} == {3.0}
    fresh = tiny_unet()
    load_lora(fresh, tmp_path / "d.safetensors")
    assert rel_err(output(fresh), output(unet)) < 1e-5


# ---------------------------------------------------------------------------------------------------
# Errors: one line, naming the file or the key; no weight changes before the whole file is checked.


def assert_refused(unet, path, match):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        load_lora(unet, path)
    assert "\n" not in str(e.value)
    after = unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    return str(e.value)


def test_unknown_keys_are_refused(tmp_path):
    unet, config = trained_unet("attention")
    good = load_file(save_lora(unet, tmp_path / "good.safetensors", config, format="diffusers"))
    # valid keys first (sorted before), then a module this UNet lacks: nothing may be merged
    bad = good | {"unet.up_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64),
                  "unet.up_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4)}
    save_file(bad, tmp_path / "bad.safetensors")
    msg = assert_refused(tiny_unet(), tmp_path / "bad.safetensors", "up_blocks.9.attentions.0.proj_in")
    assert "bad.safetensors" in msg
    save_file({"lora_unet_foo_bar.lora_down.weight": torch.zeros(4, 8)}, tmp_path / "k.safetensors")
    assert_refused(tiny_unet(), tmp_path / "k.safetensors", "lora_unet_foo_bar")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, tmp_path / "conv.safetensors")
    assert_refused(tiny_unet(), tmp_path / "conv.safetensors", "lora_unet_conv_in.*Conv2d")
    save_file({"unet.conv_in.weight": torch.zeros(1)}, tmp_path / "not_lora.safetensors")
    assert_refused(tiny_unet(), tmp_path / "not_lora.safetensors", "unet.conv_in.weight")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lora_for_another_model_is_refused(tmp_path, fmt):
    unet, config = trained_unet("attention", cfg=OTHER_CONFIG)
    path = save_lora(unet, tmp_path / "other.safetensors", config, format=fmt)
    assert_refused(tiny_unet(), path, r"other\.safetensors: key .*(shapes|names no module)")


def test_text_encoder_keys_are_refused(tmp_path):
    unet, config = trained_unet("attention")
    good = load_file(save_lora(unet, tmp_path / "good.safetensors", config))
    for key in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"):
        save_file(good | {key: torch.zeros(4, 32)}, tmp_path / "te.safetensors")
        assert_refused(tiny_unet(), tmp_path / "te.safetensors", f"{key}.*text-encoder")


def test_bad_files_are_refused(tmp_path):
    unet, config = trained_unet("attention")
    data = save_lora(unet, tmp_path / "good.safetensors", config).read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(tiny_unet(), tmp_path / "truncated.safetensors", "truncated.safetensors")
    torch.save(lora_state_dict(unet), tmp_path / "lora.pt")
    assert_refused(tiny_unet(), tmp_path / "lora.pt", r"lora\.pt.*safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(tiny_unet(), tmp_path / "missing.safetensors")
