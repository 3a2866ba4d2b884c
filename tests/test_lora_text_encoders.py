"""Text-encoder parts of LoRA files (kohya lora_te1_/lora_te2_, peft text_encoder./text_encoder_2.): `load_lora`
with the text encoders, and the sampler, give the prompt embeddings diffusers' `load_lora_weights` gives.

Tolerance: rel. L2 < 2e-5 on the embeddings (ours merges W + dW once per weight, diffusers runs peft's unmerged
branch; fp32 rounding through 2-layer tiny CLIPs, measured ~1e-7)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora.layer import LoRAConfig
from sampling.inference import ImageGenerator
from sdxl.loading import load_text_encoder, load_unet
from sdxl.lora import apply_lora, load_lora, save_lora
from tests.test_lora import rel_err
from tests.test_lora_kinds import randomize

PROMPTS = ["a large red circle on a white background", "a small blue square"]
ATTENTION = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
# diffusers 0.42 converts kohya text-encoder keys of attention and MLP layers to two different old formats and
# then applies only one of them (the other's keys are dropped as "unexpected"): so kohya files are compared with
# diffusers on attention layers, and on the MLP too against our own reading of the same LoRA in peft names.
ALL = (*ATTENTION, "mlp.fc1", "mlp.fc2")


def text_encoder_tensors(te, fmt: str, targets=ALL, seed=3, rank=4, alpha=2.0) -> dict[str, torch.Tensor]:
    """A random LoRA on some Linear layers of both encoders, in kohya or peft (alpha folded into B) names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, m in te.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith(targets):
            down = torch.randn(rank, m.in_features, generator=g) * 0.1
            up = torch.randn(m.out_features, rank, generator=g) * 0.1
            # the names files use (transformers 4's module tree: text_model.encoder...)
            component, _, rest = path.partition(".")
            rest = "text_model." + rest.removeprefix("text_model.")
            if fmt == "kohya":
                key = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + rest.replace(".", "_")
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)}
            else:
                key = f"{component}.{rest}"
                tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up * (alpha / rank)}
    assert any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in tensors)
    return tensors


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_text_encoder_lora_equals_diffusers(tmp_path, tiny_dir, pipe, fmt):
    unet = load_unet(tiny_dir)
    config = LoRAConfig(rank=4, alpha=3.0, target_mode="attention")
    apply_lora(unet, config)
    randomize(unet)
    path = save_lora(unet, tmp_path / "unet.safetensors", config, format=fmt)
    te = load_text_encoder(tiny_dir)
    targets = ATTENTION if fmt == "kohya" else ALL
    save_file(load_file(path) | text_encoder_tensors(te, fmt, targets), tmp_path / "both.safetensors")
    plain = te.encode(PROMPTS)
    load_lora(load_unet(tiny_dir), tmp_path / "both.safetensors", text_encoder=te)
    embeds, pooled = te.encode(PROMPTS)
    pipe.load_lora_weights(str(tmp_path / "both.safetensors"), adapter_name=f"te_{fmt}")
    try:
        with torch.no_grad():
            expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        assert rel_err(embeds, expected) < 2e-5 and rel_err(pooled, expected_pooled) < 2e-5
        assert rel_err(plain[0], expected) > 1e-3 and rel_err(plain[1], expected_pooled) > 1e-3  # it did change
    finally:
        pipe.unload_lora_weights()

    # the sampler applies the text-encoder part too
    gen = ImageGenerator.from_pretrained(tiny_dir, loras=[(tmp_path / "both.safetensors", 1.0)])
    assert torch.equal(gen.text_encoder.encode(PROMPTS)[0], embeds)


def test_kohya_and_peft_text_encoder_names_read_the_same(tmp_path, tiny_dir):
    """Every Linear of both encoders (attention and MLP): kohya names == peft names, read by us."""
    embeds = []
    for fmt in ("kohya", "diffusers"):
        te = load_text_encoder(tiny_dir)
        save_file(text_encoder_tensors(te, fmt), tmp_path / f"{fmt}.safetensors")
        load_lora(load_unet(tiny_dir), tmp_path / f"{fmt}.safetensors", text_encoder=te)
        embeds.append(te.encode(PROMPTS))
    assert rel_err(embeds[0][0], embeds[1][0]) < 1e-6 and rel_err(embeds[0][1], embeds[1][1]) < 1e-6


def test_text_encoder_keys_without_encoders_name_the_key(tmp_path, tiny_dir):
    te = load_text_encoder(tiny_dir)
    tensors = text_encoder_tensors(te, "kohya")
    save_file(tensors, tmp_path / "te.safetensors")
    with pytest.raises(ValueError, match=r"lora_te1_text_model_encoder_layers_\d+_.*text-encoder"):
        load_lora(load_unet(tiny_dir), tmp_path / "te.safetensors")
    bad = {"lora_te1_text_model_encoder_layers_99_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8),
           "lora_te1_text_model_encoder_layers_99_self_attn_q_proj.lora_up.weight": torch.zeros(8, 4)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="layers_99.*names no module"):
        load_lora(load_unet(tiny_dir), tmp_path / "bad.safetensors", text_encoder=te)
