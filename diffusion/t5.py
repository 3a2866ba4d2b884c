"""The T5 text tokens of SD 3.5 and FLUX.1: a frozen T5 v1.1 encoder (transformers `T5EncoderModel`, T5-XXL in the
real models; Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer").

Both pipelines encode the same way (diffusers `StableDiffusion3Pipeline._get_t5_prompt_embeds`,
`FluxPipeline._get_t5_prompt_embeds`): tokenize padded to exactly `max_sequence_length` tokens, truncated (a
truncated prompt still ends in `</s>`), and take the encoder's last hidden state with NO attention mask: the
padding tokens are encoded and attended to, and the models were trained so.
SD3 without its T5 (`--no_t5`, the pipeline with `text_encoder_3=None`) uses zeros of the same shape instead.
"""

import torch


def t5_token_ids(tokenizer, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """(B, max_sequence_length) token ids: `</s>`-terminated, padded with `<pad>`, truncated."""
    return tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids


def t5_embeddings(tokenizer, encoder, prompts: list[str], max_sequence_length: int, width: int | None = None,
                  dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """(B, max_sequence_length, d_model) T5 tokens of `prompts`, gradients as the caller's mode allows.

    `encoder` None: zeros (B, max_sequence_length, width) of `dtype` on `device` (SD3's text_encoder_3=None)."""
    if encoder is None:
        return torch.zeros(len(prompts), max_sequence_length, width, dtype=dtype, device=device)
    ids = t5_token_ids(tokenizer, prompts, max_sequence_length)
    return encoder(ids.to(encoder.device))[0].to(encoder.dtype)  # last hidden state, (B, L, d_model)
