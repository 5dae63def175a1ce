"""Multi-view scenes: one ray-cast scene (trainer.data.render's objects and ground) seen from 2-4
camera poses, and questions whose answers follow from the known poses and layout.

A :class:`PoseCamera` is trainer.data.render's pitched pinhole camera placed anywhere on the ground
plane and turned about the vertical axis (``yaw``, positive = turned left, counter-clockwise seen
from above). :func:`render_posed` ray-casts it with the same shapes (``render._hit``), shading and
checkered ground as trainer.data.render -- the ground's tiles are fixed in the world, so they slide
across the image as the camera moves -- and at the default pose it reproduces ``render`` exactly.
:func:`render_many` renders several views or frames at once on a thread pool (the kernel releases
the GIL) and renders repeated frames once, which is what keeps multi-view and video samples cheap
(bench/bench_vst_data.py).

Views orbit the scene: camera ``k`` stands 3.5-7.5 m from the centre of the objects and looks
roughly at it, its azimuth 25-110 degrees from the previous camera's, so an object may be out of
frame or hidden in some views; every object is well visible in at least one. Questions
(:func:`ask_multiview`; the skill table is in trainer.data.vst):

- ``mv_closer``: in which view is the camera closest to (farthest from) an object seen in every
  view; the winner is at least 20% nearer (farther) than every other view.
- ``mv_rotation``: which way and by how many degrees the camera turned from view 1 to view k
  (nearest 15 degrees, at least 15).
- ``mv_translation``: whether camera k stands left, right, forward or backward of camera 1, in
  camera 1's level frame; the main axis is at least 1.5 x the other and 0.5 m.
- ``mv_correspondence``: the box of an object in view k, given its box in view 1.
- ``mv_count``: how many objects (of a shape) the scene holds, each counted once across views.

Frames: world x right, y up, z ahead of the first camera's default heading; camera coordinates x
right, y down, z forward (OpenCV), as trainer.data.render.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np

from .render import _GROUND, _SHAPE_CODE, _SKY, COLORS, LIGHT, SHAPES, Camera, Object3D, _hit, _screen_box
from .spatial import PLURAL, Scene, _center_in_frame, _well_visible
from .tokenizer import BBOX, END_BBOX

VIEW_RANGE = (2, 4)
CLOSER_GAP = 1.2  # mv_closer: the winner is 20% nearer (farther) than every other view
MIN_TURN, MAX_TURN = 15, 150  # mv_rotation: degrees; MIN_TURN is also the answers' rounding step
MOVE_RATIO, MIN_MOVE = 1.5, 0.5  # mv_translation: main axis >= 1.5 x the other and >= 0.5 m


@dataclass(frozen=True)
class PoseCamera(Camera):
    """Camera at ground position (x, z), ``elevation`` above it, turned ``yaw`` rad to the left
    and pitched ``pitch`` down."""

    x: float = 0.0
    z: float = 0.0
    yaw: float = 0.0

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, c = math.sin(self.pitch), math.cos(self.pitch)
        sy, cy = math.sin(self.yaw), math.cos(self.yaw)
        return np.array([cy, 0.0, sy]), np.array([s * sy, -c, -s * cy]), np.array([-c * sy, -s, c * cy])

    @property
    def origin(self) -> np.ndarray:
        return np.array([self.x, self.elevation, self.z])

    @property
    def heading(self) -> np.ndarray:
        """Level forward direction on the ground, (x, z)."""
        return np.array([-math.sin(self.yaw), math.cos(self.yaw)])


@numba.njit(cache=True, nogil=True)
def _render_posed_kernel(
    width, height, ss, focal, origin, axes, objs, boxes, colors, light, image, ids, silhouettes
):
    """trainer.data.render._render_kernel for a camera at ``origin`` with rows of ``axes`` its
    right, down and forward directions; ground tiles and haze in world coordinates."""
    ox, oy, oz = origin[0], origin[1], origin[2]
    f = focal * ss
    W, H = width * ss, height * ss
    inv = 1.0 / (ss * ss)
    for i in range(H):
        v = (i + 0.5 - H / 2) / f
        for j in range(W):
            u = (j + 0.5 - W / 2) / f
            dx = axes[0, 0] * u + axes[1, 0] * v + axes[2, 0]
            dy = axes[0, 1] * u + axes[1, 1] * v + axes[2, 1]
            dz = axes[0, 2] * u + axes[1, 2] * v + axes[2, 2]
            if dy < 0.0:
                tg = -oy / dy
                gx, gz = ox + tg * dx, oz + tg * dz
                tile = int(np.floor(gx) + np.floor(gz)) & 1
                rx, rz = tg * dx, tg * dz
                haze = min(max((np.sqrt(rx * rx + rz * rz) - 4.0) / 14.0, 0.0), 1.0)
                r = _GROUND[tile, 0] * (1 - haze) + _SKY[0] * haze
                g = _GROUND[tile, 1] * (1 - haze) + _SKY[1] * haze
                b = _GROUND[tile, 2] * (1 - haze) + _SKY[2] * haze
            else:
                r, g, b = _SKY[0], _SKY[1], _SKY[2]
            best, best_k, bnx, bny, bnz = np.inf, -1, 0.0, 0.0, 0.0
            for k in range(objs.shape[0]):
                if i < boxes[k, 0] or i >= boxes[k, 1] or j < boxes[k, 2] or j >= boxes[k, 3]:
                    continue
                t, nx, ny, nz = _hit(
                    int(objs[k, 0]), objs[k, 1], objs[k, 2], objs[k, 3], objs[k, 4], objs[k, 5], objs[k, 6],
                    ox, oy, oz, dx, dy, dz,
                )  # fmt: skip
                if t < np.inf:
                    silhouettes[k] += 1
                    if t < best:
                        best, best_k, bnx, bny, bnz = t, k, nx, ny, nz
            ids[i, j] = best_k
            if best_k >= 0:
                norm = max(np.sqrt(bnx * bnx + bny * bny + bnz * bnz), 1e-12)
                lam = (bnx * light[0] + bny * light[1] + bnz * light[2]) / norm
                shade = 0.35 + 0.65 * min(max(lam, 0.0), 1.0)
                r, g, b = colors[best_k, 0] * shade, colors[best_k, 1] * shade, colors[best_k, 2] * shade
            image[i // ss, j // ss, 0] += r * inv
            image[i // ss, j // ss, 1] += g * inv
            image[i // ss, j // ss, 2] += b * inv


def render_posed(cam: Camera, objects: tuple[Object3D, ...], ss: int = 2) -> Scene:
    """The scene ``objects`` seen by ``cam`` (a Camera or PoseCamera), as a spatial Scene: image,
    id buffer and silhouettes as trainer.data.render.render."""
    objs = np.array(
        [
            [_SHAPE_CODE[o.shape], o.size, o.height, o.x, o.z, math.cos(o.yaw), math.sin(o.yaw)]
            for o in objects
        ],
        dtype=np.float64,
    ).reshape(-1, 7)
    boxes = np.array([_screen_box(cam, o, ss) for o in objects], dtype=np.int64).reshape(-1, 4)
    colors = np.array([COLORS[o.color] for o in objects], dtype=np.float64).reshape(-1, 3)
    image = np.zeros((cam.height, cam.width, 3))
    ids = np.empty((cam.height * ss, cam.width * ss), dtype=np.int8)
    silhouettes = np.zeros(len(objects), dtype=np.int64)
    _render_posed_kernel(
        cam.width, cam.height, ss, cam.focal, cam.origin, np.stack(cam.axes()), objs, boxes, colors, LIGHT,
        image, ids, silhouettes,
    )  # fmt: skip
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return Scene(cam, tuple(objects), pixels, ids, tuple(int(v) for v in silhouettes))


def render_workers() -> int:
    """Threads :func:`render_many` uses: $SEEDVL_RENDER_WORKERS, else up to 8 of the CPUs."""
    env = os.environ.get("SEEDVL_RENDER_WORKERS")
    return max(1, int(env)) if env else max(1, min(8, os.cpu_count() or 1))


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="render")


def render_many(
    jobs: list[tuple[Camera, tuple[Object3D, ...]]], ss: int = 2, workers: int | None = None
) -> list[Scene]:
    """:func:`render_posed` of every (camera, objects) job, in order, on ``workers`` threads. Equal
    jobs are rendered once and share their Scene (a video's frames repeat wherever nothing moves)."""
    workers = render_workers() if workers is None else workers
    unique = list(dict.fromkeys(jobs))
    if workers <= 1 or len(unique) <= 1:
        scenes = [render_posed(cam, objs, ss) for cam, objs in unique]
    else:
        scenes = list(_pool(workers).map(lambda job: render_posed(job[0], job[1], ss), unique))
    done = dict(zip(unique, scenes, strict=True))
    return [done[job] for job in jobs]


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class MultiViewScene:
    objects: tuple[Object3D, ...]
    views: tuple[Scene, ...]  # one per camera, ids index ``objects``
    supersample: int = 2

    def seen(self, view: int, k: int) -> bool:
        """Object k is well visible in ``view`` (a third of its silhouette, as spatial's scenes)."""
        return bool(_well_visible(self.views[view], k, self.supersample))

    def centred(self, view: int, k: int) -> bool:
        """Object k's centre projects well inside ``view`` (not cut by the frame's edge)."""
        cam, obj = self.views[view].camera, self.objects[k]
        return cam.to_camera(obj.center)[2] > 0.5 and _center_in_frame(cam, obj)


def sample_multiview(rng: np.random.Generator, size: int = 112, ss: int = 2) -> MultiViewScene:
    """2-4 views of 3-6 objects around the origin, every object well visible in some view."""
    for _ in range(100):
        n = int(rng.integers(3, 7))
        objects: list[Object3D] = []
        for color in rng.permutation(list(COLORS))[:n]:
            for _ in range(30):
                r, a = 2.2 * math.sqrt(float(rng.random())), float(rng.uniform(0, 2 * math.pi))
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                cand = Object3D(shape, str(color), float(rng.uniform(0.25, 0.5)), r * math.cos(a),
                                r * math.sin(a), float(rng.uniform(0, math.pi / 2)))  # fmt: skip
                if all(
                    math.hypot(cand.x - o.x, cand.z - o.z) > 1.5 * (cand.size + o.size) + 0.1 for o in objects
                ):
                    objects.append(cand)
                    break
        if len(objects) < 3:
            continue
        cams, azimuth = [], float(rng.uniform(-math.pi, math.pi))
        for k in range(int(rng.integers(VIEW_RANGE[0], VIEW_RANGE[1] + 1))):
            if k:
                azimuth += float(rng.choice([-1, 1]) * rng.uniform(math.radians(25), math.radians(110)))
            radius = float(rng.uniform(3.5, 7.5))
            yaw = azimuth + float(rng.uniform(-0.35, 0.35))  # heading (-sin a, cos a) faces the centre
            cams.append(
                PoseCamera(size, size, float(rng.uniform(1.2, 2.2)), math.radians(float(rng.uniform(12, 28))),
                           size * float(rng.uniform(1.0, 1.3)), radius * math.sin(azimuth),
                           -radius * math.cos(azimuth), yaw)
            )  # fmt: skip
        views = render_many([(c, tuple(objects)) for c in cams], ss)
        scene = MultiViewScene(tuple(objects), tuple(views), ss)
        if all(any(scene.seen(v, k) for v in range(len(views))) for k in range(len(objects))):
            return scene
    raise RuntimeError("sample_multiview: no valid scene in 100 tries")


# ----------------------------------------------------------------------------- questions


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _box_text(box: tuple[int, int, int, int]) -> str:
    return BBOX + ",".join(str(v) for v in box) + END_BBOX


def _dist(cam: PoseCamera, obj: Object3D) -> float:
    return float(np.linalg.norm(obj.center - cam.origin))


def _q_closer(s: MultiViewScene, rng):
    nv = len(s.views)
    cands = [k for k in range(len(s.objects)) if all(s.seen(v, k) and s.centred(v, k) for v in range(nv))]
    far = bool(rng.random() < 0.5)
    options = []
    for k in cands:
        d = sorted(_dist(view.camera, s.objects[k]) for view in s.views)
        if (d[-1] >= CLOSER_GAP * d[-2]) if far else (d[1] >= CLOSER_GAP * d[0]):
            options.append(k)
    if not options:
        return None
    k = options[int(rng.integers(len(options)))]
    d = [_dist(view.camera, s.objects[k]) for view in s.views]
    best = int(np.argmax(d) if far else np.argmin(d))
    name, word = s.objects[k].name, "farthest from" if far else "closest to"
    why = f"Distance to the {name}: " + ", ".join(f"view {v + 1} {_fmt(x)} m" for v, x in enumerate(d)) + "."
    return (
        f"In which view is the camera {word} the {name}? Answer with the view's number.",
        str(best + 1),
        why,
    )


def _turn(a: PoseCamera, b: PoseCamera) -> float:
    """Degrees camera b is turned left of camera a, in (-180, 180]."""
    d = math.degrees(b.yaw - a.yaw) % 360.0
    return d - 360.0 if d > 180.0 else d


def _q_rotation(s: MultiViewScene, rng):
    v = int(rng.integers(1, len(s.views)))
    a, b = s.views[0].camera, s.views[v].camera
    turn = _turn(a, b)
    step = MIN_TURN * round(abs(turn) / MIN_TURN)
    if not MIN_TURN <= step <= MAX_TURN or abs(abs(turn) - step) > 0.4 * MIN_TURN:  # clear of ties
        return None
    side = "left" if turn > 0 else "right"
    why = f"View 1 faces {_fmt(math.degrees(a.yaw) % 360)} degrees, view {v + 1} faces {_fmt(math.degrees(b.yaw) % 360)} degrees (counter-clockwise): a turn of {_fmt(abs(turn))} degrees to the {side}."  # noqa: E501
    question = (f"From view 1 to view {v + 1}, which way did the camera turn, and by how many degrees? "
                f"Answer as 'left, 30' (nearest {MIN_TURN}).")  # fmt: skip
    return question, f"{side}, {step}", why


def _q_translation(s: MultiViewScene, rng):
    v = int(rng.integers(1, len(s.views)))
    a, b = s.views[0].camera, s.views[v].camera
    h = a.heading
    dx, dz = b.x - a.x, b.z - a.z
    fwd, right = dx * h[0] + dz * h[1], dx * h[1] - dz * h[0]  # right = heading turned clockwise
    big, small = sorted((abs(fwd), abs(right)), reverse=True)
    if big < MIN_MOVE or big < MOVE_RATIO * small:
        return None
    if abs(right) > abs(fwd):
        answer = "right" if right > 0 else "left"
    else:
        answer = "forward" if fwd > 0 else "backward"
    side, ahead = "right" if right > 0 else "left", "forward" if fwd > 0 else "backward"
    why = f"In view 1's frame, camera {v + 1} is {_fmt(abs(right))} m {side} and {_fmt(abs(fwd))} m {ahead}."
    question = (f"Relative to the camera of view 1, did the camera of view {v + 1} move left, right, "
                "forward or backward?")  # fmt: skip
    return question, answer, why


def _q_correspondence(s: MultiViewScene, rng):
    pairs = [
        (v, k) for v in range(1, len(s.views)) for k in range(len(s.objects))
        if s.seen(0, k) and s.seen(v, k) and s.centred(0, k) and s.centred(v, k)
    ]  # fmt: skip
    if not pairs:
        return None
    v, k = pairs[int(rng.integers(len(pairs)))]
    here, there = _box_text(s.views[0].visible_box(k)), _box_text(s.views[v].visible_box(k))
    question = f"The object at {here} in view 1: give its bounding box in view {v + 1}."
    name = s.objects[k].name
    why = f"The box in view 1 holds the {name}; in view {v + 1} the {name} is at {there}."
    return question, there, why


def _q_count(s: MultiViewScene, rng):
    shape = None if rng.random() < 1 / 3 else SHAPES[int(rng.integers(len(SHAPES)))]
    match = [k for k, o in enumerate(s.objects) if shape is None or o.shape == shape]
    what = "objects" if shape is None else PLURAL[shape]
    lines = []
    for v in range(len(s.views)):
        seen = [s.objects[k].name for k in match if s.seen(v, k)]
        lines.append(f"view {v + 1}: {', '.join(seen) or 'none'}")
    names = ", ".join(s.objects[k].name for k in match) or "none"
    why = "; ".join(lines) + f". Distinct {what}: {names}."
    question = (
        f"How many {what} are there in the scene? Objects may appear in several views; count each once."
    )
    return question, str(len(match)), why


QUESTIONS = {
    "mv_closer": _q_closer, "mv_rotation": _q_rotation, "mv_translation": _q_translation,
    "mv_correspondence": _q_correspondence, "mv_count": _q_count,
}  # fmt: skip


def ask_multiview(scene: MultiViewScene, kind: str, rng: np.random.Generator):
    """(question, answer, rationale) of ``kind`` about ``scene``, or None when it has none."""
    return QUESTIONS[kind](scene, rng)
