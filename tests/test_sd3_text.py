"""sd3/text_encoders.py (and diffusion/t5.py) against diffusers' StableDiffusion3Pipeline.encode_prompt, on the tiny
SD 3.5's encoders, with and without T5.

Tolerance: exact (torch.equal). Both sides load the same files and run the same transformers modules on the same
token ids; any difference means a different tokenization, padding, layer choice, pooling or zero-padding rule.
"""

import shutil

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd3.loading import load_text_encoder
from sd3.text_encoders import SD3TextEncoder
from sd3.tiny import tiny_sd3_path

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on a shared CPU

SHORT = "a photo of a cat"
LONG = " ".join(f"word{i}" for i in range(100))  # > 77 CLIP tokens and > 256 T5 tokens: truncated
NON_ASCII = "café 東京 🙂 naïve Ωmega"  # T5's tiny vocabulary: <unk> for these
PROMPTS = [SHORT, "", LONG, NON_ASCII]


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd3_path()


@pytest.fixture(scope="module")
def pipe(tiny):
    return StableDiffusion3Pipeline.from_pretrained(tiny, local_files_only=True)


def pipeline_encode(pipe, prompts, max_sequence_length, t5=True):
    if not t5:  # the pipeline as loaded without its T5 encoder
        pipe = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    with torch.no_grad():  # as inside the pipeline's __call__
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return embeds, pooled


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
@pytest.mark.parametrize("max_sequence_length", [256, 32])
def test_encode_equals_pipeline_encode_prompt(pipe, t5, max_sequence_length):
    enc = load_text_encoder("tiny-sd3", t5=t5, max_sequence_length=max_sequence_length)
    assert len(enc.tokenizer(LONG).input_ids) > 77  # really exercises CLIP's truncation
    assert len(pipe.tokenizer_3(LONG).input_ids) > 256  # and T5's
    embeds, pooled = enc.encode(PROMPTS)
    ref_embeds, ref_pooled = pipeline_encode(pipe, PROMPTS, max_sequence_length, t5=t5)
    assert embeds.shape == (4, 77 + max_sequence_length, 128) and pooled.shape == (4, 32 + 64)
    assert torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)
    assert embeds.dtype == pooled.dtype == torch.float32
    assert embeds[:, :77, 96:].abs().max() == 0  # CLIP-L 32 + CLIP-G 64 channels, zero-padded to T5's 128
    assert (embeds[:, 77:].abs().max() == 0) == (not t5)


def test_batch_entries_are_independent_and_prompts_matter(tiny):
    enc = SD3TextEncoder.from_pretrained(tiny, max_sequence_length=32)
    embeds, pooled = enc.encode(PROMPTS)
    alone_embeds, alone_pooled = enc.encode(NON_ASCII)  # a str is one prompt
    torch.testing.assert_close(embeds[3:], alone_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[3:], alone_pooled, atol=1e-5, rtol=0)
    for part in (embeds[:, :77], embeds[:, 77:], pooled):  # CLIP tokens, T5 tokens, pooled all see the prompt
        assert (part[0] - part[1]).abs().max() > 1e-3


def test_frozen_and_forward_has_gradients(tiny):
    enc = SD3TextEncoder.from_pretrained(tiny, max_sequence_length=16)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.training  # frozen, in eval mode; the loop calls .train(True) only while a CLIP LoRA trains
    enc.train()
    assert enc.text_encoder.training and enc.text_encoder_2.training and not enc.text_encoder_3.training  # T5: never
    enc.eval()
    layer = enc.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj
    layer.weight.requires_grad_(True)  # what a LoRA on CLIP-G will do
    embeds, pooled = enc([SHORT])
    (embeds.square().sum() + pooled.sum()).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().max() > 0
    with torch.no_grad():
        assert torch.equal(embeds, enc.encode([SHORT])[0])


def test_bf16(tiny):
    enc = SD3TextEncoder.from_pretrained(tiny, dtype=torch.bfloat16, max_sequence_length=16)
    embeds, pooled = enc.encode([SHORT])
    assert embeds.dtype == torch.bfloat16 and pooled.dtype == torch.bfloat16
    ref, _ = load_text_encoder("tiny-sd3", max_sequence_length=16).encode([SHORT])
    assert ((embeds.float() - ref).norm() / ref.norm()).item() < 3e-2  # 8 mantissa bits over 3 small encoders


def test_missing_t5_is_one_line(tiny, tmp_path):
    folder = tmp_path / "no_t5"
    shutil.copytree(tiny, folder)
    shutil.rmtree(folder / "text_encoder_3")
    with pytest.raises(ValueError, match=r"missing text_encoder_3/; leave T5 out \(--no_t5\)"):
        SD3TextEncoder.from_pretrained(folder)
    enc = SD3TextEncoder.from_pretrained(folder, t5=False, max_sequence_length=8)
    embeds, _ = enc.encode([SHORT])
    assert embeds.shape == (1, 85, 128) and embeds[:, 77:].abs().max() == 0  # zeros as wide as joint_attention_dim
