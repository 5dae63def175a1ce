"""Procedural videos: the ray-cast scenes of trainer.data.spatial with objects that move along known
straight tracks, appear and disappear on a known schedule, or a camera that moves; every question's
answer follows from the tracks, checked against the rendered frames' id buffers.

A clip is rendered at its question's sampling rate (model.preprocess.VIDEO_FPS: 5 FPS for motion
and counting, 2 FPS for temporal questions), and its Media carries that task, so the sampler keeps
every frame and none is rendered in vain; frame i is at t = i / fps, the time the sampler stamps on
it ("[1.5 second]"). Frames render on trainer.data.multiview's thread pool.

Questions (:func:`sample_video`; the skill table is in trainer.data.vst):

- ``vid_direction`` (motion): which way an object moves -- left, right, toward or away from the
  camera; its main axis is at least twice the other.
- ``vid_camera`` (motion): which way the camera moves -- left, right, forward or backward.
- ``vid_count`` (counting): how many times an object appears; it is shown 1-3 times for at least 3
  frames (0.6 s) with gaps of at least 3 frames, so the count needs the 5 FPS rate.
- ``vid_moved_most`` (motion): which of three named objects moved farthest; the winner moved at
  least 1.5 x any other and 1 m.
- ``vid_order`` (temporal): the order in which three objects first appear, at least 1 s apart.
- ``vid_when`` (temporal): when an object first appears, answered with its frame's timestamp,
  ``<|time_start|>[2.5 second]<|time_end|>``.

Camera coordinates as trainer.data.render; a static camera looks along world z, so "right" is world
+x and "away" is +z.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from model.preprocess import VIDEO_FPS, timestamp_text

from .multiview import PoseCamera, render_many
from .render import COLORS, SHAPES, Object3D
from .spatial import _center_in_frame
from .tokenizer import TIME_END, TIME_START

TASKS = {
    "vid_direction": "motion", "vid_camera": "motion", "vid_count": "counting",
    "vid_moved_most": "motion", "vid_order": "temporal", "vid_when": "temporal",
}  # fmt: skip
DIRECTIONS = ("left", "right", "toward", "away")
CAMERA_MOVES = ("left", "right", "forward", "backward")


@dataclass(frozen=True)
class VideoConfig:
    size: int = 112  # frame side in px (a multiple of 28)
    duration: tuple[float, float] = (3.0, 5.0)  # seconds
    supersample: int = 2


@dataclass(frozen=True)
class Track:
    """An object: its pose at t = 0, a ground velocity (m/s) while ``moving`` [t0, t1), and the
    intervals [a, b) when it is in the scene."""

    obj: Object3D
    velocity: tuple[float, float] = (0.0, 0.0)
    moving: tuple[float, float] = (0.0, 0.0)
    shown: tuple[tuple[float, float], ...] = ((0.0, math.inf),)

    def at(self, t: float) -> Object3D:
        d = min(max(t - self.moving[0], 0.0), self.moving[1] - self.moving[0])
        return replace(self.obj, x=self.obj.x + self.velocity[0] * d, z=self.obj.z + self.velocity[1] * d)

    def present(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.shown)

    @property
    def travel(self) -> float:
        return math.hypot(*self.velocity) * (self.moving[1] - self.moving[0])


@dataclass(frozen=True)
class Clip:
    tracks: tuple[Track, ...]
    cameras: tuple[PoseCamera, ...]  # one per frame
    times: tuple[float, ...]  # seconds, one per frame
    frames: np.ndarray  # (N, H, W, 3) uint8
    pixels: np.ndarray  # (N, K) visible supersampled pixels of each track in each frame
    silhouettes: np.ndarray  # (N, K) unoccluded silhouettes (0 where absent)
    task: str
    supersample: int = 2

    @property
    def fps(self) -> float:
        return VIDEO_FPS[self.task]

    def seen(self, k: int) -> np.ndarray:
        """(N,) bool: track k well visible (a third of its silhouette, as spatial's scenes)."""
        ss = self.supersample
        return (self.pixels[:, k] >= np.maximum(6 * ss * ss, self.silhouettes[:, k] / 3)) & (
            self.pixels[:, k] > 0
        )


def _render(cfg: VideoConfig, task: str, tracks: list[Track], cams: list[PoseCamera]) -> Clip:
    times = tuple(i / VIDEO_FPS[task] for i in range(len(cams)))
    jobs, present = [], []
    for t, cam in zip(times, cams, strict=True):
        ks = [k for k, tr in enumerate(tracks) if tr.present(t)]
        present.append(ks)
        jobs.append((cam, tuple(tracks[k].at(t) for k in ks)))
    scenes = render_many(jobs, cfg.supersample)
    n = len(tracks)
    pixels, sil = np.zeros((len(cams), n), np.int64), np.zeros((len(cams), n), np.int64)
    for f, (scene, ks) in enumerate(zip(scenes, present, strict=True)):
        counts = np.bincount(scene.ids.ravel().astype(np.int64) + 1, minlength=len(ks) + 1)[1:]
        pixels[f, ks], sil[f, ks] = counts, scene.silhouettes
    frames = np.stack([s.image for s in scenes])
    return Clip(tuple(tracks), tuple(cams), times, frames, pixels, sil, task, cfg.supersample)


def _camera(rng, cfg: VideoConfig, x: float = 0.0, z: float = 0.0) -> PoseCamera:
    return PoseCamera(
        cfg.size, cfg.size, float(rng.uniform(1.2, 2.2)), math.radians(float(rng.uniform(12, 28))),
        cfg.size * float(rng.uniform(0.9, 1.2)), x, z,
    )  # fmt: skip


def _frames(rng, cfg: VideoConfig, task: str) -> int:
    return round(float(rng.uniform(*cfg.duration)) * VIDEO_FPS[task])


def _objects(rng, cam: PoseCamera, n: int, z_range=(2.5, 7.0), avoid=()) -> list[Object3D] | None:
    """``n`` objects in distinct colours (not those of ``avoid``), in frame, apart from each other."""
    out: list[Object3D] = list(avoid)
    colors = [c for c in rng.permutation(list(COLORS)) if c not in {o.color for o in avoid}]
    for color in colors[:n]:
        for _ in range(30):
            size, z = float(rng.uniform(0.25, 0.5)), float(rng.uniform(*z_range))
            x = float(rng.uniform(-0.7, 0.7) * z * (cam.width / 2) / cam.focal)
            cand = Object3D(SHAPES[int(rng.integers(len(SHAPES)))], str(color), size, x, cam.z + z,
                            float(rng.uniform(0, math.pi / 2)))  # fmt: skip
            if _center_in_frame(cam, cand) and all(
                math.hypot(cand.x - o.x, cand.z - o.z) > 1.5 * (size + o.size) + 0.1 for o in out
            ):
                out.append(cand)
                break
        else:
            return None
    return out[len(avoid) :]


def _clear(tracks: list[Track], times) -> bool:
    """No two objects present at the same time overlap on the ground at any frame."""
    for t in times:
        objs = [tr.at(t) for tr in tracks if tr.present(t)]
        for i in range(len(objs)):
            for j in range(i):
                if math.hypot(objs[i].x - objs[j].x, objs[i].z - objs[j].z) < 1.2 * (
                    objs[i].size + objs[j].size
                ):
                    return False
    return True


def _in_frame(cam, track: Track, times) -> bool:
    return all(_center_in_frame(cam, track.at(t)) for t in times)


def _f(x: float) -> str:
    return f"{round(x, 1) + 0.0:.1f}"  # never "-0.0"


def _xz(o: Object3D) -> str:
    return f"({_f(o.x)}, {_f(o.z)}) m"


def _stamp(t: float) -> str:
    return f"{TIME_START}{timestamp_text(t)}{TIME_END}"


# ----------------------------------------------------------------------------- one builder per skill


def _direction(rng, cfg):
    task = "motion"
    n, cam = _frames(rng, cfg, task), _camera(rng, cfg)
    objs = _objects(rng, cam, int(rng.integers(2, 5)))
    if objs is None:
        return None
    way = DIRECTIONS[int(rng.integers(4))]
    speed, side = float(rng.uniform(0.3, 0.7)), float(rng.uniform(-0.25, 0.25))
    main = {"left": (-1, 0), "right": (1, 0), "toward": (0, -1), "away": (0, 1)}[way]
    vel = (speed * (main[0] + side * main[1]), speed * (main[1] + side * main[0]))
    dur = n / VIDEO_FPS[task]
    tracks = [Track(objs[0], vel, (0.0, dur))] + [Track(o) for o in objs[1:]]
    times = [i / VIDEO_FPS[task] for i in range(n)]
    if not (_clear(tracks, times) and _in_frame(cam, tracks[0], times)):
        return None
    clip = _render(cfg, task, tracks, [cam] * n)
    if clip.seen(0).mean() < 0.8:
        return None
    a, b = tracks[0].at(0.0), tracks[0].at(times[-1])
    name = a.name
    dx, dz = b.x - a.x, b.z - a.z
    why = (f"The {name} goes from (x, z) = {_xz(a)} at {timestamp_text(0.0)} to {_xz(b)} at "
           f"{timestamp_text(times[-1])}: {abs(dx):.1f} m {'right' if dx > 0 else 'left'}, "
           f"{abs(dz):.1f} m {'away' if dz > 0 else 'toward the camera'}.")  # fmt: skip
    question = f"Which way does the {name} move: left, right, toward the camera or away from it?"
    return clip, question, way, why


def _camera_move(rng, cfg):
    task = "motion"
    n = _frames(rng, cfg, task)
    cam0 = _camera(rng, cfg)
    way = CAMERA_MOVES[int(rng.integers(4))]
    objs = _objects(
        rng, cam0, int(rng.integers(3, 6)), z_range=(3.5, 7.0) if way == "forward" else (2.5, 6.0)
    )
    if objs is None:
        return None
    speed, side = float(rng.uniform(0.3, 0.6)), float(rng.uniform(-0.25, 0.25))
    main = {"left": (-1, 0), "right": (1, 0), "forward": (0, 1), "backward": (0, -1)}[way]
    vel = (speed * (main[0] + side * main[1]), speed * (main[1] + side * main[0]))
    cams = [replace(cam0, x=vel[0] * i / VIDEO_FPS[task], z=vel[1] * i / VIDEO_FPS[task]) for i in range(n)]
    clip = _render(cfg, task, [Track(o) for o in objs], cams)
    if not all(any(clip.seen(k)[f] for k in range(len(objs))) for f in range(n)):
        return None
    a, b = cams[0], cams[-1]
    dx, dz = b.x - a.x, b.z - a.z
    side, ahead = ("right" if dx > 0 else "left"), ("forward" if dz > 0 else "backward")
    why = (f"The camera goes from (x, z) = ({_f(a.x)}, {_f(a.z)}) m at {timestamp_text(0.0)} to "
           f"({_f(b.x)}, {_f(b.z)}) m at {timestamp_text(clip.times[-1])}: {abs(dx):.1f} m {side}, "
           f"{abs(dz):.1f} m {ahead}.")  # fmt: skip
    return clip, "Which way does the camera move: left, right, forward or backward?", way, why


def _runs(n: int, k: int, rng) -> list[tuple[int, int]] | None:
    """``k`` runs [a, b) of frames in 0..n, each >= 3 frames, separated by gaps >= 3 frames."""
    free = n - 3 * k - 3 * (k - 1)
    if free < 0:
        return None
    cuts = np.sort(rng.integers(0, free + 1, size=2 * k + 1))
    extra = np.diff(np.concatenate([[0], cuts]))[: 2 * k]  # spare frames before each boundary
    out, f = [], 0
    for i in range(k):
        start = f + int(extra[2 * i]) + (3 if i else 0)
        end = start + 3 + int(extra[2 * i + 1])
        out.append((start, end))
        f = end
    return out if out[-1][1] <= n else None


def _count(rng, cfg):
    task = "counting"
    n, cam = _frames(rng, cfg, task), _camera(rng, cfg)
    fps = VIDEO_FPS[task]
    objs = _objects(rng, cam, int(rng.integers(2, 5)))
    k = int(rng.integers(1, 4))
    runs = _runs(n, k, rng)
    if objs is None or runs is None:
        return None
    tracks = [Track(objs[0], shown=tuple((a / fps - 0.01, b / fps - 0.01) for a, b in runs))]
    for o in objs[1:]:
        other = _runs(n, int(rng.integers(1, 4)), rng) if rng.random() < 0.5 else None
        shown = tuple((a / fps - 0.01, b / fps - 0.01) for a, b in other) if other else ((0.0, math.inf),)
        tracks.append(Track(o, shown=shown))
    clip = _render(cfg, task, tracks, [cam] * n)
    expect = np.zeros(n, bool)
    for a, b in runs:
        expect[a:b] = True
    if not np.array_equal(clip.seen(0), expect):
        return None
    spans = ", ".join(f"{timestamp_text(a / fps)} to {timestamp_text((b - 1) / fps)}" for a, b in runs)
    name = objs[0].name
    why = f"The {name} is in view {spans}: {k} time{'s' if k > 1 else ''}."
    return clip, f"How many times does the {name} appear?", str(k), why


def _moved_most(rng, cfg):
    task = "motion"
    n, cam = _frames(rng, cfg, task), _camera(rng, cfg)
    objs = _objects(rng, cam, int(rng.integers(3, 5)))
    if objs is None:
        return None
    dur = n / VIDEO_FPS[task]
    dists = [float(rng.uniform(1.0, 1.8))]
    dists += [float(rng.choice([0.0, rng.uniform(0.1, dists[0] / 1.5)])) for _ in objs[1:]]
    tracks = []
    for o, d in zip(objs, dists, strict=True):
        t0 = float(rng.uniform(0, dur / 3))
        t1 = float(rng.uniform(t0 + dur / 2, dur))
        a = float(rng.uniform(0, 2 * math.pi))
        tracks.append(Track(o, (d * math.cos(a) / (t1 - t0), d * math.sin(a) / (t1 - t0)), (t0, t1)))
    times = [i / VIDEO_FPS[task] for i in range(n)]
    if not (_clear(tracks, times) and all(_in_frame(cam, tr, times) for tr in tracks)):
        return None
    clip = _render(cfg, task, tracks, [cam] * n)
    if min(clip.seen(k).mean() for k in range(3)) < 0.8:
        return None
    shown = [int(v) for v in rng.permutation(3)]
    names = [objs[k].name for k in shown]
    why = "Distances moved: " + ", ".join(f"{objs[k].name} {tracks[k].travel:.1f} m" for k in shown) + "."
    question = f"Which moved the farthest: the {names[0]}, the {names[1]} or the {names[2]}?"
    return clip, question, objs[0].color, why


def _appear_times(rng, n: int, k: int) -> list[int] | None:
    """``k`` distinct first-appearance frames in 1..n-2, at least 2 frames (1 s at 2 FPS) apart."""
    pool = list(range(1, n - 1))
    picks = sorted(int(v) for v in rng.choice(pool, size=min(k, len(pool)), replace=False))
    ok = len(picks) == k and all(b - a >= 2 for a, b in itertools.pairwise(picks))
    return picks if ok else None


def _appearing(rng, cfg, k: int):
    task = "temporal"
    n, cam = _frames(rng, cfg, task), _camera(rng, cfg)
    fps = VIDEO_FPS[task]
    objs = _objects(rng, cam, k + int(rng.integers(0, 3)))
    frames = _appear_times(rng, n, k)
    if objs is None or frames is None:
        return None
    order = [int(v) for v in rng.permutation(k)]  # object order[i] appears at frames[i]
    tracks = [Track(o) for o in objs]
    for i, j in enumerate(order):
        tracks[j] = Track(objs[j], shown=((frames[i] / fps - 0.01, math.inf),))
    clip = _render(cfg, task, tracks, [cam] * n)
    for i, j in enumerate(order):
        seen = clip.seen(j)
        if seen[: frames[i]].any() or not seen[frames[i]]:
            return None
    return clip, objs, order, [f / fps for f in frames]


def _order(rng, cfg):
    got = _appearing(rng, cfg, 3)
    if got is None:
        return None
    clip, objs, order, times = got
    ask = [int(v) for v in rng.permutation(3)]
    question = "In what order do these first appear: " + ", ".join(f"the {objs[j].name}" for j in ask) + "?"
    why = " ".join(
        f"The {objs[j].name} appears at {timestamp_text(t)}." for j, t in zip(order, times, strict=True)
    )
    return clip, question, ", ".join(objs[j].color for j in order), why


def _when(rng, cfg):
    got = _appearing(rng, cfg, 1)
    if got is None:
        return None
    clip, objs, order, times = got
    name, t = objs[order[0]].name, times[0]
    why = f"The {name} is absent at {timestamp_text(t - 1 / clip.fps)} and in view at {timestamp_text(t)}."
    return clip, f"When does the {name} first appear?", _stamp(t), why


BUILDERS = {
    "vid_direction": _direction, "vid_camera": _camera_move, "vid_count": _count,
    "vid_moved_most": _moved_most, "vid_order": _order, "vid_when": _when,
}  # fmt: skip


def sample_video(
    kind: str, rng: np.random.Generator, cfg: VideoConfig = VideoConfig()
) -> tuple[Clip, str, str, str]:
    """(clip, question, answer, rationale) of skill ``kind``: clips are drawn until one is valid."""
    for _ in range(200):
        got = BUILDERS[kind](rng, cfg)
        if got is not None:
            return got
    raise RuntimeError(f"sample_video: no valid {kind} clip in 200 tries; loosen VideoConfig")
