"""LoCon (LoRA on the UNet's 3x3 convs) and DoRA, checked against peft (layer, gradients) and diffusers (files).

Tolerances as tests/test_lora.py (fp32): outputs vs peft rel. L2 < 1e-5, gradients < 1e-4 per tensor (same
float32 ops up to summation order; DoRA's norm is one more reduction); merged vs unmerged < 1e-5 (one rounding
of W + dW per weight, and for DoRA of the gain m / ||W + dW||); diffusers' pipeline vs our merged UNet < 2e-5.
Under bf16 autocast both sides round their matmul inputs to bf16 (2^-8 relative): outputs < 1e-2, gradients
< 5e-2 (a gradient sums many rounded products).
"""

import copy
import json
import logging
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from families import read_lora
from lora.files import peft_tensors, state_dict_from_peft, write_lora
from lora.layer import LoRAConfig, lora_modules, lora_parameters, lora_state_dict
from sdxl.configs import unet_config_to_diffusers
from sdxl.loading import load_unet
from sdxl.lora import apply_lora, conv_target_names, load_lora, save_lora
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXLUNet
from tests.test_lora import inputs, output, rel_err, tiny_unet

KINDS = {  # name -> LoRAConfig
    "locon": LoRAConfig(rank=4, alpha=3.0, target_mode="attention", conv_rank=2, conv_alpha=1.5),
    "dora": LoRAConfig(rank=4, alpha=3.0, target_mode="attention_out", use_dora=True),
    "locon_dora": LoRAConfig(rank=4, alpha=3.0, target_mode="all", conv_rank=3, use_dora=True),
}


