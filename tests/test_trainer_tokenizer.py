"""Tokenizers: the byte-level default round-trips any text with its special tokens; a local Hugging
Face tokenizer directory loads, gains the required special tokens it lacks, and round-trips too."""

from __future__ import annotations

import logging

import pytest

from model.config import get_preset
from trainer.components import build_model_config
from trainer.data import tokenizer as T
from trainer.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    WordTokenizer,
    load_tokenizer,
    model_vocab_size,
)

TEXTS = [
    "",
    "How many cubes are there?",
    "héllo wörld — 空间推理 🧊🟥",
    f"{T.IM_START}user\n{T.VISION_START}{T.IMAGE_PAD * 3}{T.VISION_END}Where?{T.IM_END}\n",
    f"{T.THINK}red cube: 4.2 m{T.END_THINK}the red cube{T.BBOX}12,34,567,999{T.END_BBOX}",
    f"{T.TIME_START}[1.5 second]{T.TIME_END}<|not_special|><think",
    "Is the red cubes cube to the left of  the\tblue? redder Red cubed 4.2m x=-0.3 m",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_word_round_trip(text):
    tok = WordTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_word_ids():
    byte, tok = ByteTokenizer(), WordTokenizer()
    assert tok.vocab_size == 268 + len(T.WORDS) == 268 + len(set(T.WORDS))
    # Specials and bytes keep the byte tokenizer's ids, so the presets' image_token_id holds.
    assert [tok.special_id(t) for t in T.SPECIAL_TOKENS] == list(range(256, 268))
    assert tok.image_token_id == byte.image_token_id
    # A known word is one id wherever it stands; unknown and partial words are bytes, spaces too.
    q = "Which is closer to the camera, the red cube or the blue sphere?"
    assert len(tok.encode(q)) == 27 and len(byte.encode(q)) == 63  # 13 words, 12 spaces, "," and "?"
    assert tok.encode(" red") == byte.encode(" ") + tok.encode("red") and len(tok.encode("red")) == 1
    assert tok.encode("redder") == byte.encode("redder")
    assert tok.encode("Red") == byte.encode("Red")
    assert tok.encode("4.2") == byte.encode("4.2")  # digits stay one id each
    assert load_tokenizer("words").vocab_size == tok.vocab_size
    assert model_vocab_size(tok, 256) == -(-tok.vocab_size // 16) * 16


def test_byte_special_tokens():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(T.SPECIAL_TOKENS) == 268
    ids = [tok.special_id(t) for t in T.SPECIAL_TOKENS]
    assert ids == list(range(256, 268))
    for t in T.SPECIAL_TOKENS:
        assert tok.encode(t) == [tok.special_id(t)], f"{t} must be one id"
    assert tok.image_token_id == tok.special_id(T.IMAGE_PAD)
    assert tok.eos_id == tok.pad_id == tok.special_id(T.EOS)
    # Text that only resembles a special token stays bytes.
    assert tok.encode("<think") == list(b"<think")
    assert model_vocab_size(tok, preset_vocab=256) == 272
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    # The tiny presets agree with the byte tokenizer by construction: usable without the trainer.
    for preset in ("seedvl-tiny", "seedvl-tiny-shared"):
        cfg = get_preset(preset)
        assert build_model_config(preset, tok) == cfg
        assert (cfg.llm.vocab_size, cfg.image_token_id) == (272, tok.image_token_id)
        assert build_model_config(preset, WordTokenizer()).llm.vocab_size == 336
    with pytest.raises(ValueError, match=r"not in 0\.\.267"):
        tok.decode([300])


def _hf_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[T.EOS, T.THINK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(["How many cubes are there? The red cube is closer."] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=T.EOS)
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_hf_tokenizer_directory(tmp_path, caplog):
    path = _hf_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trainer.data.tokenizer"):
        tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert "adding them as special tokens" in caplog.text
    for t in T.REQUIRED_SPECIALS:
        assert tok.encode(t) == [tok.special_id(t)], f"{t} must be one id"
    assert tok.image_token_id == tok.special_id(T.IMAGE_PAD)
    assert tok.vocab_size > 256
    text = f"{T.IM_START}user\n{T.IMAGE_PAD * 2}How many cubes?{T.IM_END}\n{T.THINK}one{T.END_THINK}1"
    assert tok.decode(tok.encode(text)) == text
    # Its vocabulary is bigger than the tiny preset's, so the model grows to a multiple of 64.
    assert model_vocab_size(tok, preset_vocab=256) == -(-tok.vocab_size // 64) * 64
    assert model_vocab_size(tok, preset_vocab=151936) == 151936


def test_hf_tokenizer_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(str(tmp_path / "nope"))
