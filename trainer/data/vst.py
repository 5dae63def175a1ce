"""Visual Spatial Tuning data: procedural questions about single images, multiple views of one
scene, and videos, all from the ray-cast scene model of trainer.data.spatial, every answer
verifiable (:func:`check_answer`), each with a short chain of thought built from the scene's ground
truth for the reasoning variant (VST-R style: ``<think>rationale</think>answer``).

| skill | scenario | answer | verifier | chance baseline |
|---|---|---|---|---|
| ``count`` | single | ``2`` | exact | majority answer |
| ``closer`` | single | ``red`` | exact | 1/2 |
| ``relation`` | single | ``yes`` | exact | majority answer |
| ``depth_order`` | single | ``blue, red, gray`` | exact | 1/6 |
| ``ground2d`` | single | ``<bbox>x1,y1,x2,y2</bbox>`` | IoU >= 0.5 | mean box |
| ``depth`` | single | ``4.2`` | within 10% | mean answer |
| ``ground3d`` | single | ``(0.4, 0.9, 4.2)`` | within 10% (vector norm) | mean answer |
| ``relative_size`` | single | ``red`` | exact | 1/2 |
| ``distance`` | single | ``1.7`` | within 10% | mean answer |
| ``box3d`` | single | ``(0.4, 0.9, 4.2, 0.8, 0.8, 0.8, 30)`` | centre 10%, sides 20%, yaw 10 deg | mean |
| ``mv_closer`` | multiview | ``2`` | exact | majority answer |
| ``mv_rotation`` | multiview | ``left, 45`` | side exact, angle within 15 deg (exclusive) | majority answer |
| ``mv_translation`` | multiview | ``right`` | exact | majority answer |
| ``mv_correspondence`` | multiview | ``<bbox>x1,y1,x2,y2</bbox>`` | IoU >= 0.5 | mean box |
| ``mv_count`` | multiview | ``4`` | exact | majority answer |
| ``vid_direction`` | video, motion (5 FPS) | ``left`` | exact | majority answer |
| ``vid_camera`` | video, motion (5 FPS) | ``forward`` | exact | majority answer |
| ``vid_count`` | video, counting (5 FPS) | ``2`` | exact | majority answer |
| ``vid_moved_most`` | video, motion (5 FPS) | ``red`` | exact | 1/3 |
| ``vid_order`` | video, temporal (2 FPS) | ``blue, red, gray`` | exact | 1/6 |
| ``vid_when`` | video, temporal (2 FPS) | ``<|time_start|>[2.5 second]<|time_end|>`` | within 0.25 s | mean |

The first seven are trainer.data.spatial's (same scenes, questions and verifier); the new single-
image skills ask which of two objects is bigger in volume (at least 1.5 x), the distance in metres
between two objects' centres, and an object's 3D box: centre in camera coordinates, width, height,
length, and yaw about the vertical in degrees (0 for spheres and cylinders, in [0, 90) for cubes);
its verifier wants the centre within 10% (as ``ground3d``), each side within 20% and the yaw within
10 degrees modulo 90.
Multi-view skills: trainer.data.multiview; video skills and their sampling rates:
trainer.data.video. "Exact" compares after normalising case, spaces and a final full stop; a
``<think>`` span is ignored by every verifier. Chance baselines are the blind answers of
trainer.vst_eval (chance where the question lists its options in random order, else the majority
or mean answer fitted on training questions).

:class:`VSTDataset` mixes the scenarios and skills by :class:`VSTConfig`'s stated weights (default:
single 0.5, multiview 0.25, video 0.25; skills equally within their scenario) and its ``think_prob``
picks the variant: 0 gives perception answers only (VST-P), 1 reasoning only (VST-R). Sample ``i``
is a pure function of (seed, i); its meta names the skill, scenario, answer and video task, so a
verifier reward (:func:`reward`) needs nothing else.

As a training stage's data (trainer.recipes ``Stage.data``, the ``vst`` recipe) the mix is a spec
string, ``vst:think=1,single=0.5,multiview=0.25,video=0.25,vid_when=2``: ``think`` the
``think_prob``, a scenario's name its weight, a skill's name its weight within its scenario; what it
leaves out keeps VSTConfig's default (:func:`parse_spec`, :func:`format_spec`).
"""

from __future__ import annotations

