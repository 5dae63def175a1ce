"""Conversations, the chat template, and encoding a conversation into what the packer needs.

A conversation is a list of turns (system / user / assistant), each a sequence of text pieces and
media (images, videos). The template is ChatML with Qwen2-VL's vision markers:

    <|im_start|>user\\n<|vision_start|><|image_pad|> x n<|vision_end|>How many cubes?<|im_end|>\\n
    <|im_start|>assistant\\n3<|im_end|>\\n

An image becomes one ``<|image_pad|>`` per visual token (28x28 px after the 2x2 pool). A video is
sampled and sized by ``model.preprocess.preprocess_video``; each frame is its timestamp text
("[1.5 second]", between ``<|time_start|>``/``<|time_end|>`` when the tokenizer has them) followed
by its placeholders.

Every token gets a loss level, so one encoding serves every stage: the packer makes a token a
target when its level reaches the stage's threshold.

    LEVEL_NONE      vision markers, placeholders, timestamps: never targets
    LEVEL_PROMPT    template and system/user text: targets when a stage trains on whole documents
    LEVEL_RESPONSE  assistant text and its <|im_end|>: always targets

Bad input raises :class:`SampleError` with a message that names the sample and the cause; the
stream (trainer.data.stream) logs it and skips the sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.preprocess import (
    MAX_PIXELS,
    MIN_PIXELS,
    ImagePatches,
    num_visual_tokens,
    patchify,
    preprocess_video,
)

from . import tokenizer as T

LEVEL_NONE, LEVEL_PROMPT, LEVEL_RESPONSE = 0, 1, 2
ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A sample that cannot be used; ``cause`` groups the messages in the skip report."""

    def __init__(self, message: str, cause: str = "invalid sample") -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class Media:
    """An image ((H, W, 3) uint8 pixels or an image file) or a video ((N, H, W, 3) uint8 frames, a
    .npy/.npz file of them, or a directory of frame images) at ``fps`` source frames per second.
    A video's ``task`` picks its sampling rate (model.preprocess.VIDEO_FPS: 1 FPS "default", 2
    "temporal", 5 "counting" and "motion")."""

    kind: str  # "image" | "video"
    source: str | Path | np.ndarray
    fps: float = 1.0
    task: str = "default"


@dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[str | Media, ...]


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    sample_id: str = ""
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class EncodeConfig:
    """Image budget per image (pixels, as model.preprocess) and the video token cap."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    video_max_tokens: int = 81_920


@dataclass
class EncodedSample:
    ids: np.ndarray  # (L,) int32 token ids, placeholders included
    levels: np.ndarray  # (L,) int8 loss level of each token (LEVEL_*)
    images: list[ImagePatches]  # ViT inputs in placeholder order (video frames expanded)
    sample_id: str = ""

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_patches(self) -> int:
        return sum(int(im.patches.shape[0]) for im in self.images)


# ----------------------------------------------------------------------------- media


def load_image(source: str | Path | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an array or an image file; SampleError if it cannot be decoded."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise SampleError(f"image array: expected uint8 (H, W, 3), got {source.dtype} {source.shape}")
        return source
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise SampleError(f"image {str(source)!r} not found", "missing media") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        msg = f"cannot decode image {str(source)!r}: {type(err).__name__}: {err}"
        raise SampleError(msg, "corrupt media") from None


_FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_video(source: str | Path | np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 frames of an array, a .npy/.npz file or a directory of frame images
    (sorted by name). Container formats (mp4, ...) need a decoder this package does not ship."""
    if isinstance(source, np.ndarray):
        frames = source
    else:
        path = Path(source)
        try:
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
                if not files:
                    raise SampleError(f"video directory {str(path)!r} holds no frame images")
                frames = np.stack([load_image(p) for p in files])
            elif path.suffix == ".npy":
                frames = np.load(path)
            elif path.suffix == ".npz":
                with np.load(path) as z:
                    frames = z[z.files[0]]
            elif not path.exists():
                raise SampleError(f"video {str(path)!r} not found", "missing media")
            else:
                raise SampleError(
                    f"video {str(path)!r}: unsupported format (expected a directory of frames, .npy or .npz)"
                )
        except SampleError:
            raise
        except (OSError, ValueError) as err:
            msg = f"cannot read video {str(path)!r}: {type(err).__name__}: {err}"
            raise SampleError(msg, "corrupt media") from None
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise SampleError(f"video: expected uint8 (N, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    return frames


# ----------------------------------------------------------------------------- encoding


class _Builder:
    def __init__(self, tok: T.Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.levels: list[int] = []

    def text(self, s: str, level: int) -> None:
        ids = self.tok.encode(s)
        self.ids.extend(ids)
        self.levels.extend([level] * len(ids))

    def special(self, token: str, level: int) -> None:
        tid = self.tok.special_id(token)
        if tid is None:  # optional marker this tokenizer lacks: nothing to emit
            return
        self.ids.append(tid)
        self.levels.append(level)

    def placeholders(self, n: int) -> None:
        self.special(T.VISION_START, LEVEL_NONE)
        self.ids.extend([self.tok.image_token_id] * n)
        self.levels.extend([LEVEL_NONE] * n)
        self.special(T.VISION_END, LEVEL_NONE)


def encode_conversation(
    conv: Conversation,
    tok: T.Tokenizer,
    cfg: EncodeConfig = EncodeConfig(),
    *,
    add_generation_prompt: bool = False,
) -> EncodedSample:
    """Token ids, loss levels and patchified images of one conversation (see the module docstring).

    ``add_generation_prompt`` appends ``<|im_start|>assistant\\n`` (a prompt for model.generate).
    Raises SampleError for an empty conversation, unknown roles, a conversation with nothing to
    learn (no assistant text) unless it is a prompt, and media that cannot be decoded.
    """
    name = conv.sample_id or "<unnamed>"
    if not conv.turns:
        raise SampleError(f"sample {name}: empty conversation", "empty conversation")
    b = _Builder(tok)
    images: list[ImagePatches] = []
    has_response = False
    for turn in conv.turns:
        if turn.role not in ROLES:
            raise SampleError(f"sample {name}: unknown role {turn.role!r} (expected one of {ROLES})")
        level = LEVEL_RESPONSE if turn.role == "assistant" else LEVEL_PROMPT
        b.special(T.IM_START, LEVEL_PROMPT)
        b.text(f"{turn.role}\n", LEVEL_PROMPT)
        for part in turn.parts:
            if isinstance(part, str):
                b.text(part, level)
                has_response |= level == LEVEL_RESPONSE and bool(part.strip())
            elif turn.role == "assistant":
                raise SampleError(f"sample {name}: media in an assistant turn")
            else:
                try:
                    _encode_media(part, b, images, cfg)
                except SampleError as err:
                    raise SampleError(f"sample {name}: {err}", err.cause) from None
        b.special(T.IM_END, level)
        b.text("\n", LEVEL_PROMPT)
    if add_generation_prompt:
        b.special(T.IM_START, LEVEL_PROMPT)
        b.text("assistant\n", LEVEL_PROMPT)
    elif not has_response:
        raise SampleError(f"sample {name}: no assistant text to learn from", "empty conversation")
    ids = np.asarray(b.ids, dtype=np.int32)
    return EncodedSample(ids, np.asarray(b.levels, dtype=np.int8), images, conv.sample_id)


def _encode_media(media: Media, b: _Builder, images: list[ImagePatches], cfg: EncodeConfig) -> None:
    if media.kind == "image":
        patches = _patchify(load_image(media.source), cfg)
        images.append(patches)
        b.placeholders(num_visual_tokens(patches.grid_hw))
    elif media.kind == "video":
        frames = load_video(media.source)
        try:
            video = preprocess_video(frames, media.fps, task=media.task, max_tokens=cfg.video_max_tokens)
        except ValueError as err:
            raise SampleError(f"video: {err}", "corrupt media") from None
        for frame, stamp in zip(video.frames, video.timestamp_texts, strict=True):
            b.special(T.TIME_START, LEVEL_NONE)
            b.text(stamp, LEVEL_NONE)
            b.special(T.TIME_END, LEVEL_NONE)
            images.append(frame)
            b.placeholders(num_visual_tokens(frame.grid_hw))
    else:
        raise SampleError(f"unknown media kind {media.kind!r} (expected 'image' or 'video')")


def _patchify(pixels: np.ndarray, cfg: EncodeConfig) -> ImagePatches:
    try:
        return patchify(pixels, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    except (TypeError, ValueError) as err:
        raise SampleError(f"image of shape {pixels.shape}: {err}", "corrupt media") from None


class SkipLog:
    """Counts skipped samples by cause and logs each with its message (the first ``max_logged`` of
    each cause; later ones only count), so bad data is reported, never a crash mid-run."""

    def __init__(self, logger: logging.Logger | None = None, max_logged: int = 20) -> None:
        self.log = logger or logging.getLogger("trainer.data")
        self.max_logged = max_logged
        self.counts: Counter[str] = Counter()

    def skip(self, cause: str, message: str) -> None:
        self.counts[cause] += 1
        n = self.counts[cause]
        if n <= self.max_logged:
            self.log.warning("skipped: %s", message)
        if n == self.max_logged:
            self.log.warning("further '%s' skips are counted but not logged", cause)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
