"""Data of the ViT pre-training stages: images, image-text pairs and video-text pairs.

Embedded data (no downloads), from the renderer of trainer.data.spatial:

- Images: scenes of 1-4 objects at native resolution (sides 84 or 112 px, so 6x6 to 8x8 patch
  grids of several aspect ratios), rendered once into a bank (:class:`ImageBank`) that every
  stage draws from; MIM uses the pixels, the contrastive stage the pixels and a caption. Half of
  the scenes hold one object (a third are drawn with one, the rest with 1-4): with 1-4 throughout,
  runs learned colour or shape words in some banks and not in others; with more single objects
  colour was learned early (tiny preset, 0.40 top-1 after 200 steps against 0.13).
- Captions (:func:`scene_caption`) are drawn afresh at every use from the scene's facts: the
  number of objects, every object by colour and shape in random order, and half of the time one
  relation, e.g. "three objects, a blue sphere, a red cube, a gray cylinder, the red cube is left
  of the gray cylinder"; by default (``SUMMARY_SHARE``) they also state each shape's count after
  the number ("three objects: one sphere, one cube and one cylinder, a blue sphere, ..."), which
  taught count sooner (profiles/vit_pretrain.md). Captions that name only some facts ("a cube")
  were tried first: they are true of many other images of a batch, which the sigmoid loss then
  counts as negatives, and the tiny preset learned nothing from them in 150 steps (zero-shot at
  chance).
- Videos (:class:`VideoBank`): trainer.data.video's clips in which one object moves along a known
  straight track (left, right, toward or away from the camera) or the camera moves; the frames
  go through the dynamic frame-resolution sampler (model.preprocess.preprocess_video, the
  "motion" task's 5 FPS) and the caption says what moves and where ("the red cube moves left",
  "an object moves away from the camera", "the camera moves forward").
- With ``--data my.jsonl``: each manifest line with one image is an image-text pair whose caption
  is its ``meta.caption``, or else its assistant turns' text.

Caption tokens (:class:`CaptionTokenizer`): lower-cased words, each word of the scene grammar its
own id and any other word hashed into a fixed number of buckets, so every caption tokenises with
no vocabulary file. SuperClass classifies a caption's bag of these ids.

Batches: a step draws ``seq_len`` ViT patches' worth of images (or videos) from the bank with
``np.random.default_rng([seed, stage, step])``, so a step's batch depends only on (seed, stage,
step) and a resumed run repeats it.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from model.preprocess import ImagePatches, PackedImages, pack_images, patchify, preprocess_video

from ..data.render import COLORS, SHAPES
from ..data.spatial import PLURAL, Scene, SpatialConfig, sample_scene
from ..data.video import VideoConfig, sample_video

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
MOTIONS = {"left": "left", "right": "right", "toward": "toward the camera", "away": "away from the camera"}
CAMERA_MOTIONS = ("left", "right", "forward", "backward")
IMAGE_SCENES = SpatialConfig(sizes=(84, 112), min_objects=1, max_objects=4)
SINGLE_EVERY = 3  # a third of the bank's scenes hold one object (so half of them do in all)
VIDEO_CLIPS = VideoConfig(size=84, duration=(1.0, 1.4))
GRAMMAR = (
    *NUMBERS, "object", "objects", *COLORS, *SHAPES, *PLURAL.values(), "a", "an", "the", "is", "of",
    "left", "right", "closer", "than", "moves", "toward", "away", "from", "camera", "forward",
    "backward", "farther", "and",
)  # fmt: skip


class CaptionTokenizer:
    """Words -> ids: the scene grammar's words first (no collisions on the embedded data), then
    ``buckets`` hashed ids (CRC-32) for every other word."""

    def __init__(self, buckets: int = 1024) -> None:
        if buckets < 1:
            raise ValueError(f"buckets: expected >= 1, got {buckets}")
        self._known = {w: i for i, w in enumerate(dict.fromkeys(GRAMMAR))}
        self.buckets = buckets
        self.vocab_size = len(self._known) + buckets

    def encode(self, text: str) -> list[int]:
        out = []
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            known = self._known.get(word)
            out.append(
                known if known is not None else len(self._known) + zlib.crc32(word.encode()) % self.buckets
            )
        return out


# ----------------------------------------------------------------------------- captions


def count_phrase(n: int) -> str:
    return f"{NUMBERS[n]} object{'s' if n != 1 else ''}"


# The share of captions that state how many of each shape after the number of objects: all of
# them (0.5 taught count less: profiles/vit_pretrain.md). Drawn per caption only when strictly
# between 0 and 1.
SUMMARY_SHARE = 1.0


def shape_counts(shapes: list[str]) -> str:
    """How many of each shape, in SHAPES' order: "one sphere and two cubes"."""
    parts = [f"{NUMBERS[k]} {s if k == 1 else PLURAL[s]}" for s in SHAPES if (k := shapes.count(s))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def objects_caption(objects: list[tuple[str, str]], summary: bool) -> str:
    """(colour, shape) pairs in the caption's order -> "three objects, a red cube, a blue sphere,
    a gray cube" or, with ``summary``, "three objects: one sphere and two cubes, a red cube, ..."."""
    head = count_phrase(len(objects))
    if summary and objects:
        head += ": " + shape_counts([s for _, s in objects])
    return ", ".join([head, *(f"a {c} {s}" for c, s in objects)])


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The number of objects (``SUMMARY_SHARE`` of the time followed by each shape's count), every
    object (colour and shape) in random order, and half of the time one relation between two of
    them (module docstring)."""
    objs = scene.objects
    order = rng.permutation(len(objs))
    summary = SUMMARY_SHARE >= 1 or (SUMMARY_SHARE > 0 and bool(rng.random() < SUMMARY_SHARE))
    parts = [objects_caption([(objs[k].color, objs[k].shape) for k in order], summary)]
    if len(objs) >= 2 and rng.random() < 0.5:
        i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        a, b = objs[i].name, objs[j].name
        if rng.random() < 0.5:
            xi, xj = (scene.camera.to_camera(objs[k].center)[0] for k in (i, j))
            parts.append(f"the {a} is {'left' if xi < xj else 'right'} of the {b}")
        else:
            parts.append(
                f"the {a} is {'closer' if scene.depth(i) < scene.depth(j) else 'farther'} than the {b}"
            )
    return ", ".join(parts)


def motion_caption(kind: str, answer: str, name: str, n_objects: int, rng: np.random.Generator) -> str:
    """What moves and where, in one of three phrasings (camera motion has one)."""
    if kind == "vid_camera":
        return f"the camera moves {answer}"
    way = MOTIONS[answer]
    phrasing = int(rng.integers(3))
    if phrasing == 0:
        return f"the {name} moves {way}"
    if phrasing == 1:
        return f"an object moves {way}"
    return f"{count_phrase(n_objects)}, the {name} moves {way}"


# ----------------------------------------------------------------------------- banks


@dataclass(frozen=True)
class ImageItem:
    patches: ImagePatches
    scene: Scene | None  # None for manifest images
    caption: str | None = None  # a fixed caption (manifest); scenes draw theirs per use


class ImageBank:
    """Images rendered (or read) once; ``draw`` picks a step's images within a patch budget."""

    def __init__(self, items: list[ImageItem]) -> None:
        if not items:
            raise ValueError("ImageBank: no images")
        self.items = items
        self.lengths = np.array([it.patches.patches.shape[0] for it in items])

    @classmethod
    def scenes(cls, seed: int, num: int, cfg: SpatialConfig = IMAGE_SCENES, max_pixels: int | None = None):
        """``num`` scenes, scene i from ``default_rng([seed, 1009, i])`` (apart from the VLM data's
        and the held-out streams); every ``SINGLE_EVERY``-th holds one object."""
        single = replace(cfg, min_objects=1, max_objects=1)
        items = []
        for i in range(num):
            scene_cfg = single if i % SINGLE_EVERY == SINGLE_EVERY - 1 else cfg
            scene = sample_scene(np.random.default_rng([seed, 1009, i]), scene_cfg)
            items.append(ImageItem(_patchify(scene.image, max_pixels), scene))
        return cls(items)

    @classmethod
    def manifest(cls, path: str, max_pixels: int | None = None) -> ImageBank:
        """Image-caption pairs of a JSONL manifest (lines with exactly one image and some text)."""
        from ..data.chat import SampleError, load_image
        from ..data.manifest import ManifestDataset

        items = []
        ds = ManifestDataset(path)
        for conv in ds.records:
            media = [p for t in conv.turns for p in t.parts if not isinstance(p, str)]
            text = (conv.meta or {}).get("caption") or " ".join(
                p for t in conv.turns if t.role == "assistant" for p in t.parts if isinstance(p, str)
            )
            if len(media) != 1 or media[0].kind != "image" or not text.strip():
                continue
            try:
                pixels = load_image(media[0].source)
            except SampleError:
                continue
            items.append(ImageItem(_patchify(pixels, max_pixels), None, text))
        if not items:
            raise ValueError(f"--data {path}: no line with exactly one image and a caption")
        return cls(items)

    def draw(self, rng: np.random.Generator, budget: int) -> list[int]:
        """Distinct images in random order while their patches fit in ``budget`` (:func:`draw_within`)."""
        return draw_within(self.lengths, rng, budget)

    def caption(self, index: int, rng: np.random.Generator) -> str:
        item = self.items[index]
        return item.caption if item.caption is not None else scene_caption(item.scene, rng)


def draw_within(lengths: np.ndarray, rng: np.random.Generator, budget: int) -> list[int]:
    """Indices of distinct items in random order while their ``lengths`` (patches) fit in
    ``budget``; at least two, since the embeddings' batch normalisation needs two."""
    picked, total = [], 0
    for i in rng.permutation(len(lengths)):
        if len(picked) >= 2 and total + lengths[i] > budget:
            break
        picked.append(int(i))
        total += int(lengths[i])
    return picked


def shard_bounds(lengths: Sequence[int], world: int) -> list[tuple[int, int]]:
    """A step's items (images or clips, with ``lengths`` patches each, in batch order) cut into
    ``world`` contiguous shares, rank by rank: (start, stop) each. Each cut falls where the running
    patch count is nearest k/world of the total, and every rank gets at least one item (ValueError
    when there are fewer items than ranks). Contiguous shares keep the batch order when the ranks'
    embeddings are gathered rank by rank."""
    n = len(lengths)
    if world < 1:
        raise ValueError(f"world: expected >= 1 ranks, got {world}")
    if n < world:
        raise ValueError(
            f"a step of {n} items for {world} ranks: every rank needs one; raise the stage's seq_len "
            "(--set STAGE.seq_len=N) or use fewer ranks"
        )
    cum = np.cumsum(np.asarray(lengths, dtype=np.int64))
    total = int(cum[-1]) if n else 0
    cuts = [0]
    for k in range(1, world):
        target = total * k / world
        i = int(np.searchsorted(cum, target))  # the first item whose running count reaches target
        before = int(cum[i - 1]) if i > 0 else 0
        cut = i + 1 if i < n and cum[i] - target <= target - before else i
        cuts.append(min(max(cut, cuts[-1] + 1), n - (world - k)))
    cuts.append(n)
    return list(itertools.pairwise(cuts))


def _patchify(pixels: np.ndarray, max_pixels: int | None) -> ImagePatches:
    return patchify(pixels) if max_pixels is None else patchify(pixels, max_pixels=max_pixels)


@dataclass(frozen=True)
class VideoItem:
    frames: list[ImagePatches]  # the sampler's frames
    times: tuple[float, ...]  # their timestamps (s)
    kind: str  # vid_direction or vid_camera
    answer: str  # the direction
    name: str  # the moving object (vid_direction)
    n_objects: int

    @property
    def num_patches(self) -> int:
        return sum(f.patches.shape[0] for f in self.frames)


class VideoBank:
    """Clips of moving objects (or a moving camera), sampled by the dynamic frame sampler."""

    def __init__(self, items: list[VideoItem]) -> None:
        self.items = items
        self.lengths = np.array([it.num_patches for it in items])

    @classmethod
    def clips(
        cls, seed: int, num: int, cfg: VideoConfig = VIDEO_CLIPS, camera_share: float = 0.2
    ) -> VideoBank:
        """``num`` clips, clip i from ``default_rng([seed, 2003, i])``; ``camera_share`` of them
        move the camera, the others one object."""
        items = []
        for i in range(num):
            rng = np.random.default_rng([seed, 2003, i])
            kind = "vid_camera" if rng.random() < camera_share else "vid_direction"
            items.append(make_video_item(kind, rng, cfg))
        return cls(items)

    def draw(self, rng: np.random.Generator, budget: int) -> list[int]:
        """Distinct clips in random order while their patches fit in ``budget`` (:func:`draw_within`)."""
        return draw_within(self.lengths, rng, budget)

    def caption(self, index: int, rng: np.random.Generator) -> str:
        it = self.items[index]
        return motion_caption(it.kind, it.answer, it.name, it.n_objects, rng)


def make_video_item(kind: str, rng: np.random.Generator, cfg: VideoConfig = VIDEO_CLIPS) -> VideoItem:
    clip, _, answer, _ = sample_video(kind, rng, cfg)
    video = preprocess_video(clip.frames, clip.fps, task=clip.task)
    return VideoItem(
        video.frames, video.plan.timestamps, kind, answer, clip.tracks[0].obj.name, len(clip.tracks)
    )


# ----------------------------------------------------------------------------- packing


@dataclass
class TextBatch:
    ids: torch.Tensor  # (L,) int64
    cu_seqlens: torch.Tensor  # (N+1,) int32
    max_seqlen: int
    bags: torch.Tensor  # (N, V) float32 multi-hot: which ids each caption holds


def pack_text(captions: list[str], tok: CaptionTokenizer) -> TextBatch:
    """Captions -> packed ids (an empty caption becomes one id of the word "a") and their bags."""
    encoded = [tok.encode(c) or tok.encode("a") for c in captions]
    lengths = [len(e) for e in encoded]
    cu = torch.zeros(len(encoded) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    bags = torch.zeros(len(encoded), tok.vocab_size)
    for i, e in enumerate(encoded):
        bags[i, e] = 1.0
    ids = torch.tensor([t for e in encoded for t in e], dtype=torch.int64)
    return TextBatch(ids, cu, max(lengths, default=1), bags)


@dataclass
class VideoBatch:
    frames: PackedImages  # every frame of every video, one ViT sequence per frame
    frame_times: torch.Tensor  # (T,) each patch's frame timestamp (s)
    cu_videos: torch.Tensor  # (V+1,) int32 video boundaries in the packed patches
    max_video: int


def pack_videos(items: list[VideoItem]) -> VideoBatch:
    frames = [f for it in items for f in it.frames]
    packed = pack_images(frames)
    times = torch.tensor(
        [
            t
            for it in items
            for f, t in zip(it.frames, it.times, strict=True)
            for _ in range(f.patches.shape[0])
        ],
        dtype=torch.float32,
    )
    lengths = [it.num_patches for it in items]
    cu = torch.zeros(len(items) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return VideoBatch(packed, times, cu, max(lengths, default=0))


__all__ = [
    "CaptionTokenizer",
    "ImageBank",
    "TextBatch",
    "VideoBank",
    "VideoBatch",
    "count_phrase",
    "make_video_item",
    "motion_caption",
    "objects_caption",
    "pack_text",
    "pack_videos",
    "scene_caption",
    "shard_bounds",
]
