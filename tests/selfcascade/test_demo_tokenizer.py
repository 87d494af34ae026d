"""The grammar's word-level tokenizer, as stock CLIPTokenizer loads it."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from selfcascade.demo.shapes import grammar_words, sample_example
from selfcascade.demo.tokenizer import build_word_tokenizer, write_tokenizer_files


def test_every_grammar_word_is_one_token(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path))
    ids = tokenizer("a red circle").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>",
    ]
    for word in grammar_words():
        assert len(tokenizer(word).input_ids) == 3, word
    for i in range(50):
        caption = sample_example(0, i)[0].text
        assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2


def test_unknown_words_fall_back_to_letters_not_unk() -> None:
    tokenizer = build_word_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("purple").input_ids)
    assert tokens[1:-1] == ["p", "u", "r", "p", "l", "e</w>"]


def test_longest_caption_fits_the_context(tmp_path: Path) -> None:
    tokenizer = build_word_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    longest = "two yellow triangles and a yellow square"
    assert len(reloaded(longest).input_ids) <= reloaded.model_max_length
    assert reloaded(longest).input_ids == tokenizer(longest).input_ids