import math
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import spatial
from .chat import Conversation, Media, Turn
from .multiview import ask_multiview, sample_multiview
from .spatial import _NUM_RE, Scene, SpatialConfig, _iou, _norm
from .tokenizer import END_THINK, THINK
from .video import TASKS, VideoConfig, sample_video

SCENARIOS = ("single", "multiview", "video")
NEW_SINGLE = ("relative_size", "distance", "box3d")
MULTIVIEW = ("mv_closer", "mv_rotation", "mv_translation", "mv_correspondence", "mv_count")
VIDEO = tuple(TASKS)
SKILLS = {
    **{k: "single" for k in (*spatial.KINDS, *NEW_SINGLE)},
    **{k: "multiview" for k in MULTIVIEW},
    **{k: "video" for k in VIDEO},
}
DEFAULT_SCENARIOS = (("single", 0.5), ("multiview", 0.25), ("video", 0.25))
SIZE_RATIO = 1.5  # relative_size: the bigger object has at least 1.5 x the volume


@dataclass(frozen=True)
class VSTConfig:
    scenarios: tuple[tuple[str, float], ...] = DEFAULT_SCENARIOS
    skills: tuple[tuple[str, float], ...] = tuple((k, 1.0) for k in SKILLS)  # weights within a scenario
    think_prob: float = 0.0  # fraction of answers given as <think>rationale</think>answer
    spatial: SpatialConfig = field(default_factory=SpatialConfig)  # single-image scenes
    view_size: int = 112  # multi-view images, px
    video: VideoConfig = field(default_factory=VideoConfig)

    def __post_init__(self) -> None:
        bad = [s for s, _ in self.scenarios if s not in SCENARIOS]
        bad += [k for k, _ in self.skills if k not in SKILLS]
        if bad:
            known = f"{SCENARIOS}, {tuple(SKILLS)}"
            raise ValueError(f"VSTConfig: unknown scenarios or skills {bad}; known: {known}")
        if not 0.0 <= self.think_prob <= 1.0:
            raise ValueError(f"VSTConfig.think_prob: expected a value in [0, 1], got {self.think_prob}")
        if any(w < 0 for _, w in (*self.scenarios, *self.skills)):
            raise ValueError("VSTConfig: weights must be >= 0")
        if not self.mix():
            raise ValueError("VSTConfig: no skill has a positive weight in a scenario with a positive weight")

    def mix(self) -> dict[str, float]:
        """Each skill's share of the samples: its scenario's share times its share within it."""
        scen = {s: w for s, w in self.scenarios if w > 0}
        skills = {k: w for k, w in self.skills if w > 0 and SKILLS[k] in scen}
        live = {s: w for s, w in scen.items() if any(SKILLS[k] == s for k in skills)}
        total = sum(live.values())
        out = {}
        for k, w in skills.items():
            within = sum(v for j, v in skills.items() if SKILLS[j] == SKILLS[k])
            out[k] = live[SKILLS[k]] / total * w / within
        return out


SPEC_PREFIX = "vst"


def is_spec(spec: str) -> bool:
    """Whether ``spec`` names VST data (``vst`` or ``vst:...``) rather than, say, a manifest path."""
    return spec == SPEC_PREFIX or spec.startswith(SPEC_PREFIX + ":")


def parse_spec(spec: str) -> VSTConfig:
    """The VSTConfig of a spec string (module docstring); ValueError naming what is wrong."""
    if not is_spec(spec):
        raise ValueError(f"VST data spec {spec!r}: expected 'vst' or 'vst:KEY=VALUE,...'")
    scenarios, skills = dict(DEFAULT_SCENARIOS), {k: 1.0 for k in SKILLS}
    think = 0.0
    body = spec[len(SPEC_PREFIX) + 1 :]
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not math.isfinite(number):
            raise ValueError(f"VST data spec {spec!r}: {item!r} is not KEY=NUMBER")
        if key == "think":
            think = number
        elif key in scenarios:
            scenarios[key] = number
        elif key in skills:
            skills[key] = number
        else:
            raise ValueError(
                f"VST data spec {spec!r}: unknown key {key!r}; expected think, a scenario "
                f"{SCENARIOS} or a skill of trainer.data.vst.SKILLS"
            )
    return VSTConfig(scenarios=tuple(scenarios.items()), skills=tuple(skills.items()), think_prob=think)


