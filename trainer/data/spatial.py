"""Procedural spatial-reasoning data, the trainer's embedded default (in the spirit of VST-P).

Each sample is one rendered scene of 2-5 simple objects (spheres, cubes, cylinders in distinct
colours) standing on a checkered ground plane, seen by a pinhole camera pitched down, and one
question about it whose answer is computed from the known 3D layout, so every answer is verifiable
(:func:`check_answer`):

| kind | question | answer |
|---|---|---|
| ``count`` | How many cubes are there? | ``2`` |
| ``closer`` | Which is closer to the camera, the red cube or the blue sphere? | ``red`` |
| ``relation`` | Is the red cube to the left of the blue sphere? | ``yes`` |
| ``depth_order`` | Sort from nearest to farthest: ... | ``blue, red, gray`` |
| ``ground2d`` | Give the bounding box of the red cube. | ``<bbox>x1,y1,x2,y2</bbox>`` in [0, 999] |
| ``depth`` | What is the depth of the red cube in meters? | ``4.2`` |
| ``ground3d`` | Where is the center of the red cube in camera coordinates, in meters? | ``(0.4, 0.9, 4.2)`` |

Choice answers name objects by colour alone: every object in a scene has its own colour, so the
colour identifies it, and a byte-level model then copies one word per object from the question
instead of two (the tiny preset got the colour right and the shape wrong in a third of its misses).

Conventions: camera coordinates are x right, y down, z forward (OpenCV); depth is z. Boxes are the
visible pixels' extent, normalised to [0, 999] as the paper does for all coordinates (§3.1.3).
Relative-depth questions only pair objects whose depths differ by more than 20% (the paper's
threshold for its relative-depth data, §3.1.4), and left/right only objects 0.3 m apart.

Images come from exact ray casting (trainer.data.render, a numba kernel with a per-pixel depth
test); its id buffer gives each object's visible pixels, so boxes and visibility checks come from
the rendered image itself. A sample (112 px by default, 2x2 supersampled) takes a few milliseconds, so data
is generated on the fly (the first call compiles the kernel, a few seconds, cached on disk after).

Everything is a pure function of (seed, index): sample ``i`` draws from
``np.random.default_rng([seed, i])``. :func:`export_spatial` writes samples as a JSONL manifest plus
PNG files that trainer.data.manifest reads back pixel for pixel.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .chat import Conversation, Media, Turn
from .render import COLORS, SHAPES, Camera, Object3D, render
from .tokenizer import BBOX, END_BBOX, END_THINK, THINK

PLURAL = {"sphere": "spheres", "cube": "cubes", "cylinder": "cylinders"}
KINDS = ("count", "closer", "relation", "depth_order", "ground2d", "depth", "ground3d")
# Every skill is scored on the same number of held-out questions, so every skill gets a fair share
# of the training questions; short answers still get a little more (a tiny model learns them first).
DEFAULT_MIX = (
    ("count", 0.2), ("closer", 0.2), ("relation", 0.15), ("ground2d", 0.1),
    ("depth_order", 0.1), ("depth", 0.15), ("ground3d", 0.1),
)  # fmt: skip
Mix = tuple[tuple[str, float], ...]
# The trainer's skill curriculum (TRAINING): (first sample index, mix from there on). The tiny model
# learns a skill in 100-300 steps when the skill has those steps mostly to itself, and not in a mix
# of seven (profiles/20261201_main_job_learning.md). Closer comes first: it teaches the model to find
# the objects a question names, which the later skills reuse. Later phases keep a share of the
# earlier skills so that they are not forgotten. Indices count the samples of the one stream all the
# recipe's stages read in turn, and the boundaries fit the default run (words tokenizer: about 22
# samples a step in stages 0-1 and 85 in SFT): closer through the pre-training stages and SFT's first
# ~150 steps, depth_order for the next ~250, then depth with the others. A scene without a question
# of the drawn skill (depth_order needs three objects far enough apart) asks a count instead, so
# count gets a share of every phase. The grounding skills get none: a 1% share (17 answer ids each)
# took a tenth of the gradient and only taught the model half a box.
CURRICULUM: tuple[tuple[int, Mix], ...] = (
    (0, (("closer", 1.0),)),
    (15_000, (("depth_order", 0.8), ("closer", 0.2))),
    (36_000, (("depth", 0.5), ("depth_order", 0.2), ("closer", 0.15), ("count", 0.15), ("relation", 0.05))),
)  # fmt: skip
DEPTH_GAP = 1.2  # relative-depth questions: farther depth >= 1.2 x nearer depth
LATERAL_GAP = 0.3  # left/right questions: |x1 - x2| >= 0.3 m


@dataclass(frozen=True)
class SpatialConfig:
    # Image sides in px, multiples of 28 (no resize needed). One size by default: the LLM sees the
    # visual tokens in raster order with 1D positions only, so with a fixed 4 x 4 grid a token's
    # position in the sequence tells its row and column; mixed sizes hide that from a small model.
    sizes: tuple[int, ...] = (112,)
    min_objects: int = 2
    max_objects: int = 5
    mix: Mix = DEFAULT_MIX
    # Phases ((first sample index, mix), ...) that replace `mix` from their index on; the first
    # starts at 0. Empty: `mix` throughout.
    curriculum: tuple[tuple[int, Mix], ...] = ()
    think_prob: float = 0.0  # fraction of answers preceded by a <think>...</think> rationale
    supersample: int = 2
    # Questions per scene, asked one after another in one conversation: every question after the
    # first costs its text only, not another picture's tokens and ViT pass.
    questions: int = 1
    # End each conversation with "Describe the scene." and a caption that lists the objects near to
    # far with their depths, then their colours left to right: text the picture predicts, for the
    # pre-training stages, whose loss also counts the questions (which it does not predict).
    caption: bool = False

    def __post_init__(self) -> None:
        _check_mix("mix", self.mix)
        for i, (_, mix) in enumerate(self.curriculum):
            _check_mix(f"curriculum[{i}]", mix)
        starts = [start for start, _ in self.curriculum]
        if starts and (starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts))):
            raise ValueError(
                f"SpatialConfig.curriculum: expected phases starting at 0 in increasing order, "
                f"got starts {starts}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= len(COLORS):
            raise ValueError(f"SpatialConfig: expected 1 <= min_objects <= max_objects <= {len(COLORS)}")
        if self.questions < 1:
            raise ValueError(f"SpatialConfig.questions: expected >= 1, got {self.questions}")


def _check_mix(name: str, mix: Mix) -> None:
    unknown = [k for k, _ in mix if k not in KINDS]
    if unknown:
        raise ValueError(f"SpatialConfig.{name}: unknown kinds {unknown}; known: {KINDS}")
    if not mix or any(w < 0 for _, w in mix) or sum(w for _, w in mix) <= 0:
        raise ValueError(f"SpatialConfig.{name}: expected weights >= 0 with a positive sum, got {mix}")


# What the trainer's embedded source serves (trainer.components): one question per scene, skills
# by CURRICULUM. The data spec "spatial:questions=4,caption=1" asks several questions of each scene
# and ends it with the caption, "spatial:curriculum=0" draws DEFAULT_MIX throughout
# (profiles/20261201_main_job_learning.md has what each did to the default run).
TRAINING = SpatialConfig(curriculum=CURRICULUM)


def training_config(options: str = "") -> SpatialConfig:
    """:data:`TRAINING` with ``options`` applied: "questions=2,caption=0,think_prob=0.5,curriculum=0"
    (the data spec ``spatial:OPTIONS`` of ``--data`` and of a stage's ``data``)."""
    flag = lambda v: v.lower() in ("1", "true")
    types = {
        "questions": int, "caption": flag, "think_prob": float,
        "curriculum": lambda v: CURRICULUM if flag(v) else (),
    }  # fmt: skip
    changes = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(
                f"spatial data option {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}"
            )
        try:
            changes[key] = types[key](value)
        except ValueError:
            raise ValueError(f"spatial data option {item!r}: bad value {value!r}") from None
    return replace(TRAINING, **changes)


@dataclass(frozen=True)
class Scene:
    camera: Camera
    objects: tuple[Object3D, ...]
    image: np.ndarray = field(repr=False, compare=False)  # (H, W, 3) uint8
    ids: np.ndarray = field(repr=False, compare=False)  # (H*s, W*s) int8 object id per pixel, -1 none
    silhouettes: tuple[int, ...] = ()  # unoccluded pixels of each object in the id buffer

    def depth(self, k: int) -> float:
        return float(self.camera.to_camera(self.objects[k].center)[2])

    def distance(self, k: int) -> float:
        return float(np.linalg.norm(self.objects[k].center - self.camera.origin))

    def visible_box(self, k: int) -> tuple[int, int, int, int]:
        """Visible extent of object k, (x1, y1, x2, y2) normalised to [0, 999]."""
        rows, cols = np.nonzero(self.ids == k)
        h, w = self.ids.shape
        sx, sy = 999 / w, 999 / h
        return (
            round(cols.min() * sx),
            round(rows.min() * sy),
            round((cols.max() + 1) * sx),
            round((rows.max() + 1) * sy),
        )


# ----------------------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator, cfg: SpatialConfig = SpatialConfig()) -> Scene:
    """A random scene where every object is in frame and at least a third visible."""
    for _ in range(100):
        h, w = (int(v) for v in rng.choice(cfg.sizes, size=2))
        cam = Camera(
            width=w, height=h, elevation=float(rng.uniform(1.2, 2.2)),
            pitch=math.radians(float(rng.uniform(12, 28))), focal=float(max(h, w) * rng.uniform(0.9, 1.2)),
        )  # fmt: skip
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        colors = rng.permutation(list(COLORS))[:n]
        objects: list[Object3D] = []
        for color in colors:
            for _ in range(30):
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                size = float(rng.uniform(0.25, 0.5))
                z = float(rng.uniform(2.5, 7.0))
                half_fov = (w / 2) / cam.focal
                x = float(rng.uniform(-0.8, 0.8) * z * half_fov)
                cand = Object3D(shape, str(color), size, x, z, float(rng.uniform(0, math.pi / 2)))
                if _center_in_frame(cam, cand) and all(
                    math.hypot(x - o.x, z - o.z) > 1.5 * (size + o.size) + 0.1 for o in objects
                ):
                    objects.append(cand)
                    break
        if len(objects) < cfg.min_objects:
            continue
        scene = Scene(cam, tuple(objects), *render(cam, tuple(objects), cfg.supersample))
        if all(_well_visible(scene, k, cfg.supersample) for k in range(len(objects))):
            return scene
    raise RuntimeError("sample_scene: no valid scene in 100 tries; loosen SpatialConfig")


def _center_in_frame(cam: Camera, obj: Object3D) -> bool:
    c = cam.to_camera(obj.center)
    u, v = cam.width / 2 + cam.focal * c[0] / c[2], cam.height / 2 + cam.focal * c[1] / c[2]
    return 0.08 * cam.width < u < 0.92 * cam.width and 0.08 * cam.height < v < 0.95 * cam.height


def _well_visible(scene: Scene, k: int, ss: int) -> bool:
    visible = (scene.ids == k).sum()
    return visible >= max(6 * ss * ss, scene.silhouettes[k] / 3)


# ----------------------------------------------------------------------------- questions


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _q_count(scene, rng):
    if rng.random() < 1 / 3:
        return "How many objects are there?", str(len(scene.objects)), None
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    count = sum(o.shape == shape for o in scene.objects)
    names = ", ".join(o.name for o in scene.objects if o.shape == shape) or "none"
    return f"How many {PLURAL[shape]} are there?", str(count), f"{PLURAL[shape]}: {names}."


def _pairs(scene, ok):
    n = len(scene.objects)
    return [(i, j) for i in range(n) for j in range(n) if i != j and ok(i, j)]


def _q_closer(scene, rng):
    def ok(i, j):
        di, dj = sorted((scene.depth(i), scene.depth(j)))
        ei, ej = sorted((scene.distance(i), scene.distance(j)))
        same_order = (scene.depth(i) < scene.depth(j)) == (scene.distance(i) < scene.distance(j))
        return dj >= DEPTH_GAP * di and ej >= DEPTH_GAP * ei and same_order

    pairs = _pairs(scene, ok)
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    near = i if scene.depth(i) < scene.depth(j) else j
    a, b = scene.objects[i].name, scene.objects[j].name
    why = f"{a}: {_fmt(scene.depth(i))} m; {b}: {_fmt(scene.depth(j))} m."
    return f"Which is closer to the camera, the {a} or the {b}?", scene.objects[near].color, why


def _q_relation(scene, rng):
    xs = [scene.camera.to_camera(o.center)[0] for o in scene.objects]
    pairs = _pairs(scene, lambda i, j: abs(xs[i] - xs[j]) >= LATERAL_GAP)
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    side = "left" if rng.random() < 0.5 else "right"
    truth = xs[i] < xs[j] if side == "left" else xs[i] > xs[j]
    a, b = scene.objects[i].name, scene.objects[j].name
    why = f"{a}: x = {_fmt(xs[i])} m; {b}: x = {_fmt(xs[j])} m."
    return f"Is the {a} to the {side} of the {b}?", "yes" if truth else "no", why


def _q_depth_order(scene, rng):
    order = sorted(range(len(scene.objects)), key=scene.depth)
    chains = [
        order[s : s + 3]
        for s in range(len(order) - 2)
        if all(scene.depth(order[s + t + 1]) >= DEPTH_GAP * scene.depth(order[s + t]) for t in range(2))
    ]
    if not chains:
        return None
    chain = chains[int(rng.integers(len(chains)))]
    shown = [chain[p] for p in rng.permutation(3)]
    ask = ", ".join(f"the {scene.objects[k].name}" for k in shown)
    why = " ".join(f"{scene.objects[k].name}: {_fmt(scene.depth(k))} m;" for k in shown)
    answer = ", ".join(scene.objects[k].color for k in chain)
    return f"Sort from nearest to farthest: {ask}.", answer, why


def _q_ground2d(scene, rng):
    k = int(rng.integers(len(scene.objects)))
    box = ",".join(str(v) for v in scene.visible_box(k))
    return f"Give the bounding box of the {scene.objects[k].name}.", f"{BBOX}{box}{END_BBOX}", None


def _q_depth(scene, rng):
    k = int(rng.integers(len(scene.objects)))
    return f"What is the depth of the {scene.objects[k].name} in meters?", _fmt(scene.depth(k)), None


def _q_ground3d(scene, rng):
    k = int(rng.integers(len(scene.objects)))
    x, y, z = scene.camera.to_camera(scene.objects[k].center)
    question = f"Where is the center of the {scene.objects[k].name} in camera coordinates, in meters?"
    return question, f"({_fmt(x)}, {_fmt(y)}, {_fmt(z)})", None


_QUESTIONS = {
    "count": _q_count, "closer": _q_closer, "relation": _q_relation, "depth_order": _q_depth_order,
    "ground2d": _q_ground2d, "depth": _q_depth, "ground3d": _q_ground3d,
}  # fmt: skip


def ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str, str | None] | None:
    """(question, answer, rationale or None) of ``kind`` about ``scene``; None if it has no such
    question (e.g. no pair of objects differs enough in depth)."""
    return _QUESTIONS[kind](scene, rng)


