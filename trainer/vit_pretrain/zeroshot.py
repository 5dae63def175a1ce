"""Zero-shot classification with the pre-trained encoders (paper §6.1.1, on rendered scenes).

Each label set is a fixed held-out set of scenes the training banks never draw (their own seed
stream), balanced over its classes. Each class is a set of prompts in the captions' forms, its
embedding the normalised mean of theirs -- CLIP's prompt ensembling, here over the attributes the
label leaves free and the captions' two forms (plain, and with each shape's count; in brackets
below: ``data.objects_caption``); an image's prediction is the class whose embedding is the most
similar (cosine) to its pooled embedding. Top-1 accuracy is reported next to chance (1 / classes;
the sets are balanced, so the majority answer scores the same):

| set | scenes | a class's prompts | chance |
|---|---|---|---|
| ``shape`` | one object | "one object(: one cube), a red cube", ... over the 8 colours | 1/3 |
| ``colour`` | one object | "one object(: one sphere), a red sphere", ... over the 3 shapes | 1/8 |
| ``count`` | 1-4 objects | "three objects(: one sphere and two cubes), a red cube, ...", 64 lists | 1/4 |
| ``motion`` | clips, one object moving | "an object moves left" (4 directions) | 1/4 |

With 50 scenes per class (the runner's ``ZERO_SHOT_PER_CLASS``) the sets hold 150, 400 and 200
scenes; the standard error of a top-1 near 0.5 is then 0.04, 0.025 and 0.035.

``motion`` is scored only when the recipe has a video stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from model.preprocess import ImagePatches, pack_images, patchify
from model.vit_heads import SeedViTPretrain

from ..data.render import COLORS, SHAPES
from ..data.spatial import SpatialConfig, sample_scene
from ..heldout import EvalRecord
from . import data
from .data import (
    IMAGE_SCENES,
    MOTIONS,
    CaptionTokenizer,
    VideoItem,
    count_phrase,
    make_video_item,
    objects_caption,
    pack_text,
    pack_videos,
)

IMAGE_SETS = ("shape", "colour", "count")
COUNTS = (1, 2, 3, 4)
COUNT_PROMPTS = 64  # random object lists per count class


@dataclass
class LabelSet:
    name: str
    classes: list[str]  # a name per class
    prompts: list[list[str]]  # the prompts of each class
    labels: list[int]
    images: list[ImagePatches] = field(default_factory=list)
    videos: list[VideoItem] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list, repr=False)  # for the gallery

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)


def build_sets(seed: int, per_class: int = 24, *, video: bool = False) -> dict[str, LabelSet]:
    """The held-out label sets (``per_class`` examples of every class), scene i of set s drawn
    from ``default_rng([seed, 4001, s, i])``."""
    one = SpatialConfig(sizes=IMAGE_SCENES.sizes, min_objects=1, max_objects=1)
    pick = np.random.default_rng([seed, 4001, 99])
    # Each prompt in every form the training captions take (plain, and with each shape's count).
    forms = tuple(
        f for f, share in ((False, 1 - data.SUMMARY_SHARE), (True, data.SUMMARY_SHARE)) if share > 0
    )
    lists = [
        [
            [(c, SHAPES[int(pick.integers(3))]) for c in pick.permutation(list(COLORS))[:n]]
            for _ in range(COUNT_PROMPTS)
        ]
        for n in COUNTS
    ]
    lists = [[objects_caption(objs, f) for objs in ls for f in forms] for ls in lists]
    sets = {
        "shape": LabelSet(
            "shape",
            list(SHAPES),
            [[objects_caption([(c, s)], f) for c in COLORS for f in forms] for s in SHAPES],
            [],
        ),
        "colour": LabelSet(
            "colour",
            list(COLORS),
            [[objects_caption([(c, s)], f) for s in SHAPES for f in forms] for c in COLORS],
            [],
        ),
        "count": LabelSet("count", [count_phrase(n) for n in COUNTS], lists, []),
    }
    for s, (name, label_of) in enumerate(
        (
            ("shape", lambda sc: SHAPES.index(sc.objects[0].shape)),
            ("colour", lambda sc: list(COLORS).index(sc.objects[0].color)),
        )
    ):
        target = sets[name]
        have = [0] * len(target.classes)
        i = 0
        while min(have) < per_class:
            scene = sample_scene(np.random.default_rng([seed, 4001, s, i]), one)
            i += 1
            label = label_of(scene)
            if have[label] < per_class:
                have[label] += 1
                _add(target, scene.image, label)
    for k in range(per_class * len(COUNTS)):
        n = COUNTS[k % len(COUNTS)]
        cfg = SpatialConfig(sizes=IMAGE_SCENES.sizes, min_objects=n, max_objects=n)
        scene = sample_scene(np.random.default_rng([seed, 4001, 2, k]), cfg)
        _add(sets["count"], scene.image, k % len(COUNTS))
    if video:
        ways = list(MOTIONS)
        phrases = [f"an object moves {MOTIONS[w]}" for w in ways]
        motion = LabelSet("motion", phrases, [[p] for p in phrases], [])
        have, i = [0] * len(ways), 0
        while min(have) < per_class // 2:
            item = make_video_item("vid_direction", np.random.default_rng([seed, 4001, 3, i]))
            i += 1
            label = ways.index(item.answer)
            if have[label] < per_class // 2:
                have[label] += 1
                motion.videos.append(item)
                motion.labels.append(label)
        sets["motion"] = motion
    return sets


def _add(target: LabelSet, image: np.ndarray, label: int) -> None:
    target.images.append(patchify(image))
    target.labels.append(label)
    target.pixels.append(image)


@torch.no_grad()
def evaluate(
    model: SeedViTPretrain, sets: dict[str, LabelSet], tok: CaptionTokenizer, device: torch.device
) -> tuple[dict[str, dict], list[EvalRecord]]:
    """Scores per set ({accuracy, baseline (chance), total}) plus ``all`` (pooled), and a record per
    example for the gallery."""
    was_training = model.training
    model.eval()
    scores, records = {}, []
    for name, s in sets.items():
        text = pack_text([p for ps in s.prompts for p in ps], tok)
        t = F.normalize(
            model.encode_text(
                text.ids.to(device), text.cu_seqlens.to(device), text.max_seqlen, video=bool(s.videos)
            ),
            dim=-1,
        )
        owner = torch.repeat_interleave(
            torch.arange(len(s.prompts)), torch.tensor([len(ps) for ps in s.prompts])
        )
        t = F.normalize(
            t.new_zeros(len(s.prompts), t.shape[1]).index_add_(0, owner.to(device), t.float()), dim=-1
        )
        if s.videos:
            vb = pack_videos(s.videos)
            f = vb.frames
            x = model.encode_images(
                f.patches.to(device), f.pos_hw.to(device), f.cu_seqlens.to(device), f.max_seqlen,
                frame_times=vb.frame_times.to(device), cu_videos=vb.cu_videos.to(device),
                max_video=vb.max_video,
            )  # fmt: skip
        else:
            p = pack_images(s.images)
            x = model.encode_images(
                p.patches.to(device), p.pos_hw.to(device), p.cu_seqlens.to(device), p.max_seqlen
            )
        sim = (
            torch.nn.functional.normalize(x.float(), dim=-1)
            @ torch.nn.functional.normalize(t.float(), dim=-1).t()
        )
        pred = sim.argmax(1).cpu().tolist()
        correct = sum(int(a == b) for a, b in zip(pred, s.labels, strict=True))
        scores[name] = {"accuracy": correct / len(s.labels), "baseline": s.chance, "total": len(s.labels)}
        for j, (a, b) in enumerate(zip(pred, s.labels, strict=True)):
            image = s.pixels[j] if s.pixels else None
            records.append(
                EvalRecord(
                    kind=name,
                    question=f"zero-shot {name}: {len(s.prompts)} prompts",
                    truth=s.prompts[b],
                    answer=s.prompts[a],
                    ok=a == b,
                    score=float(a == b),
                    image=image,
                    sample_id=f"{name}-{j}",
                )
            )
    total = sum(v["total"] for v in scores.values())
    scores["all"] = {
        "accuracy": sum(v["accuracy"] * v["total"] for v in scores.values()) / total,
        "baseline": sum(v["baseline"] * v["total"] for v in scores.values()) / total,
        "total": total,
    }
    model.train(was_training)
    return scores, records


__all__ = ["IMAGE_SETS", "LabelSet", "build_sets", "evaluate"]
