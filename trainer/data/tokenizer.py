"""Tokenizers: a byte-level default (no downloads) and any local Hugging Face tokenizer directory.

Both expose the same small interface (:class:`Tokenizer`): ``encode`` (special-token strings in the
text become their ids), ``decode``, ``vocab_size``, and the ids of the special tokens the chat
template and the model need. Special-token strings follow Qwen2-VL's names, so a Qwen tokenizer
already has all of the required ones:

| token | role |
|---|---|
| ``<|endoftext|>`` | end of text; also the padding id |
| ``<|im_start|>``, ``<|im_end|>`` | ChatML turn delimiters |
| ``<|vision_start|>``, ``<|vision_end|>`` | around each image's (or video frame's) placeholders |
| ``<|image_pad|>`` | one placeholder per visual token; the model's ``image_token_id`` |
| ``<think>``, ``</think>`` | long chain-of-thought span (paper §4.1) |
| ``<bbox>``, ``</bbox>`` | 2D grounding answers, ``<bbox>x1,y1,x2,y2</bbox>`` in [0, 999] (§3.1.3) |
| ``<|time_start|>``, ``<|time_end|>`` | around each video frame's timestamp text, "[1.5 second]" (§2.2) |

The last four pairs are optional for a Hugging Face tokenizer (missing ones stay plain text); the
others are added as special tokens when absent, which grows its vocabulary.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
THINK, END_THINK = "<think>", "</think>"
BBOX, END_BBOX = "<bbox>", "</bbox>"
TIME_START, TIME_END = "<|time_start|>", "<|time_end|>"

REQUIRED_SPECIALS = (EOS, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, THINK, END_THINK)
OPTIONAL_SPECIALS = (BBOX, END_BBOX, TIME_START, TIME_END)
SPECIAL_TOKENS = REQUIRED_SPECIALS + OPTIONAL_SPECIALS


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    image_token_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def special_id(self, token: str) -> int | None: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the special tokens follow at 256, 257, ... (268 ids in all)."""

    name = "bytes"

    def __init__(self) -> None:
        self._special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self._special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.eos_id = self.pad_id = self._special[EOS]
        self.image_token_id = self._special[IMAGE_PAD]

    def special_id(self, token: str) -> int | None:
        return self._special.get(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            special = self._special.get(piece)
            if special is not None:
                ids.append(special)
            elif piece:
                ids.extend(self._encode_text(piece))
        return ids

    def _encode_text(self, text: str) -> list[int]:
        """Ids of text that holds no special token."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if i not in self._special_by_id:
                raise ValueError(f"ByteTokenizer.decode: id {i} is not in 0..{self.vocab_size - 1}")
            out.append(self._special_by_id[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


# Whole words of the embedded data (trainer.data.spatial's templates and object names), one id each.
# A byte-level model spends most of its steps spelling these out: "Which is closer to the camera,
# the red cube or the blue sphere?" is 63 bytes and 27 ids here (13 words, the spaces, "," and "?").
WORDS = (
    # objects (trainer.data.render.COLORS and SHAPES, with plurals)
    "red", "green", "blue", "yellow", "purple", "cyan", "orange", "gray",
    "sphere", "cube", "cylinder", "spheres", "cubes", "cylinders", "objects", "object", "none",
    # question and answer templates
    "How", "many", "are", "there", "Which", "is", "closer", "to", "the", "camera", "or", "Is", "left",
    "right", "of", "Sort", "from", "nearest", "farthest", "Give", "bounding", "box", "What", "depth",
    "in", "meters", "Where", "center", "coordinates", "yes", "no", "Describe", "scene", "Near", "far",
    "Left", "m", "x", "user", "assistant",
)  # fmt: skip


class WordTokenizer(ByteTokenizer):
    """:class:`ByteTokenizer` plus one id per word of :data:`WORDS`, after the byte and special ids:
    268 + len(WORDS) ids. Text is split into runs of letters; a run in the vocabulary is one id,
    anything else (spaces included) is bytes, so every string still round-trips. A word has the same
    id wherever it stands, so an answer that names an object of the question copies its ids (with
    GPT-style " word" tokens the reply's first word would differ from the question's). The embedded
    data's questions take under half the byte tokenizer's ids (``--tokenizer words``)."""

    name = "words"

    def __init__(self) -> None:
        super().__init__()
        self._word = {w: self.vocab_size + i for i, w in enumerate(WORDS)}
        self._word_by_id = {i: w for w, i in self._word.items()}
        self._runs = re.compile(r"[A-Za-z]+")
        self.vocab_size += len(WORDS)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        at = 0
        for m in self._runs.finditer(text):
            ids.extend(text[at : m.start()].encode("utf-8"))
            word = self._word.get(m.group())
            ids.extend([word] if word is not None else m.group().encode("utf-8"))
            at = m.end()
        ids.extend(text[at:].encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            word = self._word_by_id.get(i)
            if word is None:
                run.append(i)
                continue
            out.append(super().decode(run))
            run = []
            out.append(word)
        out.append(super().decode(run))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never downloads)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # pragma: no cover - transformers is in the dev extra
            raise ImportError("loading a Hugging Face tokenizer needs `pip install transformers`") from err
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer: {str(path)!r} is not a directory")
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.name = str(path)
        vocab = self._tok.get_vocab()
        missing = [t for t in REQUIRED_SPECIALS if t not in vocab]
        if missing:
            log.warning(
                "tokenizer %s lacks %s; adding them as special tokens (vocabulary %d -> %d)",
                path, ", ".join(missing), len(self._tok), len(self._tok) + len(missing),
            )  # fmt: skip
            self._tok.add_special_tokens({"additional_special_tokens": missing})
        # Optional markers that exist as ordinary tokens still must not be split by the tokenizer.
        vocab = self._tok.get_vocab()
        self._special = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        self.vocab_size = len(self._tok)
        self.eos_id = self._special[EOS]
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.image_token_id = self._special[IMAGE_PAD]

    def special_id(self, token: str) -> int | None:
        return self._special.get(token)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str = "bytes") -> ByteTokenizer | HFTokenizer:
    """``"bytes"``, ``"words"`` (bytes plus the embedded data's words), otherwise a local Hugging
    Face tokenizer directory."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "words":
        return WordTokenizer()
    return HFTokenizer(spec)


def model_vocab_size(tokenizer: Tokenizer, preset_vocab: int) -> int:
    """Embedding rows for ``tokenizer``: the byte tokenizer's 268 ids rounded up to 272 and the word
    tokenizer's 325 to 336 (whatever the preset's own vocabulary); a Hugging Face tokenizer keeps the
    preset's vocabulary when it fits (Qwen's 151,665 tokens in Qwen3's 151,936 rows), else its size
    rounded up to a multiple of 64."""
    if isinstance(tokenizer, ByteTokenizer):
        return -(-tokenizer.vocab_size // 16) * 16
    if tokenizer.vocab_size <= preset_vocab:
        return preset_vocab
    return -(-tokenizer.vocab_size // 64) * 64