def randomize(unet, seed=1, std=0.1):
    """'Trained-ish': random down and up, magnitudes moved off their initial norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(unet).values():
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * std)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)
            if m.magnitude is not None:
                m.magnitude.mul_(1 + 0.2 * torch.randn(m.magnitude.shape, generator=g))


def trained(kind, unet=None):
    unet = unet if unet is not None else tiny_unet()
    apply_lora(unet, KINDS[kind])
    randomize(unet)
    return unet


def peft_twin(ours, config: LoRAConfig):
    """diffusers' UNet with the same base weights and a peft LoRA holding our LoRA values."""
    cfg = {k: v for k, v in unet_config_to_diffusers(TINY_UNET_CONFIG).items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**cfg).eval()
    base = {k.replace(".base.", "."): v for k, v in ours.state_dict().items()
            if ".lora_" not in k and not k.endswith(".magnitude")}
    ref.load_state_dict(base, strict=True)
    convs = [n for n, m in lora_modules(ours).items() if isinstance(m.base, torch.nn.Conv2d)]
    ref.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(lora_modules(ours)),
                               rank_pattern={n: config.conv_rank for n in convs},
                               alpha_pattern={n: config.conv_alpha or config.conv_rank for n in convs},
                               use_dora=config.use_dora, lora_dropout=0.0))
    layers = {n: m for n, m in ref.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(layers) == sorted(lora_modules(ours))
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            layers[name].lora_A["default"].weight.copy_(m.lora_down.weight)
            layers[name].lora_B["default"].weight.copy_(m.lora_up.weight)
            if m.magnitude is not None:
                mag = layers[name].lora_magnitude_vector["default"].weight
                mag.copy_(m.magnitude.view(mag.shape))
    return ref, layers


def peft_grads(layer):
    grads = [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    if layer.lora_magnitude_vector:
        grads.append(layer.lora_magnitude_vector["default"].weight.grad.flatten())
    return grads


def test_conv_targets_are_kohyas_3x3_set():
    names = conv_target_names(tiny_unet())
    assert "down_blocks.0.resnets.0.conv1" in names and "up_blocks.2.resnets.2.conv2" in names
    assert "down_blocks.0.downsamplers.0.conv" in names and "up_blocks.0.upsamplers.0.conv" in names
    assert not any(n.endswith(("conv_in", "conv_out", "conv_shortcut")) for n in names)
    # 3 down blocks x 2 resnets + 2 mid + 3 up blocks x 3 resnets, 2 convs each; 2 downsamplers, 2 upsamplers
    assert len(names) == 2 * (6 + 2 + 9) + 4


@pytest.mark.parametrize("kind", KINDS)
def test_matches_peft(kind):
    """Output and every LoRA gradient (down, up, DoRA magnitude) == peft's on diffusers' UNet."""
    torch.manual_seed(0)
    ours = trained(kind, SDXLUNet(TINY_UNET_CONFIG).eval())
    ref, layers = peft_twin(ours, KINDS[kind])
    x = inputs()
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    got, expected = ours(**x), ref(**x).sample
    assert rel_err(got, expected) < 1e-5
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.merge()
        assert rel_err(output(ours, x), expected) < 1e-5  # merged == unmerged
        for m in lora_modules(ours).values():
            m.unmerge()
        assert rel_err(output(ours, x), expected) < 1e-5
    ((ours(**x) - target) ** 2).mean().backward()
    ((expected - target) ** 2).mean().backward()
    for name, m in lora_modules(ours).items():
        mine = [p.grad.flatten() if p is m.magnitude else p.grad for p in (m.lora_down.weight, m.lora_up.weight,
                                                                          m.magnitude) if p is not None]
        theirs = peft_grads(layers[name])
        assert len(mine) == len(theirs) == (3 if KINDS[kind].use_dora else 2)
        for a, b in zip(mine, theirs, strict=True):
            assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("dora", [False, True])
def test_matches_peft_under_bf16_autocast(dora):
    """The branch runs in the autocast dtype, as peft's: a bf16 Linear and Conv2d with fp32 LoRA weights."""
    from peft import inject_adapter_in_model

    from lora.layer import LoRALayer

    torch.manual_seed(0)
    base = torch.nn.ModuleDict({"fc": torch.nn.Linear(64, 48), "conv": torch.nn.Conv2d(16, 24, 3, padding=1)})
    base = base.to(torch.bfloat16)
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=3.0, target_modules=["fc", "conv"], use_dora=dora),
                                  copy.deepcopy(base))
    ours = {name: LoRALayer(layer, 4, 3.0, dora=dora) for name, layer in base.items()}
    g = torch.Generator().manual_seed(1)
    for name, m in ours.items():
        with torch.no_grad():
            m.lora_up.weight.normal_(0, 0.1, generator=g)
            ref[name].lora_A["default"].weight.copy_(m.lora_down.weight)
            ref[name].lora_B["default"].weight.copy_(m.lora_up.weight)
            if dora:
                m.magnitude.mul_(1.1)
                mag = ref[name].lora_magnitude_vector["default"].weight
                mag.copy_(m.magnitude.view(mag.shape))
        x = torch.randn((2, 7, 64) if name == "fc" else (2, 16, 8, 8), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = m(x), ref[name](x)
        assert got.dtype == expected.dtype == torch.bfloat16
        assert rel_err(got, expected) < 1e-2, name
        got.float().square().sum().backward()
        expected.float().square().sum().backward()
        assert m.lora_up.weight.grad.dtype == torch.float32
        assert rel_err(m.lora_up.weight.grad, ref[name].lora_B["default"].weight.grad) < 5e-2, name
        assert rel_err(m.lora_down.weight.grad, ref[name].lora_A["default"].weight.grad) < 5e-2, name


def test_zero_up_is_identity_and_params_train():
    unet = tiny_unet()
    expected = output(unet)
    apply_lora(unet, KINDS["locon_dora"])
    assert torch.equal(output(unet), expected) or rel_err(output(unet), expected) < 1e-6  # DoRA: m / ||W|| = 1
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(unet)}
    assert sum(m.magnitude is not None for m in lora_modules(unet).values()) == len(lora_modules(unet))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("kind", KINDS)
