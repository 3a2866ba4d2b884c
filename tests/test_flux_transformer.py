"""Our FLUX transformer against diffusers' FluxTransformer2DModel on the same weights and inputs.

Tolerance: fp32 relative L2 error < 1e-5 on the output and on every gradient (parameters and inputs) of a scalar
loss: both run the same float32 operations, so differences come only from summation order (measured: outputs
bit-identical, gradients ~3e-7). bf16: < 3e-2 against fp32 (8 mantissa bits, ~0.4% per rounding, accumulated over
the residual blocks).
"""

import dataclasses
import gc

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from flux.configs import FLUX_DEV, FLUX_SCHNELL, config_from_diffusers, config_to_diffusers
from flux.tiny import TINY_TRANSFORMER_CONFIG
from flux.transformer import (
    DoubleStreamBlock,
    FluxConfig,
    FluxTransformer,
    SingleStreamBlock,
    image_ids,
    pack_latents,
    rope,
    text_ids,
    unpack_latents,
)

SCHNELL_STYLE = FluxConfig(  # no guidance; other depths, heads, head width, rotary split and text widths
    num_layers=1, num_single_layers=2, num_attention_heads=3, attention_head_dim=8, joint_attention_dim=24,
    pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
)  # fmt: skip
LATENT_SIZES = [(8, 8), (6, 10), (12, 4)]  # square, wide, tall (h, w of the 16-channel latent)


def diffusers_transformer(cfg: FluxConfig, seed=0) -> FluxTransformer2DModel:
    """diffusers' model with random weights, RMSNorm weights included (they start at 1: a swapped qk norm would
    go unnoticed)."""
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**{k: v for k, v in config_to_diffusers(cfg).items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm_" in name and "linear" not in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return ref.eval()


def inputs(cfg: FluxConfig, h=8, w=8, b=2, txt_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=pack_latents(torch.randn(b, 16, h, w, generator=g)),
        encoder_hidden_states=torch.randn(b, txt_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.93, 0.25, 0.5][:b]),
        img_ids=image_ids(h, w),
        txt_ids=text_ids(txt_len),
        guidance=torch.tensor([3.5, 1.0, 7.0][:b]) if cfg.guidance_embeds else None,
    )


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def outputs_and_grads(model, x, diffusers: bool):
    """Output, and the gradients of a fixed random projection of it w.r.t. every parameter and float input."""
    x = {k: v.detach().clone().requires_grad_(k in ("hidden_states", "encoder_hidden_states", "pooled_projections"))
         if torch.is_tensor(v) else v for k, v in x.items()}
    model.zero_grad()
    out = model(**x).sample if diffusers else model(**x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads |= {k: v.grad for k, v in x.items() if torch.is_tensor(v) and v.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("cfg", [TINY_TRANSFORMER_CONFIG, SCHNELL_STYLE], ids=["dev-style", "schnell-style"])
def test_matches_diffusers(cfg):
    ref = diffusers_transformer(cfg)
    ours = FluxTransformer(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    for i, (h, w) in enumerate(LATENT_SIZES):
        x = inputs(cfg, h, w, txt_len=7 - 2 * i, seed=i)
        expected, ref_grads = outputs_and_grads(ref, x, diffusers=True)
        got, grads = outputs_and_grads(ours, x, diffusers=False)
        assert got.shape == expected.shape == (2, h * w // 4, 64)
        assert rel_err(got, expected) < 1e-5, (h, w)
        assert grads.keys() == ref_grads.keys()
        worst = max((rel_err(grads[k], ref_grads[k]), k) for k in grads)
        assert worst[0] < 1e-5, worst


def test_scalar_timestep_and_guidance():
    """A Python float timestep and guidance broadcast over the batch, as a (B,) tensor of the same value does."""
    torch.manual_seed(0)
    model = FluxTransformer(TINY_TRANSFORMER_CONFIG).eval()
    x = inputs(TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        expected = model(**{**x, "timestep": torch.full((2,), 0.5), "guidance": torch.full((2,), 3.5)})
        assert torch.equal(model(**{**x, "timestep": 0.5, "guidance": 3.5}), expected)


def test_guidance_must_match_the_model():
    x = inputs(TINY_TRANSFORMER_CONFIG)
    with pytest.raises(ValueError, match="pass guidance"):
        FluxTransformer(TINY_TRANSFORMER_CONFIG)(**{**x, "guidance": None})
    y = inputs(SCHNELL_STYLE)
    with pytest.raises(ValueError, match="guidance=None"):
        FluxTransformer(SCHNELL_STYLE)(**{**y, "guidance": torch.ones(2)})


def test_config_round_trip():
    for cfg in (FLUX_DEV, FLUX_SCHNELL, TINY_TRANSFORMER_CONFIG, SCHNELL_STYLE):
        assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    assert config_from_diffusers({"guidance_embeds": True}) == FLUX_DEV  # diffusers' defaults are FLUX.1's
    with pytest.raises(ValueError, match="patch_size"):
        config_from_diffusers({**config_to_diffusers(FLUX_DEV), "patch_size": 2})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        config_from_diffusers({**config_to_diffusers(FLUX_DEV), "axes_dims_rope": [16, 56, 48]})


@pytest.mark.parametrize("h, w", LATENT_SIZES)
def test_latent_packing_equals_pipeline(h, w):
    latents = torch.randn(2, 16, h, w)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, h, w))
    # the pipeline's unpack takes the image size in pixels and the VAE's 8x factor
    assert torch.equal(unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8))
    assert torch.equal(unpack_latents(packed, h, w), latents)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    assert torch.equal(image_ids(h, w), expected_ids)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, h + 1, w))