def describe(scene: Scene) -> str:
    """The scene's caption: "Near to far: red cube 3.1 m, blue sphere 4.0 m. Left to right: blue, red." """
    near = sorted(range(len(scene.objects)), key=scene.depth)
    xs = [scene.camera.to_camera(o.center)[0] for o in scene.objects]
    left = sorted(range(len(scene.objects)), key=lambda k: xs[k])
    by_depth = ", ".join(f"{scene.objects[k].name} {_fmt(scene.depth(k))} m" for k in near)
    by_x = ", ".join(scene.objects[k].color for k in left)
    return f"Near to far: {by_depth}. Left to right: {by_x}."


# ----------------------------------------------------------------------------- answers


_THINK_RE = re.compile(re.escape(THINK) + ".*?" + re.escape(END_THINK), re.DOTALL)
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")


def _norm(s: str) -> str:
    return " ".join(_THINK_RE.sub("", s).strip().lower().rstrip(".").split())


def check_answer(kind: str, prediction: str, reference: str) -> bool:
    """Whether ``prediction`` answers correctly: exact (normalised) for counts, choices and orders;
    IoU >= 0.5 for boxes; within 10% for depths and 3D centres. A <think> span is ignored."""
    pred, ref = _norm(prediction), _norm(reference)
    if kind == "ground2d":
        p, r = [float(v) for v in _NUM_RE.findall(pred)], [float(v) for v in _NUM_RE.findall(ref)]
        return len(p) == 4 and _iou(p, r) >= 0.5
    if kind in ("depth", "ground3d"):
        p, r = np.array(_NUM_RE.findall(pred), float), np.array(_NUM_RE.findall(ref), float)
        return p.shape == r.shape and bool(np.linalg.norm(p - r) <= 0.1 * np.linalg.norm(r))
    return pred == ref


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------- dataset