def format_spec(cfg: VSTConfig) -> str:
    """The spec string of ``cfg``'s mix (its non-default skill weights only)."""
    parts = [f"think={cfg.think_prob:g}", *(f"{s}={w:g}" for s, w in cfg.scenarios)]
    parts += [f"{k}={w:g}" for k, w in cfg.skills if w != 1.0]
    return f"{SPEC_PREFIX}:" + ",".join(parts)


# ----------------------------------------------------------------------------- new single-image skills


def _volume(o) -> float:
    if o.shape == "sphere":
        return 4 / 3 * math.pi * o.size**3
    if o.shape == "cube":
        return (2 * o.size) ** 3
    return math.pi * o.size**2 * o.height


def _dims(o) -> tuple[float, float, float]:
    """(width, height, length) of the object's box, metres."""
    return 2 * o.size, o.height, 2 * o.size


def _yaw_deg(o) -> int:
    """Rotation of the object's box about the vertical, clockwise seen from above, from the
    camera's axes: degrees in [0, 90) for cubes (their box repeats every 90), 0 for round shapes."""
    return round(math.degrees(o.yaw)) % 90 if o.shape == "cube" else 0


def _f(x: float) -> str:
    return f"{round(x, 1) + 0.0:.1f}"  # never "-0.0"


def _vec(v) -> str:
    return "(" + ", ".join(_f(x) for x in v) + ")"


def _q_relative_size(scene: Scene, rng):
    objs = scene.objects
    vol = [_volume(o) for o in objs]
    pairs = spatial._pairs(scene, lambda i, j: max(vol[i], vol[j]) >= SIZE_RATIO * min(vol[i], vol[j]))
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    big = i if vol[i] > vol[j] else j
    why = " ".join(
        f"{objs[k].name}: {' x '.join(_f(d) for d in _dims(objs[k]))} m, {vol[k]:.2f} m^3." for k in (i, j)
    )
    return f"Which is bigger in volume, the {objs[i].name} or the {objs[j].name}?", objs[big].color, why


def _q_distance(scene: Scene, rng):
    n = len(scene.objects)
    i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
    a, b = (scene.camera.to_camera(scene.objects[k].center) for k in (i, j))
    d = float(np.linalg.norm(a - b))
    if d < 0.5:
        return None
    na, nb = scene.objects[i].name, scene.objects[j].name
    why = f"{na}: centre {_vec(a)} m; {nb}: centre {_vec(b)} m; difference {_vec(b - a)} m, length {_f(d)} m."
    return f"How far apart are the centres of the {na} and the {nb}, in meters?", _f(d), why


def _q_box3d(scene: Scene, rng):
    k = int(rng.integers(len(scene.objects)))
    o = scene.objects[k]
    c, dims, yaw = scene.camera.to_camera(o.center), _dims(o), _yaw_deg(o)
    question = (f"Give the 3D box of the {o.name}: its centre x, y, z in camera coordinates, then width, "
                "height, length in meters, then yaw in degrees.")  # fmt: skip
    turn = f"turned {yaw} degrees" if o.shape == "cube" else "round, so yaw 0"
    why = f"The {o.name} is {' x '.join(_f(v) for v in dims)} m, {turn}; its centre is at {_vec(c)} m."
    return question, f"({', '.join(_f(v) for v in (*c, *dims))}, {yaw})", why


def _spatial_rationale(scene: Scene, kind: str, question: str) -> str:
    """A rationale for the spatial questions that come without one (trainer.data.spatial.ask)."""
    named = [o for o in scene.objects if f"the {o.name}" in question]
    if kind == "count":
        return "Objects: " + ", ".join(o.name for o in scene.objects) + "."
    o = named[0]
    k = scene.objects.index(o)
    if kind == "ground2d":
        rows, cols = np.nonzero(scene.ids == k)
        ss = scene.ids.shape[0] // scene.camera.height
        span = lambda a, n: f"{a.min() / ss:.0f}-{(a.max() + 1) / ss:.0f} of {n}"
        where = f"columns {span(cols, scene.camera.width)} and rows {span(rows, scene.camera.height)}"
        return f"The {o.name} covers {where} px."
    c = scene.camera.to_camera(o.center)
    if kind == "depth":
        return f"The {o.name}'s centre is at {_vec(c)} m in camera coordinates; depth is z."
    cam = scene.camera
    ahead = math.hypot(o.x - cam.origin[0], o.z - cam.origin[2])
    return (f"The {o.name} stands {_f(ahead)} m away on the ground, {_f(o.x)} m to the side, its centre "
            f"{_f(o.height / 2)} m up; the camera is {_f(cam.elevation)} m up, pitched "
            f"{round(math.degrees(cam.pitch))} degrees down.")  # fmt: skip