def test_output_depends_on_every_input():
    torch.manual_seed(0)
    model = FluxTransformer(TINY_TRANSFORMER_CONFIG).eval()
    x = inputs(TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        base = model(**x)
        for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
            assert rel_err(model(**{**x, name: x[name] + 0.1}), base) > 1e-4, name
        for name in ("img_ids", "txt_ids"):  # positions move through the rotary embedding only
            moved = x[name].clone()
            moved[:, 1] += torch.arange(len(moved))
            assert rel_err(model(**{**x, name: moved}), base) > 1e-4, name


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = FluxTransformer(TINY_TRANSFORMER_CONFIG).eval()
    x = inputs(TINY_TRANSFORMER_CONFIG)
    with torch.no_grad():
        expected = model(**x)
        model.to(torch.bfloat16)
        got = model(**{k: v.to(torch.bfloat16) if torch.is_tensor(v) and k.endswith(("states", "projections"))
                       else v for k, v in x.items()})
    assert got.dtype == torch.bfloat16
    assert rel_err(got, expected) < 3e-2


def test_gradient_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = FluxTransformer(TINY_TRANSFORMER_CONFIG)
    x = inputs(TINY_TRANSFORMER_CONFIG)
    model.set_gradient_checkpointing(False)
    out_a, grads_a = outputs_and_grads(model, x, diffusers=False)
    model.set_gradient_checkpointing(True)
    calls = []
    model.transformer_blocks[1].register_forward_pre_hook(lambda *a: calls.append("double"))
    model.single_transformer_blocks[2].register_forward_pre_hook(lambda *a: calls.append("single"))
    out_b, grads_b = outputs_and_grads(model, x, diffusers=False)
    assert calls.count("double") == 2 and calls.count("single") == 2  # recomputed in the backward pass
    assert torch.equal(out_a, out_b)
    for n in grads_a:  # the same operations replayed: equal up to summation order
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------------
# Full-width blocks (FLUX.1's 3072 = 24 heads x 128, rotary axes 16/56/56): one of each, random weights


def block_inputs(seed=0, txt_len=16, h=16, w=12):
    g = torch.Generator().manual_seed(seed)
    dim = FLUX_DEV.inner_dim
    ids = torch.cat([text_ids(txt_len), image_ids(h, w)])
    return (torch.randn(1, h * w // 4, dim, generator=g), torch.randn(1, txt_len, dim, generator=g),
            torch.randn(1, dim, generator=g), ids)


def randomize_norms(block):
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm_" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return block


@pytest.mark.slow
def test_full_width_double_block_matches_diffusers():
    """340 M parameters, fp32: one copy, shared with our block by assignment; 16 text + 48 image tokens."""
    torch.manual_seed(0)
    cfg = FLUX_DEV
    ref = randomize_norms(FluxTransformerBlock(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim))
    with torch.device("meta"):
        ours = DoubleStreamBlock(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x, txt, temb, ids = block_inputs()
    with torch.no_grad():
        ref_txt, ref_x = ref(x, txt, temb, image_rotary_emb=FluxPosEmbed(10000, list(cfg.axes_dims_rope))(ids))
        our_txt, our_x = ours(x, txt, temb, rope(ids, cfg.axes_dims_rope))
    assert rel_err(our_x, ref_x) < 1e-5 and rel_err(our_txt, ref_txt) < 1e-5
    del ref, ours
    gc.collect()


@pytest.mark.slow
def test_full_width_single_block_matches_diffusers():
    """141 M parameters, fp32, on the joint sequence of 16 text + 48 image tokens."""
    torch.manual_seed(0)
    cfg = FLUX_DEV
    ref = randomize_norms(FluxSingleTransformerBlock(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim))
    with torch.device("meta"):
        ours = SingleStreamBlock(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x, txt, temb, ids = block_inputs(seed=1)
    with torch.no_grad():
        ref_txt, ref_x = ref(x, txt, temb, image_rotary_emb=FluxPosEmbed(10000, list(cfg.axes_dims_rope))(ids))
        joint = ours(torch.cat([txt, x], dim=1), temb, rope(ids, cfg.axes_dims_rope))
    assert rel_err(joint, torch.cat([ref_txt, ref_x], dim=1)) < 1e-5
    del ref, ours
    gc.collect()


def test_full_configs_match_diffusers():
    """FLUX.1-dev's and schnell's state dicts (names and shapes) against diffusers' model, on the meta device."""
    for cfg, params in ((FLUX_DEV, 11_901_408_320), (FLUX_SCHNELL, 11_891_178_560)):
        with torch.device("meta"):
            ours = FluxTransformer(cfg)
            ref = FluxTransformer2DModel(**{k: v for k, v in config_to_diffusers(cfg).items() if k[0] != "_"})
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert sum(p.numel() for p in ours.parameters()) == params
    assert dataclasses.replace(FLUX_DEV, guidance_embeds=False) == FLUX_SCHNELL
