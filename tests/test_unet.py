"""Our SDXL UNet against diffusers' UNet2DConditionModel on the same weights and inputs.

Tolerance: fp32 relative L2 error < 1e-5 (both run the same float32 operations; differences come
only from summation order). bf16: relative L2 error < 3e-2 against fp32 (bf16 keeps 8 mantissa bits,
~0.4% per rounding, accumulated over ~30 residual layers; measured ~1% on the tiny model).
"""

import gc

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdxl.configs import unet_config_from_diffusers, unet_config_to_diffusers
from sdxl.tiny import TINY_UNET_CONFIG
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig

OTHER_CONFIG = UNetConfig(  # SDXL-shaped but different widths, depths, heads, groups and dims
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    transformer_layers_per_block=(1, 2, 3),
    num_attention_heads=(2, 2, 3),
    cross_attention_dim=40,
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=16 + 6 * 4,
    norm_num_groups=16,
)


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    return UNet2DConditionModel(**config).eval()


def ours_sharing_weights(ref: UNet2DConditionModel) -> SDXLUNet:
    """Our UNet built on meta, taking diffusers' tensors by assignment (no second copy in memory)."""
    with torch.device("meta"):
        ours = SDXLUNet(unet_config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval()


def inputs(cfg: UNetConfig, b=2, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(b, 4, h, w, generator=g),
        timestep=torch.tensor([999, 17, 500, 1][:b]),
        encoder_hidden_states=torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(b, pooled, generator=g),
            "time_ids": torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8], [1024, 768, 32, 64, h * 8, w * 8]][:b]),
        },
    )


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(ref, ours, x):
    with torch.no_grad():
        expected = ref(**x).sample
        got = ours(**x)
    assert got.shape == expected.shape
    return rel_err(got, expected)


@pytest.mark.parametrize("cfg", [TINY_UNET_CONFIG, OTHER_CONFIG], ids=["tiny", "other"])
def test_matches_diffusers(cfg):
    torch.manual_seed(0)
    ref = diffusers_unet(cfg)
    ours = SDXLUNet(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert compare(ref, ours.eval(), inputs(cfg)) < 1e-5
    # non-square and odd-sized latents (upsampling follows the skip sizes), scalar timestep
    x = inputs(cfg, b=1, h=13, w=22)
    x["timestep"] = 250
    assert compare(ref, ours, x) < 1e-5


def test_config_round_trip():
    for cfg in (SDXL_CONFIG, TINY_UNET_CONFIG, OTHER_CONFIG):
        assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg
    bad = {**unet_config_to_diffusers(TINY_UNET_CONFIG), "use_linear_projection": False}
    with pytest.raises(ValueError, match="use_linear_projection"):
        unet_config_from_diffusers(bad)


def test_output_depends_on_every_input():
    torch.manual_seed(0)
    unet = SDXLUNet(TINY_UNET_CONFIG).eval()
    x = inputs(TINY_UNET_CONFIG)
    with torch.no_grad():
        base = unet(**x)
        for change in ("timestep", "encoder_hidden_states", "text_embeds", "time_ids"):
            y = {**x, "added_cond_kwargs": dict(x["added_cond_kwargs"])}
            if change in y:
                y[change] = y[change] + 1
            else:
                y["added_cond_kwargs"][change] = y["added_cond_kwargs"][change] + 1
            assert rel_err(unet(**y), base) > 1e-4, change


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    unet = SDXLUNet(TINY_UNET_CONFIG).eval()
    x = inputs(TINY_UNET_CONFIG)
    with torch.no_grad():
        expected = unet(**x)
        unet.to(torch.bfloat16)
        xb = {k: v.to(torch.bfloat16) if k != "timestep" and torch.is_tensor(v) else v for k, v in x.items()}
        xb["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in x["added_cond_kwargs"].items()}
        got = unet(**xb)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) < 3e-2


def test_gradient_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    unet = SDXLUNet(TINY_UNET_CONFIG)
    x = inputs(TINY_UNET_CONFIG)

    def grads(checkpointing):
        unet.zero_grad()
        unet.set_gradient_checkpointing(checkpointing)
        out = unet(**x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}

    out_a, grads_a = grads(False)
    out_b, grads_b = grads(True)
    assert torch.equal(out_a, out_b)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gradient_checkpointing_recomputes():
    """With checkpointing on, resnets and transformer blocks run again during backward (pre-hooks:
    non-reentrant recomputation stops early, so a forward hook would not fire)."""
    torch.manual_seed(0)
    unet = SDXLUNet(TINY_UNET_CONFIG)
    calls = []
    unet.down_blocks[1].resnets[0].register_forward_pre_hook(lambda *a: calls.append("resnet"))
    unet.down_blocks[1].attentions[0].transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append("block"))
    unet.set_gradient_checkpointing(True)
    unet(**inputs(TINY_UNET_CONFIG, b=1)).mean().backward()
    assert calls.count("resnet") == 2 and calls.count("block") == 2


@pytest.mark.slow
def test_full_sdxl_matches_diffusers():
    """Full SDXL base config, random weights, fp32: one copy of the 10 GB of weights, shared."""
    torch.manual_seed(0)
    ref = diffusers_unet(SDXL_CONFIG)
    ours = ours_sharing_weights(ref)
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684  # SDXL base UNet
    x = inputs(SDXL_CONFIG, b=1, h=16, w=24)
    assert compare(ref, ours, x) < 1e-5
    del ref, ours
    gc.collect()
