"""Frozen base weights stored narrower than they compute (--base_dtype, lora/base_weights.py): fp8 e4m3 with a
power-of-two scale per row, cast up per layer.

Tolerances. Storage: each weight within 2^-4 of itself relative (half of e4m3's 3-bit mantissa step), or 2^-10 of
its row's scale in e4m3's subnormal range: the format's own bound, exactly. Compute: a StoredLinear equals
F.linear with the cast-up weight bit for bit (the same matmul), and a LoRA training step over an fp8-stored base
equals one over a plain model holding the cast-up weights to 1e-6 relative (only the order of the backward's sums
may differ).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flux import family
from flux import lora as flux_lora
from flux.loading import load_text_encoder, load_transformer
from lora.base_weights import FP8, StoredLinear, cast_up, fp8_scale, store_linears, stored_bytes
from lora.layer import LoRAConfig, add_lora, lora_modules
from lora.reading import load_lora
from tests.test_flux_family import make_lora
from training.config import ConfigError, parse_config, validate
from training.flags import NoiseSettings
from training.loop.loss import diffusion_loss


def random_linear(out_features=48, in_features=40, seed=0) -> nn.Linear:
    """Rows of very different magnitudes (1e-4 .. 1e2), one all-zero row, some subnormal-range weights."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-4, 2, out_features).unsqueeze(1))
        layer.weight[3] = 0
        layer.weight[5, :4] = torch.tensor([1e-9, -3e-7, 2.0, 5e-5])
    return layer


def test_fp8_storage_keeps_each_weight_within_e4m3s_precision():
    layer = random_linear()
    w = layer.weight.detach().clone()
    stored = StoredLinear(layer, FP8)
    assert stored.weight_stored.dtype == FP8 and stored.weight_scale.dtype == torch.float32
    s = stored.weight_scale
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    row_max = stored.weight_stored.float().abs().amax(dim=1)
    nonzero = w.abs().amax(dim=1) > 0
    assert (row_max[nonzero] >= 224).all() and (row_max <= 448).all()  # each row uses e4m3's top binade
    err = (stored.weight - w).abs()
    assert (err <= 2**-4 * w.abs() + 2**-10 * s).all()
    assert torch.equal(stored.weight, stored.weight_stored.float() * s)  # exact: a power-of-two product
    assert torch.equal(fp8_scale(torch.zeros(2, 3)), torch.ones(2, 1))
    # half the bytes of bf16, plus 4 bytes a row
    assert stored_bytes(stored)[str(FP8)] == w.numel() and stored_bytes(stored)["torch.float32"] == 4 * (48 + 48)


def test_stored_linear_computes_like_linear_with_its_cast_up_weight():
    layer = random_linear()
    stored = StoredLinear(layer, FP8)
    x = torch.randn(3, 7, 40, requires_grad=True)
    y = stored(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, stored.weight, stored.bias)
    assert torch.equal(y, ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)
    assert stored.weight_stored.grad is None and not stored.weight_stored.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computes in the autocast dtype, as nn.Linear does
        assert stored(x).dtype == torch.bfloat16
    # .to(dtype) moves the compute dtype's tensors, not the stored weight or its scale
    stored.to(torch.bfloat16)
    assert stored.weight_stored.dtype == FP8 and stored.weight_scale.dtype == torch.float32
    assert stored.bias.dtype == torch.bfloat16
    half = StoredLinear(random_linear(), torch.bfloat16)  # bf16 storage under fp32 compute: no scale
    assert half.weight_scale is None and half.weight.dtype == torch.float32
    assert torch.equal(cast_up(half.weight_stored, None, torch.float32), half.weight)