def test_file_round_trip(tmp_path, fmt, kind):
    """save -> load_lora into a plain UNet == the live wrapper; read_lora -> write_lora keeps every tensor."""
    unet = trained(kind)
    path = save_lora(unet, tmp_path / "a.safetensors", KINDS[kind], format=fmt)
    fresh = tiny_unet()
    load_lora(fresh, path)
    assert rel_err(output(fresh), output(unet)) < 1e-5
    weights = read_lora(path, base="tiny")
    got, want = weights.lora_config(), KINDS[kind]
    assert (got.rank, got.conv_rank, got.use_dora, got.target_mode) == (want.rank, want.conv_rank, want.use_dora,
                                                                         want.target_mode)
    again = write_lora(weights, tmp_path / "b.safetensors", format=fmt)
    assert load_file(again).keys() == load_file(path).keys()
    assert all(torch.equal(load_file(again)[k], v) for k, v in load_file(path).items())


def test_kohya_keys_and_metadata(tmp_path):
    unet = trained("locon_dora")
    path = save_lora(unet, tmp_path / "k.safetensors", KINDS["locon_dora"])
    sd = load_file(path)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # down_blocks.0.resnets.0.conv1, 64 -> 64 channels
    assert sd[f"{conv}.lora_down.weight"].shape == (3, 64, 3, 3) and sd[f"{conv}.lora_up.weight"].shape == (64, 3, 1, 1)
    assert sd[f"{conv}.dora_scale"].shape == (64, 1, 1, 1) and sd[f"{conv}.alpha"].item() == 3.0
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in sd  # the downsampler
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in sd  # an upsampler
    linear = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert sd[f"{linear}.dora_scale"].shape == (96, 1)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0", "algo": "locon",
                                                   "dora_wd": "True"}


def test_kohya_names_match_diffusers_converter(tmp_path):
    """Every LoCon key we write maps, by diffusers' own kohya converter, to the conv we meant."""
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    unet = trained("locon")
    sd = load_file(save_lora(unet, tmp_path / "k.safetensors", KINDS["locon"]))

    class Config:  # all the converter reads of the UNet config
        layers_per_block = TINY_UNET_CONFIG.layers_per_block

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), Config)
    names = {_convert_unet_lora_key(k).rpartition(".lora.down")[0] for k, v in mapped.items()
             if k.endswith("lora_down.weight") and v.ndim == 4}
    assert names == set(conv_target_names(tiny_unet()))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(("kind", "fmt"), [("locon", "kohya"), ("locon", "diffusers"), ("locon_dora", "diffusers")])
def test_loads_in_diffusers(tmp_path, tiny_dir, pipe, kind, fmt):
    """Our file through `StableDiffusionXLPipeline.load_lora_weights` == our UNet with `load_lora`. (diffusers'
    SDXL loader drops kohya `dora_scale` keys with a warning, so DoRA goes to diffusers in the diffusers format.)"""
    unet = trained(kind, load_unet(tiny_dir))
    path = save_lora(unet, tmp_path / "lora.safetensors", KINDS[kind], format=fmt)
    ours = load_unet(tiny_dir)
    load_lora(ours, path)
    records = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name=f"{kind}_{fmt}")
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    problems = [m for m in records.messages + [str(w.message) for w in caught]
                if not m.startswith("No LoRA keys associated to CLIPText")]
    try:
        assert not problems
        assert len([m for m in pipe.unet.modules() if hasattr(m, "lora_A")]) == len(lora_modules(unet))
        x = inputs()
        with torch.no_grad():
            expected = pipe.unet(**x).sample
        assert rel_err(output(ours, x), expected) < 2e-5
        assert rel_err(output(load_unet(tiny_dir), x), expected) > 1e-3
    finally:
        pipe.unload_lora_weights()


def test_checkpoint_tensors_round_trip():
    """Training checkpoints: lora_state_dict -> peft tensors -> back is exact, magnitudes included."""
    unet = trained("locon_dora")
    sd = lora_state_dict(unet)
    tensors, meta = peft_tensors(sd, KINDS["locon_dora"])
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"].shape == (1, 64, 1, 1)
    back = state_dict_from_peft(tensors)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    peft_config = json.loads(meta["lora_adapter_metadata"])
    assert peft_config["unet.use_dora"] is True
    assert set(peft_config["unet.rank_pattern"]) == set(conv_target_names(tiny_unet()))