class SpatialDataset:
    """Infinite, deterministic stream of spatial QA conversations: ``ds[i]`` depends only on
    (seed, i). ``meta`` holds the kind, question, answer and the scene."""

    num_samples = None  # unbounded

    def __init__(self, seed: int = 0, cfg: SpatialConfig = SpatialConfig()) -> None:
        self.seed, self.cfg = seed, cfg
        phases = cfg.curriculum or ((0, cfg.mix),)
        self._starts = [start for start, _ in phases]
        self._mixes = [
            (list(kinds), np.asarray(weights, dtype=np.float64) / np.sum(weights))
            for kinds, weights in (zip(*mix, strict=True) for _, mix in phases)
        ]

    def mix(self, index: int) -> tuple[list[str], np.ndarray]:
        """(skills, probabilities) that sample ``index`` draws its questions from."""
        return self._mixes[bisect.bisect_right(self._starts, index) - 1]

    @property
    def name(self) -> str:
        return f"spatial(seed={self.seed})"

    def sample(self, index: int) -> tuple[Scene, str, str, str, str | None]:
        """(scene, kind, question, answer, rationale) of sample ``index``."""
        rng = np.random.default_rng([self.seed, index])
        scene = sample_scene(rng, self.cfg)
        kinds, p = self.mix(index)
        kind = str(rng.choice(kinds, p=p))
        qa = ask(scene, kind, rng)
        if qa is None:  # the scene has no such question: fall back to counting
            kind, qa = "count", ask(scene, "count", rng)
        return (scene, kind, *qa)

    def __getitem__(self, index: int) -> Conversation:
        scene, kind, question, answer, why = self.sample(index)
        asked = [(kind, question, answer, why)]
        # Further questions about the same scene come from their own stream, so sample(index) and
        # the first turn stay what they are with one question per scene.
        more = np.random.default_rng([self.seed, index, 2])
        kinds, p = self.mix(index)
        for _ in range(4 * (self.cfg.questions - 1)):
            if len(asked) == self.cfg.questions:
                break
            k = str(more.choice(kinds, p=p))
            qa = ask(scene, k, more)
            if qa is not None and all(qa[0] != q for _, q, _, _ in asked):
                asked.append((k, *qa))
        rng = np.random.default_rng([self.seed, index, 1])
        turns = []
        for n, (_, q, a, w) in enumerate(asked):
            reply = a
            if w is not None and rng.random() < self.cfg.think_prob:
                reply = f"{THINK}{w}{END_THINK}{a}"
            user = (Media("image", scene.image), q) if n == 0 else (q,)
            turns += [Turn("user", user), Turn("assistant", (reply,))]
        if self.cfg.caption:
            turns += [Turn("user", ("Describe the scene.",)), Turn("assistant", (describe(scene),))]
        meta = {"kind": kind, "question": question, "answer": answer, "index": index}
        if len(asked) > 1:
            meta["asked"] = [{"kind": k, "question": q, "answer": a} for k, q, a, _ in asked]
        return Conversation(tuple(turns), sample_id=f"spatial-{self.seed}-{index}", meta=meta)


