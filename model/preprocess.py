"""Image and video preprocessing for SeedViT: pure functions on uint8 (H, W, 3) pixels.

Images (paper §2.1.1): bilinear resize to multiples of 28 px (two 14-px patches, so the 2x2 pool
after the ViT tiles the image exactly), inside a pixel budget, keeping the aspect ratio; then cut
into 14x14 patches emitted in 2x2-window order -- every 4 consecutive tokens are one 2x2 window,
row-major inside the window, windows row-major over the image -- so the pool is a mean of 4
consecutive rows. Each token carries its (row, col) patch coordinate for the 2D RoPE.

Video (paper §2.2, dynamic frame-resolution sampling): frames are sampled at 1, 2 or 5 FPS by task;
each frame gets the largest per-frame token level in {640, 512, 384, 256, 160, 128} that keeps the
video within 81,920 tokens; when even 128 tokens per frame overflow, frames are subsampled
uniformly over the whole video. Each frame is preceded by a timestamp text such as "[1.5 second]".
Token counts here are LLM tokens (after the 2x2 pool), one per 28x28 px: the paper's 81,920-token
cap at 128 tokens per frame is its "up to 640 frames" (§6.1.3).

Shape legend:
    H, W      input pixels; h, w resized pixels (multiples of 28)
    gh, gw    patch grid, h/14 and w/14 (both even); T = gh * gw patches
    P         patch length 14 * 14 * 3 = 588, flattened in (row, col, channel) order
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 14
MERGE = 2  # 2x2 pooling after the ViT
FACTOR = PATCH * MERGE  # 28 px: one LLM token
# Normalisation of the CLIP family (SeedViT distils from EVA02-CLIP, paper §2.1.2); the paper does
# not state SeedViT's own constants.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Default image budget in LLM tokens (28x28 px blocks): 4 to 16,384 (a 3584x3584 image).
MIN_PIXELS = 4 * FACTOR * FACTOR
MAX_PIXELS = 16384 * FACTOR * FACTOR

ImageLike = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------- images


def fit_resolution(
    height: int,
    width: int,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = FACTOR,
) -> tuple[int, int]:
    """(h, w): multiples of ``factor`` nearest to (height, width) with h*w in [min_pixels, max_pixels].

    Aspect ratio is kept as well as the 28-px grid allows. Every side is at least ``factor``, so
    extreme shapes (6000x10) stay valid; if that floor or rounding pushes the area over
    ``max_pixels`` the long side is trimmed -- the upper budget always holds, the lower one holds
    unless it conflicts with it.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size: expected positive height and width, got {height}x{width}")
    if max_pixels < factor * factor:
        raise ValueError(
            f"max_pixels: expected >= {factor * factor} (one {factor}x{factor} block), got {max_pixels}"
        )
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h * w > max_pixels:  # a side floored up to `factor`, or both sides rounded up
        if h >= w:
            h = max(factor, max_pixels // (w * factor) * factor)
            w = min(w, max_pixels // (h * factor) * factor)
        else:
            w = max(factor, max_pixels // (h * factor) * factor)
            h = min(h, max_pixels // (w * factor) * factor)
    return h, w


def _as_uint8_hwc(image: ImageLike, name: str = "image") -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a uint8 torch.Tensor or numpy array, got {type(image).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype uint8, got {t.dtype}")
    if t.ndim != 3 or t.shape[-1] != 3 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected shape (H, W, 3) with H, W > 0, got {tuple(t.shape)}")
    return t


def resize_image(image: ImageLike, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of uint8 (H, W, 3) to float32 (h, w, 3) in [0, 255].

    Antialiased (as PIL's bilinear), so strong downscaling does not alias; an identity size skips
    the resampling.
    """
    x = _as_uint8_hwc(image)
    if tuple(x.shape[:2]) == tuple(size):
        return x.float()
    chw = x.permute(2, 0, 1)[None].float()
    out = F.interpolate(chw, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).clamp_(0.0, 255.0)


def window_positions(grid_h: int, grid_w: int) -> torch.Tensor:
    """(gh*gw, 2) int32 (row, col) of each patch in 2x2-window order."""
    if grid_h % MERGE or grid_w % MERGE:
        raise ValueError(f"patch grid: expected even sides, got {grid_h}x{grid_w}")
    rows = torch.arange(grid_h, dtype=torch.int32)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, dtype=torch.int32)[None, :].expand(grid_h, grid_w)
    return torch.stack([_to_window_order(rows), _to_window_order(cols)], dim=-1)


def _to_window_order(grid: torch.Tensor) -> torch.Tensor:
    """(gh, gw, *rest) -> (gh*gw, *rest): windows row-major, then the 4 cells of each row-major."""
    gh, gw, *rest = grid.shape
    g = grid.reshape(gh // MERGE, MERGE, gw // MERGE, MERGE, *rest).transpose(1, 2)
    return g.reshape(gh * gw, *rest)


class ImagePatches(NamedTuple):
    patches: torch.Tensor  # (T, P) float32, normalised
    pos_hw: torch.Tensor  # (T, 2) int32 (row, col)
    grid_hw: tuple[int, int]  # (gh, gw)


def patchify(
    image: ImageLike,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    size: tuple[int, int] | None = None,
) -> ImagePatches:
    """Resize one uint8 (H, W, 3) image into the budget and cut it into 2x2-window-ordered patches.

    ``size`` (multiples of 28) overrides the budget, e.g. for video frames sized by their plan.
    """
    x = _as_uint8_hwc(image)
    if size is None:
        h, w = fit_resolution(x.shape[0], x.shape[1], min_pixels=min_pixels, max_pixels=max_pixels)
    elif size[0] <= 0 or size[1] <= 0 or size[0] % FACTOR or size[1] % FACTOR:
        raise ValueError(f"size: expected positive multiples of {FACTOR}, got {size}")
    else:
        h, w = size
    pixels = resize_image(x, (h, w))
    pixels = (pixels / 255.0 - torch.tensor(mean)) / torch.tensor(std)
    gh, gw = h // PATCH, w // PATCH
    cells = pixels.reshape(gh, PATCH, gw, PATCH, 3).transpose(1, 2)  # (gh, gw, 14, 14, 3)
    patches = _to_window_order(cells).reshape(gh * gw, PATCH * PATCH * 3)
    return ImagePatches(patches.contiguous(), window_positions(gh, gw), (gh, gw))


class PackedImages(NamedTuple):
    patches: torch.Tensor  # (T, P) float32, images back to back
    pos_hw: torch.Tensor  # (T, 2) int32
    cu_seqlens: torch.Tensor  # (I+1,) int32
    max_seqlen: int  # host int: the largest image's patch count
    grid_hw: torch.Tensor  # (I, 2) int32


def pack_images(images: list[ImagePatches]) -> PackedImages:
    """Concatenate patchified images into one ViT sequence (NaViT packing)."""
    lengths = [im.patches.shape[0] for im in images]
    cu = torch.zeros(len(images) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    patches = torch.cat([im.patches for im in images]) if images else torch.zeros(0, PATCH * PATCH * 3)
    pos_hw = torch.cat([im.pos_hw for im in images]) if images else torch.zeros(0, 2, dtype=torch.int32)
    grid = torch.tensor([im.grid_hw for im in images], dtype=torch.int32).reshape(-1, 2)
    return PackedImages(patches, pos_hw, cu, max(lengths, default=0), grid)


def num_visual_tokens(grid_hw: tuple[int, int]) -> int:
    """LLM tokens an image of patch grid (gh, gw) becomes after the 2x2 pool."""
    return grid_hw[0] * grid_hw[1] // (MERGE * MERGE)


# ----------------------------------------------------------------------------- video

# Sampling rate by task (paper §2.2): 1 FPS by default, 2 FPS for temporal grounding-like tasks,
# 5 FPS for counting and motion tracking.
VIDEO_FPS = {"default": 1.0, "temporal": 2.0, "counting": 5.0, "motion": 5.0}
FRAME_TOKEN_LEVELS = (640, 512, 384, 256, 160, 128)
MAX_VIDEO_TOKENS = 81_920


@dataclass(frozen=True)
class VideoPlan:
    """Which source frames to encode, when they are, and at how many tokens each."""

    frame_indices: tuple[int, ...]  # into the source frames, increasing
    timestamps: tuple[float, ...]  # seconds, one per chosen frame
    tokens_per_frame: int  # the level chosen (an upper bound on each frame's tokens)
    frame_hw: tuple[int, int]  # resized frame size in px (multiples of 28)
    subsampled: bool  # the 128-token level overflowed and frames were dropped uniformly

    @property
    def num_tokens(self) -> int:
        """Visual LLM tokens of the whole video (timestamp texts not included)."""
        h, w = self.frame_hw
        return len(self.frame_indices) * (h // FACTOR) * (w // FACTOR)


def plan_video(
    num_frames: int,
    native_fps: float,
    frame_hw: tuple[int, int],
    *,
    task: str = "default",
    fps: float | None = None,
    max_tokens: int = MAX_VIDEO_TOKENS,
    levels: tuple[int, ...] = FRAME_TOKEN_LEVELS,
) -> VideoPlan:
    """Dynamic frame-resolution sampling of a video of ``num_frames`` frames at ``native_fps``.

    Frames are taken at t = 0, 1/fps, 2/fps, ... (the source's nearest earlier frame; a rate above
    the source's is capped at the source's). The largest level L with n_frames * L <= max_tokens is
    chosen and each frame is resized to at most L tokens; when even the smallest level overflows,
    max_tokens // min(levels) frames are kept, evenly spread from the first to the last.
    """
    if num_frames <= 0 or native_fps <= 0:
        raise ValueError(f"video: expected num_frames > 0 and native_fps > 0, got {num_frames}, {native_fps}")
    if fps is None:
        if task not in VIDEO_FPS:
            raise ValueError(f"task: expected one of {sorted(VIDEO_FPS)}, got {task!r}")
        fps = VIDEO_FPS[task]
    if fps <= 0:
        raise ValueError(f"fps: expected > 0, got {fps}")
    if not levels or max_tokens < min(levels):
        raise ValueError(
            f"max_tokens: expected >= the smallest level {min(levels, default=None)}, got {max_tokens}"
        )
    fps = min(fps, native_fps)
    duration = num_frames / native_fps
    n = max(1, math.ceil(duration * fps - 1e-9))
    times = [i / fps for i in range(n)]
    # The 1e-6 guards against t * native_fps landing just under an integer in floating point.
    indices = [min(num_frames - 1, math.floor(t * native_fps + 1e-6)) for t in times]

    fitting = [lv for lv in sorted(levels, reverse=True) if n * lv <= max_tokens]
    subsampled = not fitting
    if subsampled:
        level = min(levels)
        keep = max_tokens // level
        picks = np.linspace(0, n - 1, keep).round().astype(np.int64) if keep > 1 else np.zeros(1, np.int64)
        indices = [indices[p] for p in picks]
        times = [times[p] for p in picks]
    else:
        level = fitting[0]
    # Frames are resized like images but only capped by the level: a small video is not upscaled
    # beyond one token's worth of padding to the 28-px grid.
    h, w = fit_resolution(*frame_hw, min_pixels=FACTOR * FACTOR, max_pixels=level * FACTOR * FACTOR)
    return VideoPlan(tuple(indices), tuple(times), level, (h, w), subsampled)


def timestamp_text(seconds: float) -> str:
    """The text put before each frame, e.g. "[1.5 second]" (paper §2.2)."""
    return f"[{seconds:.1f} second]"


class VideoInputs(NamedTuple):
    frames: list[ImagePatches]  # one ViT sequence per chosen frame
    timestamp_texts: list[str]  # one per frame, to be tokenised before its visual tokens
    plan: VideoPlan


def preprocess_video(
    frames: ImageLike,
    native_fps: float,
    *,
    task: str = "default",
    fps: float | None = None,
    max_tokens: int = MAX_VIDEO_TOKENS,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> VideoInputs:
    """Sample and patchify a decoded uint8 (N, H, W, 3) video; see :func:`plan_video`."""
    video = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if not isinstance(video, torch.Tensor) or video.ndim != 4:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"frames: expected a uint8 (N, H, W, 3) tensor or array, got {got}")
    n, h, w = video.shape[:3]
    plan = plan_video(n, native_fps, (h, w), task=task, fps=fps, max_tokens=max_tokens)
    patched = [patchify(video[i], size=plan.frame_hw, mean=mean, std=std) for i in plan.frame_indices]
    return VideoInputs(patched, [timestamp_text(t) for t in plan.timestamps], plan)
