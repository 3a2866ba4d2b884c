"""Prompts longer than a text encoder reads: CLIP reads 77 tokens, T5 its max_sequence_length (256 or 512); the rest
of a longer prompt is dropped, as diffusers' pipelines drop it (they log which part). `cut_note` counts the prompts
(or training captions) that are cut and says so in one line, once, where a run starts.

Each family's text encoder lists its limits in `token_limits()`: (label, tokenizer, tokens), e.g.
("CLIP", CLIPTokenizer, 77) (sdxl/text_encoders.py, sd3/..., flux/...). A prompt's tokens are counted as its
tokenizer makes them, begin and end tokens included (what the limit counts).
"""


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of `prompt` with its begin/end tokens, uncut (`verbose=False`: transformers' own warning off)."""
    return len(tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False).input_ids)


def cut_prompts(text_encoder, prompts: list[str]) -> list[tuple[str, int, dict[str, int]]]:
    """(label, tokens, {prompt: its token count}) for each limit of `text_encoder.token_limits()`: the distinct
    prompts longer than it. A prompt of n UTF-8 bytes has at most n + 2 tokens: shorter ones are not tokenized."""
    distinct = sorted(set(prompts))
    found = []
    for label, tokenizer, limit in text_encoder.token_limits():
        counts = {p: token_count(tokenizer, p) for p in distinct if len(p.encode("utf-8")) + 2 > limit}
        found.append((label, limit, {p: n for p, n in counts.items() if n > limit}))
    return found


def cut_note(text_encoder, prompts: list[str], names: list[str] | None = None, what: str = "prompts") -> str | None:
    """`note: 3 of 36 captions are longer than CLIP's 77 tokens and are cut (the longest, NAME, has 1604 tokens)`,
    one clause per limit, or None when nothing is cut. Counts `prompts` as given (a caption per image: repeats
    count); `prompts[i]` is called `names[i]` (a file, an image)."""
    parts = []
    for label, limit, long in cut_prompts(text_encoder, prompts):
        n = sum(p in long for p in prompts)
        if not n:
            continue
        longest = max(long, key=long.get)
        name = f", {names[prompts.index(longest)]}," if names else ""
        parts.append(f"{n} of {len(prompts)} {what} {'is' if n == 1 else 'are'} longer than {label}'s {limit} tokens "
                     f"and {'is' if n == 1 else 'are'} cut (the longest{name} has {long[longest]} tokens)")
    if not parts:
        return None
    return "note: " + "; ".join(parts) + ": the text past a limit is not read"
