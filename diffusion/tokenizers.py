"""Tokenizers of the tiny models, built locally (no download): CLIP's BPE and T5's Unigram, each with a byte-level
vocabulary so that any text, emoji included, tokenizes without unknown tokens.

CLIP: `CLIPTokenizer` over every byte (GPT-2's byte -> printable table) plus a few merges, so the BPE path runs.
T5: `T5Tokenizer` (transformers' tokenizers-backed T5) over printable ASCII and a few hundred common English words
(the tiny world's among them, so its captions are a dozen tokens, as real T5 makes them), with and without
SentencePiece's
word-start mark, `<unk>` for anything else (transformers rebuilds a saved T5 tokenizer without byte fallback),
`</s>` appended as T5's tokenizer does; ids 0, 1, 2 are <pad>, </s>, <unk> as in T5's own vocabulary.
"""

import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTokenizer, T5Tokenizer

# A few merges so the BPE path is exercised; CLIP's real merges.txt has 48894.
TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"))


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's byte -> printable symbol table, in vocabulary order (printable bytes first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    # Printable bytes map to themselves; the others to 256, 257, ... so no symbol is whitespace/control.
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_vocab_files(folder: Path) -> None:
    """Write CLIP-style vocab.json and merges.txt: bytes, bytes + "</w>", merges, then the special tokens."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in TINY_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{a} {b}\n" for a, b in TINY_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")


def build_clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a byte-level vocabulary, built locally.

    SDXL's tokenizer 1 pads with "<|endoftext|>", tokenizer 2 with "!".
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab_files(Path(tmp))
        # vocab.json + merges.txt is the layout both transformers 4 (slow tokenizer) and 5 (converted
        # to a `tokenizers` BPE on load) read; once loaded the tokenizer needs no files.
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp,
            local_files_only=True,
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token=pad_token,
        )
    # transformers 5 records how it was loaded and would write it into tokenizer_config.json.
    for loader_key in ("is_local", "local_files_only", "vocab_file", "merges_file"):
        tokenizer.init_kwargs.pop(loader_key, None)
    return tokenizer


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's spiece.model
T5_WORDS = """a an the of on in at to and or with without is are this that it for from by as be
small large big tiny red orange yellow green blue purple violet white black gray grey pink brown cyan
circle square triangle star ring shape shapes background top bottom left right center middle picture photo
dog cat person man woman car tree house sky water light dark color colour over under near two one""".split()


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 Unigram tokenizer with a byte-level vocabulary, built locally (what diffusers' SD3 and FLUX pipelines
    load as `tokenizer_3` / `tokenizer_2`); `save_pretrained` writes a folder `T5Tokenizer.from_pretrained` reads."""
    printable = [chr(c) for c in range(33, 127)]
    pieces = ["\u2581", *printable, *("\u2581" + c for c in printable)]  # \u2581: SentencePiece's word start
    words = ["\u2581" + w for w in T5_WORDS]  # a whole word scores better than its letters
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [(p, -1.0) for p in pieces] + [(w, -1.5) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    built = T5Tokenizer(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                        model_max_length=512)
    with tempfile.TemporaryDirectory() as tmp:  # what a saved folder gives (transformers adds its own normalizer)
        built.save_pretrained(tmp)
        return T5Tokenizer.from_pretrained(tmp, local_files_only=True)
