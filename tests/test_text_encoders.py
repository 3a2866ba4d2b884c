"""sdxl/text_encoders.py against diffusers' StableDiffusionXLPipeline.encode_prompt, on the tiny encoders.

Tolerance 1e-5 (fp32): both sides run the same transformers modules on the same token ids, so any
difference beyond float noise means a different tokenization, layer choice or pooling rule.
"""

import filecmp
import os
import shutil
import sys
import types

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from diffusion.tokenizers import build_clip_tokenizer
from sdxl.loading import load_text_encoder
from sdxl.text_encoders import SDXLTextEncoder
from sdxl.tiny import write_tiny_text_encoders

SHORT = "a photo of a cat"
LONG = " ".join(f"word{i}" for i in range(100))  # > 77 tokens: truncated, EOS kept at position 76
NON_ASCII = "café 東京 🙂 naïve Ωmega"
PROMPTS = [SHORT, "", LONG, NON_ASCII]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_text")
    write_tiny_text_encoders(root)
    return root


@pytest.fixture(scope="module")
def encoder(tiny_root):
    return SDXLTextEncoder.from_pretrained(tiny_root)


def _diffusers_encode(enc: SDXLTextEncoder, prompts: list[str]):
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=enc.text_encoder,
        text_encoder_2=enc.text_encoder_2,
        tokenizer=enc.tokenizer,
        tokenizer_2=enc.tokenizer_2,
        unet=None,
        scheduler=None,
        add_watermarker=False,
    )
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return embeds, pooled


def test_encode_matches_diffusers_encode_prompt(encoder):
    assert len(encoder.tokenizer(LONG).input_ids) > 77  # really exercises truncation
    embeds, pooled = encoder.encode(PROMPTS)
    ref_embeds, ref_pooled = _diffusers_encode(encoder, PROMPTS)
    assert embeds.shape == (4, 77, 96) and pooled.shape == (4, 32)
    assert ref_embeds.shape == embeds.shape and ref_pooled.shape == pooled.shape
    assert embeds.dtype == pooled.dtype == torch.float32
    assert (embeds - ref_embeds).abs().max().item() <= 1e-5
    assert (pooled - ref_pooled).abs().max().item() <= 1e-5


def test_batch_entries_are_independent(encoder):
    embeds, pooled = encoder.encode(PROMPTS)
    alone_embeds, alone_pooled = encoder.encode([NON_ASCII])
    torch.testing.assert_close(embeds[3:], alone_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled[3:], alone_pooled, atol=1e-5, rtol=0)


def test_different_prompts_give_different_embeddings(encoder):
    embeds, pooled = encoder.encode(["a red cat", "a blue dog"])
    assert (embeds[0] - embeds[1]).abs().max().item() > 1e-3
    assert (pooled[0] - pooled[1]).abs().max().item() > 1e-3


def test_encoders_are_frozen(encoder):
    """Frozen and in eval mode as loaded; only a run whose text-encoder LoRA trains puts it in train mode."""
    assert not encoder.training and not encoder.text_encoder.training and not encoder.text_encoder_2.training
    assert not any(p.requires_grad for p in encoder.parameters())


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_byte_level_no_unknown_tokens(pad_token, tmp_path):
    tok = build_clip_tokenizer(pad_token)
    assert tok.model_max_length == 77
    assert tok.convert_ids_to_tokens(tok.pad_token_id) == pad_token
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == tok.unk_token == "<|endoftext|>"
    ids = tok(NON_ASCII).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # unk is <|endoftext|>: only the final EOS may be it
    assert tok.decode(ids, skip_special_tokens=True) == NON_ASCII.lower()

    tok.save_pretrained(tmp_path)
    reloaded = type(tok).from_pretrained(tmp_path, local_files_only=True)
    assert reloaded(NON_ASCII).input_ids == ids
    assert reloaded.pad_token == pad_token and reloaded.model_max_length == 77


def test_tiny_build_is_byte_identical(tmp_path):
    write_tiny_text_encoders(tmp_path / "a")
    write_tiny_text_encoders(tmp_path / "b")
    files = sorted(
        os.path.relpath(os.path.join(d, f), tmp_path / "a")
        for d, _, fs in os.walk(tmp_path / "a")
        for f in fs
    )
    assert "text_encoder/model.safetensors" in files and "tokenizer_2/vocab.json" in files
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []


def test_fp16_variant_files_load(tiny_root, encoder, tmp_path):
    root = tmp_path / "fp16"
    shutil.copytree(tiny_root, root)
    fresh = SDXLTextEncoder.from_pretrained(tiny_root)  # a copy, so the shared fixture stays fp32-exact
    for name in ("text_encoder", "text_encoder_2"):
        os.remove(root / name / "model.safetensors")
        getattr(fresh, name).to(torch.float16).save_pretrained(root / name, variant="fp16")
    assert (root / "text_encoder" / "model.fp16.safetensors").is_file()
    loaded = SDXLTextEncoder.from_pretrained(root, dtype=torch.float32)
    embeds, pooled = loaded.encode([SHORT])
    ref_embeds, ref_pooled = encoder.encode([SHORT])
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, ref_embeds, atol=1e-2, rtol=1e-2)  # fp16-rounded weights
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-2, rtol=1e-2)


def test_tiny_word_uses_sdxl_tiny(tiny_root, monkeypatch):
    # sdxl/tiny.py is written separately; stand in for it so this test only checks the lazy hook.
    fake = types.ModuleType("sdxl.tiny")
    fake.tiny_model_path = lambda: tiny_root
    monkeypatch.setitem(sys.modules, "sdxl.tiny", fake)
    embeds, pooled = load_text_encoder("tiny").encode([SHORT])
    assert embeds.shape == (1, 77, 96) and pooled.shape == (1, 32)


def test_missing_folder_error_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model.*download_weights.sh"):
        SDXLTextEncoder.from_pretrained(missing)


def test_missing_subfolder_and_pickle_only_weights_are_errors(tiny_root, tmp_path):
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ValueError, match="missing text_encoder_2/, tokenizer/, tokenizer_2/"):
        SDXLTextEncoder.from_pretrained(tmp_path)
    for name in ("text_encoder_2", "tokenizer", "tokenizer_2"):
        os.symlink(tiny_root / name, tmp_path / name)
    (tmp_path / "text_encoder" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no model.safetensors .*text_encoder;"):
        SDXLTextEncoder.from_pretrained(tmp_path)
