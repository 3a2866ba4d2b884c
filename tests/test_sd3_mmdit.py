"""Our MMDiT (sd3/mmdit.py) against diffusers' SD3Transformer2DModel on the same weights and inputs.

Tolerance: fp32 relative L2 error < 1e-5 on the output and on every parameter and input gradient of a scalar loss
(both sides run the same float32 operations; differences come only from summation order inside kernels, ~1e-7).
bf16: relative error < 3e-2 against fp32 (8 mantissa bits, ~0.4% per rounding, over a few residual blocks).
"""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import JointTransformerBlock as DiffusersJointBlock

from sd3.configs import (
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    config_from_diffusers,
    config_from_sai,
    config_to_diffusers,
)
from sd3.mmdit import JointTransformerBlock, MMDiTConfig, SD3Transformer
from sd3.sai import transformer_diffusers_to_sai
from sd3.tiny import TINY_MMDIT_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on a shared CPU

SMALL = dict(num_layers=3, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=40,
             caption_projection_dim=32, pooled_projection_dim=24, in_channels=4, out_channels=4, sample_size=16,
             pos_embed_max_size=13)  # fmt: skip
VARIANTS = {
    "sd3_medium": MMDiTConfig(**SMALL),  # plain joint blocks
    "sd35_large": MMDiTConfig(**SMALL, qk_norm="rms_norm"),
    "sd35_medium": MMDiTConfig(**SMALL, dual_attention_layers=(0, 1), qk_norm="rms_norm"),  # MMDiT-X
    "other": MMDiTConfig(**{**SMALL, "num_layers": 2, "patch_size": 1, "out_channels": 6, "num_attention_heads": 3,
                            "caption_projection_dim": 48}, dual_attention_layers=(1,)),  # pre-only with attn2
    "tiny": TINY_MMDIT_CONFIG,
}
# latent sizes (H, W) per patch size: non-square both ways, the full 13-patch height, and 4x6 patches whose crop
# of the 13x13 grid is off-centre ((13 - 4) // 2 = 4 rows above, 5 below)
SIZES = {2: [(8, 12), (26, 6), (10, 10)], 1: [(4, 6), (13, 5)]}


