"""A small, real T5 tokenizer built offline for the FLUX models' second text encoder (T5-XXL's encoder).

It is a SentencePiece-style Unigram model laid out like T5's: `<pad>`=0, `</s>`=1, `<unk>`=2, whitespace split,
"▁" marking a word start, `</s>` appended; the stock `T5Tokenizer` (`T5TokenizerFast` is the same class) builds
exactly this pipeline from the saved vocabulary, so `from_pretrained` reloads it unchanged. The pieces are one
"▁word" and one bare "word" for each word of the CLIP tokenizer's WORDS (so "three-quarter" still ends in one
"quarter" piece, as with T5's own vocabulary), then every printable Latin-1 character, so ASCII and Latin-1 text
never meets `<unk>`; like the real T5, characters beyond those have no piece and become `<unk>`. T5Tokenizer
cannot fall back to bytes. There are no `<extra_id_*>` sentinels: FLUX never uses them. Word pieces score well
above characters, so a listed word always stays whole. Everything is a pure function of WORDS.
"""

from __future__ import annotations

from functools import cache

from transformers import T5Tokenizer

from lora_pipeline.core.models.tokenizer import WORDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
WORD_START = "▁"
_WORD_SCORE, _CHAR_SCORE = -5.0, -10.0


def _characters() -> list[str]:
    return [c for c in map(chr, range(256)) if c.isprintable() and not c.isspace()]


@cache
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) in id order: the specials, "▁", the word pieces, the characters."""
    words = tuple(dict.fromkeys(WORDS))
    pieces = {PAD: 0.0, EOS: 0.0, UNK: 0.0, WORD_START: _CHAR_SCORE}
    pieces.update((WORD_START + word, _WORD_SCORE) for word in words)
    pieces.update((word, _WORD_SCORE) for word in words)
    pieces.update((char, _CHAR_SCORE) for char in _characters() if char not in pieces)  # "a" is a word already
    return tuple(pieces.items())


def build_t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """The FLUX models' T5 tokenizer, padding and truncating to `model_max_length` tokens."""
    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length)
