"""A real word-level ``CLIPTokenizer`` for the toy world, built from its vocabulary.

CLIP's tokenizer is byte-pair encoding over characters, with ``</w>`` marking the end of a word.
:func:`train_bpe` learns merges on the world's word list until every word is one token, so
captions tokenize word by word, while any other word still splits into character tokens (and
characters outside a-z into ``<|endoftext|>``, CLIP's unknown token) instead of failing.
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from pathlib import Path

from .scene import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # as Stable Diffusion 1.5, so every caller's padding="max_length" code works
_EOW = "</w>"


def _symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + _EOW]


def train_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges on ``words`` (each counted once) until every word is a single symbol.

    The most frequent adjacent pair is merged first; ties go to the lexicographically smallest
    pair, so the result is deterministic. Encoding any of ``words`` with the merges in this order
    reproduces training and yields one token.

    Args:
        words (`list[str]`): the words (lowercase, no spaces).

    Returns:
        `list[tuple[str, str]]`: merges, highest priority first.
    """
    segs = {w: _symbols(w) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for seg in segs.values():
            for pair in zip(seg, seg[1:]):
                pairs[pair] += 1
        if not pairs:
            return merges
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = out


def tokenizer_files(words: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Build CLIP's ``vocab.json`` mapping and ``merges.txt`` lines for a word list.

    The vocabulary holds every lowercase letter and digit (alone and word-final), common
    punctuation, every merge result, then ``<|startoftext|>`` and ``<|endoftext|>`` last.

    Args:
        words (`list[str]`, *optional*): defaults to :func:`vocabulary`.

    Returns:
        `tuple`: the token -> id mapping and the merge lines (``"#version: 0.2"`` first).
    """
    words = vocabulary() if words is None else words
    merges = train_bpe(words)
    chars = list(string.ascii_lowercase + string.digits) + list(",.;:!?'\"-()&/")
    tokens = list(dict.fromkeys([*chars, *(c + _EOW for c in chars), *(a + b for a, b in merges)]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    return vocab, lines


def save_tokenizer(folder: str | os.PathLike, words: list[str] | None = None):
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config to ``folder`` and load it back.

    Args:
        folder (`str` or `os.PathLike`): e.g. ``<pipeline>/tokenizer``.
        words (`list[str]`, *optional*): defaults to :func:`vocabulary`.

    Returns:
        `transformers.CLIPTokenizer`: the tokenizer, loaded through ``from_pretrained(folder)``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, lines = tokenizer_files(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    # Positional paths: transformers 5 ignores the vocab_file= / merges_file= keywords.
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )
    if len(tok) != len(vocab):
        raise RuntimeError(f"tokenizer built with {len(tok)} tokens, expected {len(vocab)}")
    tok.save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder))


def build_tokenizer(words: list[str] | None = None):
    """Build the toy world's ``CLIPTokenizer`` in a temporary folder (see :func:`save_tokenizer`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return save_tokenizer(tmp, words)