_SINGLE = {"relative_size": _q_relative_size, "distance": _q_distance, "box3d": _q_box3d}


# ----------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class VSTSample:
    skill: str
    parts: tuple[str | Media, ...]  # the user turn: media and the question
    question: str
    answer: str
    rationale: str
    scene: object = field(repr=False, compare=False)  # spatial.Scene, multiview.MultiViewScene, video.Clip

    @property
    def scenario(self) -> str:
        return SKILLS[self.skill]

    @property
    def task(self) -> str | None:
        return TASKS.get(self.skill)

    @property
    def image(self) -> np.ndarray:
        """The first image (the first view, the first frame), e.g. for a gallery."""
        media = next(p for p in self.parts if isinstance(p, Media))
        return media.source if media.kind == "image" else media.source[0]


def generate(skill: str, rng: np.random.Generator, cfg: VSTConfig = VSTConfig()) -> VSTSample:
    """A question of ``skill`` about a fresh scene drawn from ``rng`` (scenes without one are
    passed over)."""
    scenario = SKILLS[skill]
    if scenario == "video":
        clip, question, answer, why = sample_video(skill, rng, cfg.video)
        media = Media("video", clip.frames, fps=clip.fps, task=clip.task)
        return VSTSample(skill, (media, question), question, answer, why, clip)
    for _ in range(50):
        if scenario == "single":
            scene = spatial.sample_scene(rng, cfg.spatial)
            qa = _SINGLE[skill](scene, rng) if skill in _SINGLE else spatial.ask(scene, skill, rng)
            if qa is None:
                continue
            question, answer, why = qa
            why = why if why is not None else _spatial_rationale(scene, skill, question)
            return VSTSample(skill, (Media("image", scene.image), question), question, answer, why, scene)
        scene = sample_multiview(rng, cfg.view_size, cfg.spatial.supersample)
        qa = ask_multiview(scene, skill, rng)
        if qa is None:
            continue
        parts: list[str | Media] = []
        for v, view in enumerate(scene.views):
            parts += [f"View {v + 1}:", Media("image", view.image)]
        return VSTSample(skill, (*parts, qa[0]), *qa, scene)
    raise RuntimeError(f"generate: no {skill} question in 50 scenes")


