"""FLUX.1's text encoding against diffusers' FluxPipeline.encode_prompt on the tiny model.

Tolerance: none (torch.equal): the same transformers models run on the same token ids in the same batch.
"""

import pytest
import torch
from diffusers import FluxPipeline

from flux.loading import load_text_encoder
from flux.text_encoders import FluxTextEncoder
from flux.tiny import tiny_flux_path

LONG = " ".join(f"word{i} with a red circle and a blue square" for i in range(60))  # > 512 T5, > 77 CLIP tokens
PROMPTS = ["a red square on a blue background", "", "😀 emoji, Ünïcödé and  double  spaces", LONG]


@pytest.fixture(scope="module")
def tiny_flux():
    return tiny_flux_path()


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    return FluxPipeline.from_pretrained(tiny_flux)


@pytest.fixture(scope="module")
def encoder(tiny_flux):
    return load_text_encoder("tiny-flux")


def test_long_prompt_is_truncated_by_both_tokenizers(encoder):
    """So that the next test compares truncation too."""
    assert len(encoder.tokenizer(LONG).input_ids) > 77
    assert len(encoder.tokenizer_2(LONG).input_ids) > 512


@pytest.mark.parametrize("length", [512, 256, 77])
def test_encode_equals_pipeline(pipe, encoder, length):
    encoder.max_sequence_length = length
    embeds, pooled = encoder.encode(PROMPTS)
    # under no_grad, as FluxPipeline.__call__ runs it (its encoders' weights require grad: with autograd on, T5's
    # attention takes another kernel, ~5e-6 off)
    with torch.no_grad():
        expected_embeds, expected_pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=length)
        alone, alone_pooled, _ = pipe.encode_prompt(PROMPTS[0], prompt_2=None, max_sequence_length=length)
    assert embeds.shape == (len(PROMPTS), length, 48) and pooled.shape == (len(PROMPTS), 32)
    assert torch.equal(embeds, expected_embeds)
    assert torch.equal(pooled, expected_pooled)
    assert not embeds.requires_grad and not pooled.requires_grad
    # one prompt alone (a string): the same rows
    one_embeds, one_pooled = encoder.encode(PROMPTS[0])
    assert torch.equal(one_embeds, alone) and torch.equal(one_pooled, alone_pooled)


def test_frozen_and_eval(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training and not encoder.text_encoder.training and not encoder.text_encoder_2.training
    encoder.train()  # what the loop does while a LoRA on CLIP-L trains: CLIP-L in train mode, T5 never
    try:
        assert encoder.text_encoder.training and not encoder.text_encoder_2.training
        assert not any(m.training for m in encoder.text_encoder_2.modules())  # T5's dropout stays off
    finally:
        encoder.eval()


def test_forward_has_gradients(tiny_flux):
    """forward() keeps the graph, for a LoRA on CLIP-L (and T5); encode() does not."""
    encoder = load_text_encoder(tiny_flux)
    clip, t5 = dict(encoder.text_encoder.named_parameters()), dict(encoder.text_encoder_2.named_parameters())
    weight = next(p for n, p in clip.items() if n.endswith("layers.0.self_attn.q_proj.weight"))
    weight_2 = next(p for n, p in t5.items() if n.endswith("block.0.layer.0.SelfAttention.q.weight"))
    weight.requires_grad_(True)
    weight_2.requires_grad_(True)
    embeds, pooled = encoder(["a red square", "a blue circle"])
    (embeds.square().mean() + pooled.square().mean()).backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert weight_2.grad is not None and weight_2.grad.abs().sum() > 0


def test_default_length_dtype_and_errors(tiny_flux, tmp_path):
    # tiny-flux is FLUX.1-dev-shaped (512), capped by its T5 tokenizer's model_max_length (32, flux/tiny.py)
    assert load_text_encoder("tiny-flux").max_sequence_length == 32
    bf16 = load_text_encoder(tiny_flux, dtype=torch.bfloat16, max_sequence_length=128)
    embeds, pooled = bf16.encode(["a red square"])
    assert embeds.dtype == pooled.dtype == torch.bfloat16 and embeds.shape[1] == 128
    with pytest.raises(ValueError, match="1..512"):
        FluxTextEncoder.from_pretrained(tiny_flux, max_sequence_length=513)
    with pytest.raises(ValueError, match="missing text_encoder_2/, tokenizer_2/"):
        (tmp_path / "text_encoder").mkdir()
        (tmp_path / "tokenizer").mkdir()
        FluxTextEncoder.from_pretrained(tmp_path)
