"""Single-file (SGM / LDM) <-> diffusers key maps, checked against diffusers' own converters.

Oracle: diffusers/loaders/single_file_utils.py (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`) read
our SGM dicts and must give back the original diffusers/transformers state dicts, bit for bit.
"""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl.sgm import (
    PREFIXES,
    split_single_file,
    text_encoder_2_openclip_to_hf,
    text_encoder_sgm_to_hf,
    unet_sgm_names,
    unet_sgm_to_diffusers,
    vae_sgm_names,
    vae_sgm_to_diffusers,
)
from tests.sgm_writers import (
    text_encoder_2_hf_to_openclip,
    text_encoder_hf_to_sgm,
    unet_diffusers_to_sgm,
    vae_diffusers_to_sgm,
)

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8), cross_attention_dim=96, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    norm_num_groups=32,
)
UNET_VARIANTS = {
    "sdxl_like": {},
    "one_layer_deep_transformers": dict(layers_per_block=1, transformer_layers_per_block=(1, 2, 3)),
    "three_layers": dict(layers_per_block=3, transformer_layers_per_block=2),
}
SDXL_UNET = TINY_UNET | dict(  # the real sd_xl_base_1.0 UNet, built on the meta device only
    sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32, latent_channels=4,
)


def clip_config(**kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1, **kw)


def random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random values everywhere, so a swapped pair of tensors of equal shape cannot go unnoticed."""
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("variant", UNET_VARIANTS)
def test_unet_round_trip_and_diffusers_oracle(variant):
    unet = UNet2DConditionModel(**(TINY_UNET | UNET_VARIANTS[variant]))
    config, sd = dict(unet.config), random_state(unet)
    sgm = unet_diffusers_to_sgm(sd, config)
    assert_same(unet_sgm_to_diffusers(sgm, config), sd)
    oracle = convert_ldm_unet_checkpoint(prefixed(sgm, PREFIXES["unet"]), config)
    assert_same(oracle, sd)
    unet.load_state_dict(unet_sgm_to_diffusers(sgm, config), strict=True)


@pytest.mark.parametrize("variant", UNET_VARIANTS)
def test_unet_names_cover_exactly_the_parameter_modules(variant):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(TINY_UNET | UNET_VARIANTS[variant]))
    modules = {k.rpartition(".")[0] for k in unet.state_dict()}
    assert set(unet_sgm_names(dict(unet.config))) == modules


def test_unet_names_full_sdxl():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    names = unet_sgm_names(dict(unet.config))
    assert set(names) == {k.rpartition(".")[0] for k in unet.state_dict()}
    assert len(unet.state_dict()) == 1680  # the number of model.diffusion_model.* keys in sd_xl_base_1.0
    # Module names as they appear in kohya SDXL LoRA files (lora_unet_input_blocks_4_1_...).
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2":
            "input_blocks.8.1.transformer_blocks.9.ff.net.2",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0":
            "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "add_embedding.linear_2": "label_emb.0.2",
        "time_embedding.linear_1": "time_embed.0",
        "conv_norm_out": "out.0",
    }
    assert {k: names[k] for k in expected} == expected
    assert "down_blocks.0.resnets.0.conv_shortcut" not in names  # 320 -> 320: no shortcut


def test_unet_unknown_key_is_an_error_naming_it():
    config = TINY_UNET
    with pytest.raises(KeyError, match=r"input_blocks\.99\.0\.in_layers\.0\.weight"):
        unet_sgm_to_diffusers({"input_blocks.99.0.in_layers.0.weight": torch.zeros(1)}, config)
    with pytest.raises(KeyError, match=r"down_blocks\.0\.attentions\.0\.proj_in\.weight"):
        unet_diffusers_to_sgm({"down_blocks.0.attentions.0.proj_in.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="not SDXL-shaped"):
        unet_sgm_names(TINY_UNET | dict(mid_block_type="UNetMidBlock2D"))


def test_vae_round_trip_and_diffusers_oracle():
    vae = AutoencoderKL(**TINY_VAE)
    config, sd = dict(vae.config), random_state(vae)
    assert set(vae_sgm_names(config)) == {k.rpartition(".")[0] for k in sd}
    ldm = vae_diffusers_to_sgm(sd, config)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # 1x1 conv in LDM
    assert ldm["decoder.up.3.block.0.conv1.weight"] is sd["decoder.up_blocks.0.resnets.0.conv1.weight"]
    assert "decoder.up.0.upsample.conv.weight" not in ldm and "decoder.up.3.upsample.conv.weight" in ldm
    assert_same(vae_sgm_to_diffusers(ldm, config), sd)
    assert_same(convert_ldm_vae_checkpoint(prefixed(ldm, PREFIXES["vae"]), config), sd)
    vae.load_state_dict(vae_sgm_to_diffusers(ldm, config), strict=True)
    with pytest.raises(KeyError, match=r"encoder\.down\.9\.block\.0\.conv1\.weight"):
        vae_sgm_to_diffusers({"encoder.down.9.block.0.conv1.weight": torch.zeros(1)}, config)


def test_text_encoder_clip_l():
    model = CLIPTextModel(clip_config())
    sd = random_state(model)
    sgm = text_encoder_hf_to_sgm(sd)
    assert all(k.startswith("text_model.") for k in sgm)  # the layout of the SGM file (transformers 4 names)
    sgm["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # present in sd_xl_base_1.0
    assert_same(text_encoder_sgm_to_hf(sgm), sd)
    oracle = convert_ldm_clip_checkpoint(prefixed(sgm, PREFIXES["text_encoder"]))
    assert_same(oracle, sgm)  # diffusers also keeps the names behind the prefix
    model.load_state_dict(text_encoder_sgm_to_hf(sgm), strict=True)
    with pytest.raises(KeyError, match="logit_scale"):
        text_encoder_sgm_to_hf({"logit_scale": torch.zeros(())})


def test_text_encoder_2_openclip():
    model = CLIPTextModelWithProjection(clip_config(projection_dim=24, hidden_act="gelu"))
    sd = random_state(model)
    openclip = text_encoder_2_hf_to_openclip(sd)
    assert openclip["text_projection"].shape == (32, 24)  # [C, proj]: open_clip computes x @ P
    assert openclip["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert_same(text_encoder_2_openclip_to_hf(openclip | {"logit_scale": torch.ones(())}), sd)
    prefix = PREFIXES["text_encoder_2"]
    assert_same(convert_open_clip_checkpoint(model, prefixed(openclip, prefix), prefix=prefix), sd)
    model.load_state_dict(text_encoder_2_openclip_to_hf(openclip), strict=True)
    with pytest.raises(KeyError, match=r"transformer\.resblocks\.0\.attn\.bogus\.weight"):
        text_encoder_2_openclip_to_hf({"transformer.resblocks.0.attn.bogus.weight": torch.zeros(1)})


def test_split_single_file():
    t = torch.zeros(1)
    parts = {"unet": {"out.2.bias": t}, "vae": {"quant_conv.bias": t},
             "text_encoder": {"text_model.final_layer_norm.bias": t}, "text_encoder_2": {"ln_final.bias": t}}
    sd = {PREFIXES[name] + k: v for name, part in parts.items() for k, v in part.items()}
    assert split_single_file(sd | {"denoiser.sigmas": t}) == parts
    with pytest.raises(ValueError, match="not an SGM SDXL checkpoint"):
        split_single_file({"conv_in.weight": t, "down_blocks.0.resnets.0.conv1.weight": t})
    with pytest.raises(ValueError, match="refiner"):
        split_single_file(sd | {"conditioner.embedders.0.model.ln_final.bias": t})