class VSTDataset:
    """Infinite, deterministic stream of VST conversations: ``ds[i]`` depends only on (seed, i).

    With ``prefetch`` = P > 0, reading sample i starts building the next P samples the reader will
    ask for (i + s, i + 2s, ..., s the stride of its last two reads: a rank of a loading group reads
    every G-th) on P threads, so rendering runs on P cores while the reader encodes; the samples are
    the same either way."""

    num_samples = None  # unbounded

    def __init__(self, seed: int = 0, cfg: VSTConfig = VSTConfig(), *, prefetch: int = 0) -> None:
        self.seed, self.cfg, self.prefetch = seed, cfg, prefetch
        mix = cfg.mix()
        self._skills = list(mix)
        self._p = np.asarray(list(mix.values()), dtype=np.float64)
        self._p /= self._p.sum()
        self._ahead: dict[int, Future] = {}
        self._last: int | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(prefetch, thread_name_prefix="vst-prefetch") if prefetch > 0 else None

    @property
    def name(self) -> str:
        return f"vst(seed={self.seed})"

    def skill(self, index: int) -> str:
        """The skill of sample ``index`` (its generator's first draw), without rendering it."""
        return str(np.random.default_rng([self.seed, index]).choice(self._skills, p=self._p))

    def sample(self, index: int) -> VSTSample:
        if self._pool is None:
            return self._build(index)
        with self._lock:
            gap = index - self._last if self._last is not None else 1
            stride = gap if 0 < gap <= 64 else 1
            self._last = index
            future = self._ahead.pop(index, None)
            wanted = [index + stride * k for k in range(1, self.prefetch + 1)]
            for j in [j for j in self._ahead if j not in wanted]:
                self._ahead.pop(j).cancel()
            for j in wanted:
                if j not in self._ahead:
                    self._ahead[j] = self._pool.submit(self._build, j)
        return future.result() if future is not None else self._build(index)

    def close(self) -> None:
        """Stop prefetching: drop the samples not started, wait for those being built."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, {}

    def _build(self, index: int) -> VSTSample:
        rng = np.random.default_rng([self.seed, index])
        return generate(str(rng.choice(self._skills, p=self._p)), rng, self.cfg)

    def __getitem__(self, index: int) -> Conversation:
        s = self.sample(index)
        think = bool(np.random.default_rng([self.seed, index, 1]).random() < self.cfg.think_prob)
        reply = f"{THINK}{s.rationale}{END_THINK}{s.answer}" if think else s.answer
        meta = {"kind": s.skill, "scenario": s.scenario, "task": s.task, "question": s.question,
                "answer": s.answer, "think": think, "index": index}  # fmt: skip
        turns = (Turn("user", s.parts), Turn("assistant", (reply,)))
        return Conversation(turns, sample_id=f"vst-{self.seed}-{index}", meta=meta)


# ----------------------------------------------------------------------------- verifiers


def _numbers(text: str) -> list[float]:
    return [float(v) for v in _NUM_RE.findall(_norm(text))]


def _check_box3d(pred: str, ref: str) -> bool:
    p, r = _numbers(pred), _numbers(ref)
    if len(p) != 7 or len(r) != 7:
        return False
    centre = np.linalg.norm(np.subtract(p[:3], r[:3])) <= 0.1 * np.linalg.norm(r[:3])
    sides = all(abs(a - b) <= 0.2 * b for a, b in zip(p[3:6], r[3:6], strict=True))
    turn = abs((p[6] - r[6] + 45) % 90 - 45)
    return bool(centre and sides and turn <= 10)


_TURN_RE = re.compile(r"^(left|right)\W+(-?\d+(?:\.\d+)?)")


def _check_rotation(pred: str, ref: str) -> bool:
    p, r = _TURN_RE.match(_norm(pred)), _TURN_RE.match(_norm(ref))
    return bool(p and r and p[1] == r[1] and abs(float(p[2]) - float(r[2])) < 15)


def _check_time(pred: str, ref: str) -> bool:
    p, r = _numbers(pred), _numbers(ref)
    return len(p) == 1 and len(r) == 1 and abs(p[0] - r[0]) <= 0.25


_CHECKS = {
    "distance": lambda p, r: spatial.check_answer("depth", p, r),
    "box3d": _check_box3d,
    "mv_rotation": _check_rotation,
    "mv_correspondence": lambda p, r: spatial.check_answer("ground2d", p, r),
    "vid_when": _check_time,
}


def check_answer(kind: str, prediction: str, reference: str) -> bool:
    """Whether ``prediction`` answers a ``kind`` question whose answer is ``reference`` (the
    verifier column of the module's table)."""
    if kind in _CHECKS:
        return _CHECKS[kind](prediction, reference)
    return spatial.check_answer(kind, prediction, reference)


GRADED = {"ground2d": "IoU", "depth": "closeness", "ground3d": "closeness", "distance": "closeness",
          "mv_correspondence": "IoU"}  # fmt: skip


def graded_score(kind: str, prediction: str, reference: str) -> float:
    """IoU of the boxes (ground2d, mv_correspondence), max(0, 1 - |p - t| / |t|) of depths,
    centres and distances; 0 when the prediction does not parse; else 1.0 or 0.0 by the verifier."""
    if kind not in GRADED:
        return float(check_answer(kind, prediction, reference))
    p, t = _numbers(prediction), _numbers(reference)
    if len(p) != len(t) or not t:
        return 0.0
    if GRADED[kind] == "IoU":
        return _iou(p, t) if len(p) == 4 else 0.0
    err, ref = float(np.linalg.norm(np.subtract(p, t))), float(np.linalg.norm(t))
    return max(0.0, 1.0 - err / ref) if ref > 0 else float(err == 0)


def reward(meta: dict, reply: str) -> float:
    """1.0 when ``reply`` answers the sample of ``meta`` (a VSTDataset conversation's) correctly."""
    return float(check_answer(meta["kind"], reply, meta["answer"]))
