"""A word-level CLIP tokenizer for the shapes grammar, loadable by stock `CLIPTokenizer`.

CLIP's tokenizer is byte-level BPE: a word starts as characters (the last one suffixed with
"</w>") and merges apply lowest rank first. Learning BPE on the grammar's words until every word
is a single symbol gives merges that, applied in that order, rebuild each grammar word as one
token (BPE encoding reproduces the segmentation it was learned on). Words outside the grammar
fall apart into letters, which are in the vocabulary too, so no input is ever unknown.
"""

from __future__ import annotations

import itertools
import json
import string
import tempfile
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from selfcascade.demo.shapes import grammar_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Longest caption: "two yellow triangles and a yellow square" is 7 words, plus BOS and EOS.
MAX_LENGTH = 16


def learn_word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until each word is a single symbol."""
    words_symbols = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in words_symbols):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in words_symbols:
            pairs.update(itertools.pairwise(symbols))
        # Ties broken by the pair itself, so the vocabulary never depends on dict order.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words_symbols = [_merge(symbols, best) for symbols in words_symbols]
    return merges


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + [a + b for a, b in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> Path:
    """vocab.json and merges.txt, the two files `CLIPTokenizer.from_pretrained` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_word_merges(words or grammar_words())
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges), indent=1))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    return folder


def build_word_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """The grammar's tokenizer; `save_pretrained` it into a pipeline's `tokenizer/` folder."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(tmp)
        # from_pretrained reads vocab.json + merges.txt under transformers 4.x and 5.x alike.
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)