def export_spatial(
    out_dir: str | Path, num: int, seed: int = 0, cfg: SpatialConfig = SpatialConfig()
) -> Path:
    """Write samples 0..num-1 as ``out_dir/data.jsonl`` + ``out_dir/images/*.png``; returns the
    manifest path. Lines use the {"images": [...], "messages": [...]} form of trainer.data.manifest."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = SpatialDataset(seed, cfg)
    manifest = out / "data.jsonl"
    with open(manifest, "w") as f:
        for i in range(num):
            conv = ds[i]
            media, question = conv.turns[0].parts
            rel = f"images/{i:07d}.png"
            Image.fromarray(media.source).save(out / rel)
            messages = [{"role": "user", "content": f"<image>{question}"}]
            messages += [{"role": t.role, "content": t.parts[0]} for t in conv.turns[1:]]
            record = {"id": conv.sample_id, "images": [rel], "messages": messages}
            if len(conv.turns) == 2:  # the answer a held-out split of the manifest is scored against
                record["meta"] = {k: conv.meta[k] for k in ("kind", "answer")}
            f.write(json.dumps(record) + "\n")
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description="Export procedural spatial QA samples as JSONL + PNG.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(export_spatial(args.out, args.num, args.seed))


if __name__ == "__main__":
    main()