def diffusers_model(cfg: MMDiTConfig) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**{k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")})


def randomized(model: torch.nn.Module, seed=0) -> dict:
    """Every parameter perturbed (norm gains too, so a swapped q/k norm cannot go unnoticed); pos_embed kept."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if "pos_embed.pos_embed" in k else v + 0.1 * torch.randn(v.shape, generator=g)
            for k, v in model.state_dict().items()}


def pair(cfg: MMDiTConfig):
    torch.manual_seed(0)
    ref = diffusers_model(cfg)
    ref.load_state_dict(randomized(ref))
    ours = SD3Transformer(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: MMDiTConfig, h=8, w=12, b=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, cfg.in_channels, h, w, generator=g),
                encoder_hidden_states=torch.randn(b, tokens, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([999.0, 3.5, 500.0][:b]))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def forward_backward(model, x, diffusers_api: bool):
    """Output and the gradients of a fixed random projection of it, w.r.t. parameters and the three inputs."""
    x = {k: v.clone().requires_grad_(k != "timestep") for k, v in x.items()}
    model.zero_grad()
    out = model(**x).sample if diffusers_api else model(**x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * probe).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads |= {k: v.grad for k, v in x.items() if k != "timestep"}
    return out.detach(), grads


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_diffusers_outputs_and_gradients(name):
    cfg = VARIANTS[name]
    ref, ours = pair(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    for h, w in SIZES[cfg.patch_size] if cfg.pos_embed_max_size == 13 else [(8, 12), (16, 6)]:
        x = inputs(cfg, h, w)
        expected, ref_grads = forward_backward(ref, x, diffusers_api=True)
        got, grads = forward_backward(ours, x, diffusers_api=False)
        assert got.shape == expected.shape == x["hidden_states"].shape[:1] + (cfg.out_channels, h, w)
        assert rel_err(got, expected) < 1e-5, (h, w)
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            assert rel_err(grads[k], ref_grads[k]) < 1e-5, (h, w, k)


def test_strict_load_of_a_diffusers_state_dict_and_config_round_trip():
    for cfg in (*VARIANTS.values(), SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE):
        assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    ref, _ = pair(VARIANTS["sd35_medium"])
    with torch.device("meta"):
        ours = SD3Transformer(config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="qk_norm 'layer_norm' is not supported"):
        config_from_diffusers({**config_to_diffusers(SD35_LARGE), "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="caption_projection_dim 1536 != .* 2432"):
        config_from_diffusers({**config_to_diffusers(SD35_LARGE), "caption_projection_dim": 1536})


def test_released_configs_build_the_released_models():
    """The released configs, built on the meta device (no memory): diffusers' names and shapes, 2.03 B, 2.24 B and
    8.06 B parameters, and the config read back from the SAI-named state dict's shapes."""
    counts = {}
    for name, cfg in (("sd3_medium", SD3_MEDIUM), ("sd35_medium", SD35_MEDIUM), ("sd35_large", SD35_LARGE)):
        with torch.device("meta"):
            ours, ref = SD3Transformer(cfg).state_dict(), diffusers_model(cfg).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
        counts[name] = sum(v.numel() for k, v in ours.items() if k != "pos_embed.pos_embed")
        assert config_from_sai(transformer_diffusers_to_sai(ours)) == cfg
    assert counts == {"sd3_medium": 2_028_328_000, "sd35_medium": 2_243_171_520, "sd35_large": 8_056_627_520}


def test_output_depends_on_every_input():
    cfg = VARIANTS["sd35_medium"]
    _, ours = pair(cfg)
    x = inputs(cfg)
    with torch.no_grad():
        base = ours(**x)
        for k in x:
            assert rel_err(ours(**{**x, k: x[k] + 1}), base) > 1e-4, k
        # and only on the text tokens given: a batch entry does not see the others
        assert rel_err(ours(**{k: v[:1] for k, v in x.items()}), base[:1]) < 1e-6


def test_gradient_checkpointing_same_output_and_grads():
    cfg = VARIANTS["sd35_medium"]
    _, ours = pair(cfg)
    x = inputs(cfg)
    out_a, grads_a = forward_backward(ours, x, diffusers_api=False)
    ours.set_gradient_checkpointing(True)
    calls = []
    ours.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    out_b, grads_b = forward_backward(ours, x, diffusers_api=False)
    assert len(calls) == 2  # forward, and recomputed in backward
    assert torch.equal(out_a, out_b)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_bf16_close_to_fp32():
    cfg = VARIANTS["sd35_medium"]
    _, ours = pair(cfg)
    x = inputs(cfg)
    with torch.no_grad():
        expected = ours(**x)
        ours.to(torch.bfloat16)
        got = ours(**{k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in x.items()})
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) < 3e-2


def test_shape_errors_name_the_size():
    _, ours = pair(VARIANTS["sd3_medium"])
    with pytest.raises(ValueError, match="latent size 9x12 is not a multiple of the patch size 2"):
        ours(**inputs(VARIANTS["sd3_medium"], h=9))
    with pytest.raises(ValueError, match="latent of 14x6 patches exceeds pos_embed_max_size 13"):
        ours(**inputs(VARIANTS["sd3_medium"], h=28))


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg,index", [("sd35_medium_dual", SD35_MEDIUM, 0), ("sd35_large", SD35_LARGE, 0),
                                            ("sd35_large_last", SD35_LARGE, 37)])
def test_full_width_block_matches_diffusers(name, cfg, index):
    """One full-width joint block (3.5 Medium's first, with attn2; 3.5 Large's first and its pre-only last), 64
    image tokens and 32 text tokens; ours takes diffusers' tensors by assignment (one copy in memory)."""
    torch.manual_seed(0)
    d, pre_only, dual = cfg.inner_dim, index == cfg.num_layers - 1, index in cfg.dual_attention_layers
    ref = DiffusersJointBlock(d, cfg.num_attention_heads, cfg.attention_head_dim, context_pre_only=pre_only,
                              qk_norm=cfg.qk_norm, use_dual_attention=dual).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n and n.endswith("weight") and p.ndim == 1:  # RMS gains: not all ones
                p.add_(0.1 * torch.randn_like(p))
    with torch.device("meta"):
        ours = JointTransformerBlock(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm, pre_only, dual)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(1)
    x, c, temb = torch.randn(1, 64, d, generator=g), torch.randn(1, 32, d, generator=g), torch.randn(1, d, generator=g)
    with torch.no_grad():
        ref_c, ref_x = ref(x, c, temb)
        got_x, got_c = ours(x, c, temb)
    assert rel_err(got_x, ref_x) < 1e-5
    assert (got_c is None) == (ref_c is None) == pre_only
    if not pre_only:
        assert rel_err(got_c, ref_c) < 1e-5