@pytest.mark.parametrize("dora", [False, True])
def test_a_lora_step_over_an_fp8_base_equals_one_over_its_cast_up_weights(dora):
    """tiny-flux, LoRA on every linear (DoRA too): the fp8-stored model vs a plain fp32 model whose block Linear
    weights are the cast-up ones: the same loss and LoRA gradients."""
    stored_model, plain = load_transformer("tiny-flux"), load_transformer("tiny-flux")
    count = store_linears(family.blocks(stored_model), FP8)
    assert count > 0
    before = sum(stored_bytes(plain).values())
    assert sum(stored_bytes(stored_model).values()) < 0.6 * before  # the blocks hold most of the weights
    stored_layers = {n: m for n, m in stored_model.named_modules() if isinstance(m, StoredLinear)}
    assert len(stored_layers) == count
    with torch.no_grad():
        for name, m in stored_layers.items():
            plain.get_submodule(name).weight.copy_(m.weight)
    config = LoRAConfig(rank=4, alpha=2.0, target_mode="all", use_dora=dora)
    models = {}
    for name, model in (("stored", stored_model), ("plain", plain)):
        torch.manual_seed(0)
        wrapped = add_lora(model, family.lora_targets(model, config), dora=dora)
        torch.manual_seed(1)
        for m in wrapped.values():
            nn.init.normal_(m.lora_up.weight, std=0.05)
        models[name] = model
    if dora:  # the magnitudes start as the row norms of the weights as computed
        for name, m in lora_modules(stored_model).items():
            assert torch.allclose(m.magnitude, lora_modules(plain)[name].magnitude, rtol=1e-6)

    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    embeds, pooled = load_text_encoder("tiny-flux").encode(["a red circle", "a blue square"])
    objective = family.objective(NoiseSettings(timestep_sampling="flux_shift"), "tiny-flux")
    t = objective.draw_times(2, g, x0.shape)
    losses = {}
    for name, model in models.items():
        loss = diffusion_loss(lambda x_t, t, m=model: family.predict(m, x_t, t, embeds, pooled, {}, objective),
                              objective, x0, t, noise).mean()
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["stored"] - losses["plain"]) <= 1e-6 * losses["plain"]
    plain_layers = lora_modules(plain)
    for name, m in lora_modules(stored_model).items():
        for a, b in ((m.lora_down.weight.grad, plain_layers[name].lora_down.weight.grad),
                     (m.lora_up.weight.grad, plain_layers[name].lora_up.weight.grad)):
            assert (a - b).norm() <= 1e-6 * b.norm() + 1e-12, name


def test_a_stored_base_refuses_merging_and_loading_a_lora_in_one_line(tmp_path):
    model = load_transformer("tiny-flux")
    store_linears(family.blocks(model), FP8)
    wrapped = add_lora(model, family.lora_targets(model, LoRAConfig(rank=2, alpha=2.0)))
    with pytest.raises(ValueError, match="cannot merge a LoRA into a base stored as torch.float8_e4m3fn"):
        next(iter(wrapped.values())).merge()
    path = make_lora(tmp_path / "lora.safetensors", fmt="diffusers")
    fresh = load_transformer("tiny-flux")
    store_linears(family.blocks(fresh), FP8)
    with pytest.raises(ValueError, match="stored as torch.float8_e4m3fn; load the LoRA into a bf16 or fp32"):
        load_lora(fresh, path, flux_lora.names_for(fresh.config, "transformer"))


@pytest.mark.parametrize("precision,base_dtype,ok", [("fp32", "fp8", True), ("fp32", "bf16", True),
                                                     ("fp32", "auto", True), ("bf16", "fp8", True),
                                                     ("bf16", "fp32", False), ("bf16", "fp16", False)])
def test_base_dtype_must_be_narrower_than_the_precision(tmp_path, precision, base_dtype, ok):
    args = parse_config(["--pretrained_model", "tiny-flux", "--data_dir", "data/demo/train", "--output_dir",
                         str(tmp_path / "out"), "--device", "cpu",
                         "--precision", precision, "--base_dtype", base_dtype], "flux")
    if ok:
        validate(args, "flux")
        assert args.base_dtype == (precision if base_dtype == "auto" else base_dtype)
        return
    with pytest.raises(ConfigError, match=f"base_dtype.*{base_dtype}.*not narrower than --precision {precision}"):
        validate(args, "flux")
