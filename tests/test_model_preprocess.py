"""Preprocessing invariants: 28-px grid inside the budget, 2x2-window token order with correct
(row, col), odd image shapes, and the video token cap with uniform subsampling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model.preprocess import (
    FACTOR,
    MAX_PIXELS,
    MAX_VIDEO_TOKENS,
    MIN_PIXELS,
    fit_resolution,
    num_visual_tokens,
    pack_images,
    patchify,
    plan_video,
    preprocess_video,
    timestamp_text,
    window_positions,
)


def _sizes():
    rng = random.Random(0)
    sizes = [(10, 10), (1, 1), (400, 6000), (6000, 400), (1, 100_000), (100_000, 3), (28, 28), (27, 29)]
    sizes += [(rng.randint(1, 8000), rng.randint(1, 8000)) for _ in range(500)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 20000)) for _ in range(200)]
    return sizes


@pytest.mark.parametrize(
    ("min_pixels", "max_pixels"),
    [(MIN_PIXELS, MAX_PIXELS), (FACTOR**2, FACTOR**2), (4 * FACTOR**2, 256 * FACTOR**2), (100_000, 100_000)],
)
def test_fit_resolution_on_grid_and_in_budget(min_pixels, max_pixels):
    for h0, w0 in _sizes():
        h, w = fit_resolution(h0, w0, min_pixels=min_pixels, max_pixels=max_pixels)
        assert h % FACTOR == 0 and w % FACTOR == 0 and h >= FACTOR and w >= FACTOR, (h0, w0, h, w)
        assert h * w <= max_pixels, (h0, w0, h, w)
        # The lower budget holds whenever it does not fight the upper one on the 28-px grid.
        if max_pixels - min_pixels >= 2 * FACTOR * max(h, w):
            assert h * w >= min_pixels, (h0, w0, h, w)


def test_fit_resolution_keeps_aspect_and_size_when_it_can():
    assert fit_resolution(280, 560) == (280, 560)
    assert fit_resolution(400, 6000) == (392, 5992)  # paper Figure 1's 6000x400 image
    assert fit_resolution(10, 10) == (56, 56)  # upscaled to the 4-token minimum
    h, w = fit_resolution(3000, 4000, max_pixels=1024 * FACTOR**2)
    assert abs((w / h) - 4 / 3) < 0.05 and h * w <= 1024 * FACTOR**2


def test_fit_resolution_rejects_bad_budgets():
    with pytest.raises(ValueError, match="max_pixels"):
        fit_resolution(100, 100, max_pixels=100)
    with pytest.raises(ValueError, match="min_pixels"):
        fit_resolution(100, 100, min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ValueError, match="positive"):
        fit_resolution(0, 100)


def _check_window_order(pos_hw: torch.Tensor, gh: int, gw: int) -> None:
    assert pos_hw.dtype == torch.int32 and pos_hw.shape == (gh * gw, 2)
    windows = pos_hw.view(-1, 4, 2).long()
    top_left = windows[:, :1, :]
    offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert torch.equal(windows - top_left, offsets.expand_as(windows)), "each 4 tokens are one 2x2 window"
    assert (top_left % 2 == 0).all(), "windows are aligned to even rows and columns"
    order = top_left[:, 0, 0] * gw + top_left[:, 0, 1]
    assert (order.diff() > 0).all(), "windows are row-major over the image"
    assert len({tuple(p) for p in pos_hw.tolist()}) == gh * gw, "every patch appears once"


def test_window_positions_order():
    _check_window_order(window_positions(4, 6), 4, 6)
    assert window_positions(2, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match="even"):
        window_positions(3, 4)


def test_patch_contents_match_their_positions():
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8, generator=gen)  # on the grid: no resize
    out = patchify(img, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert out.grid_hw == (4, 6) and out.patches.shape == (24, 588) and out.patches.dtype == torch.float32
    _check_window_order(out.pos_hw, 4, 6)
    for patch, (r, c) in zip(out.patches, out.pos_hw.tolist(), strict=True):
        block = img[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].float() / 255
        torch.testing.assert_close(patch.view(14, 14, 3), block)


@pytest.mark.parametrize(("h", "w"), [(10, 10), (1, 1), (400, 6000), (6000, 400), (37, 1001)])
def test_patchify_odd_shapes(h, w):
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)  # numpy input too
    out = patchify(img, max_pixels=512 * FACTOR**2)
    gh, gw = out.grid_hw
    assert gh % 2 == 0 and gw % 2 == 0 and gh * gw * 14 * 14 <= 512 * FACTOR**2
    assert out.patches.shape == (gh * gw, 588) and torch.isfinite(out.patches).all()
    _check_window_order(out.pos_hw, gh, gw)
    assert num_visual_tokens(out.grid_hw) * 4 == gh * gw


def test_patchify_rejects_bad_images():
    with pytest.raises(TypeError, match="uint8"):
        patchify(torch.zeros(28, 28, 3))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        patchify(torch.zeros(28, 28, dtype=torch.uint8))


def test_pack_images():
    imgs = [patchify(torch.zeros(h, w, 3, dtype=torch.uint8)) for h, w in [(56, 56), (28, 112), (84, 56)]]
    packed = pack_images(imgs)
    assert packed.cu_seqlens.tolist() == [0, 16, 32, 56] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 24 and packed.grid_hw.tolist() == [[4, 4], [2, 8], [6, 4]]
    assert packed.patches.shape == (56, 588) and packed.pos_hw.shape == (56, 2)
    assert pack_images([]).cu_seqlens.tolist() == [0]


# ----------------------------------------------------------------------------- video


def test_video_figure_1_example():
    plan = plan_video(30 * 30, 30.0, (720, 1280))  # 30 s at 30 FPS, default 1 FPS
    assert plan.timestamps == tuple(float(t) for t in range(30))
    assert plan.frame_indices == tuple(range(0, 900, 30))
    assert plan.tokens_per_frame == 640 and not plan.subsampled
    h, w = plan.frame_hw
    assert (h // FACTOR) * (w // FACTOR) <= 640 and plan.num_tokens <= MAX_VIDEO_TOKENS
    assert timestamp_text(1.5) == "[1.5 second]"


@pytest.mark.parametrize(
    ("seconds", "task", "level"),
    [(60, "default", 640), (128, "default", 640), (129, "default", 512), (300, "default", 256),
     (60, "counting", 256), (100, "temporal", 384), (640, "default", 128)],
)  # fmt: skip
def test_video_level_is_largest_that_fits(seconds, task, level):
    plan = plan_video(seconds * 25, 25.0, (1080, 1920), task=task)
    assert plan.tokens_per_frame == level and not plan.subsampled
    assert len(plan.frame_indices) * level <= MAX_VIDEO_TOKENS
    assert plan.num_tokens <= MAX_VIDEO_TOKENS


def test_long_video_hits_cap_and_subsamples_uniformly():
    plan = plan_video(2 * 3600 * 30, 30.0, (480, 640))  # 2 h: 7200 frames at 1 FPS
    n = len(plan.frame_indices)
    assert plan.subsampled and plan.tokens_per_frame == 128 and n == MAX_VIDEO_TOKENS // 128 == 640
    assert plan.num_tokens <= MAX_VIDEO_TOKENS
    assert plan.timestamps[0] == 0.0 and plan.timestamps[-1] == 7199.0  # the whole video is covered
    gaps = np.diff(plan.timestamps)
    assert (gaps > 0).all() and gaps.max() - gaps.min() <= 1.0 + 1e-9  # uniform up to rounding


def test_video_budget_never_exceeded():
    for seconds in [0.2, 1, 7, 63, 129, 511, 1000, 5000]:
        for task in ["default", "temporal", "counting"]:
            plan = plan_video(max(1, int(seconds * 24)), 24.0, (360, 640), task=task)
            assert plan.num_tokens <= MAX_VIDEO_TOKENS, (seconds, task)
            assert list(plan.frame_indices) == sorted(set(plan.frame_indices))


def test_video_fps_above_source_is_capped():
    plan = plan_video(10, 2.0, (56, 56), task="counting")  # 5 s at 2 FPS, asked 5 FPS
    assert plan.frame_indices == tuple(range(10)) and plan.timestamps[1] == 0.5
    with pytest.raises(ValueError, match="task"):
        plan_video(10, 2.0, (56, 56), task="dance")


def test_preprocess_video_end_to_end():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (12, 60, 90, 3), dtype=torch.uint8, generator=gen)  # 4 s at 3 FPS
    out = preprocess_video(frames, 3.0, task="temporal")
    assert out.plan.frame_indices == (0, 1, 3, 4, 6, 7, 9, 10)
    assert out.timestamp_texts[:3] == ["[0.0 second]", "[0.5 second]", "[1.0 second]"]
    assert len(out.frames) == 8
    for f in out.frames:
        assert f.grid_hw == (out.plan.frame_hw[0] // 14, out.plan.frame_hw[1] // 14)
        _check_window_order(f.pos_hw, *f.grid_hw)
