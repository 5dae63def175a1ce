"""The VST data (trainer.data.vst, multiview, video) and its evaluation (trainer.vst_eval): the skill
table matches the code, every new skill's verifier accepts the ground truth and rejects near
misses, answers agree with the scenes (camera conventions checked from first principles, videos
against re-rendered frames), video questions reach the sampler with their task's rate, the mix is
as stated, and held-out scores come per skill and per scenario beside their baselines."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from test_trainer_evaluate import make_run

from model.preprocess import VIDEO_FPS
from trainer.data import vst
from trainer.data.chat import Conversation, EncodeConfig, Media, SampleError, Turn, encode_conversation
from trainer.data.multiview import PoseCamera, render_many, render_posed
from trainer.data.render import Object3D, render
from trainer.data.spatial import KINDS, SpatialDataset
from trainer.data.tokenizer import END_THINK, THINK, ByteTokenizer
from trainer.data.video import TASKS, VideoConfig
from trainer.heldout import EvalRecord
from trainer.vst_eval import VSTBaseline, VSTHeldOut, score_vst, vst_questions

NEW = [k for k in vst.SKILLS if k not in KINDS]


def _samples(skill: str, n: int = 2) -> list[vst.VSTSample]:
    return [vst.generate(skill, np.random.default_rng([11, i])) for i in range(n)]


def _named(question: str, objects) -> list[int]:
    """Indices of the objects the question names, in the order it names them."""
    hits = [
        (question.index(f"the {o.name}"), k) for k, o in enumerate(objects) if f"the {o.name}" in question
    ]
    return [k for _, k in sorted(hits)]


def test_skill_table_matches_the_code():
    rows = [line for line in vst.__doc__.splitlines() if line.startswith("| ``")]
    table = {re.match(r"\| ``(\w+)``", r)[1]: [c.strip() for c in r.split("|")[2:-1]] for r in rows}
    assert list(table) == list(vst.SKILLS)
    for skill, (scenario, *_) in table.items():
        assert scenario.split(",")[0] == vst.SKILLS[skill]
        if skill in TASKS:
            assert f"{TASKS[skill]} ({VIDEO_FPS[TASKS[skill]]:.0f} FPS)" in scenario


def test_posed_render_reproduces_render_at_the_default_pose():
    for i in range(3):
        scene = SpatialDataset(0).sample(i)[0]
        c = scene.camera
        posed = render_posed(PoseCamera(c.width, c.height, c.elevation, c.pitch, c.focal), scene.objects)
        image, ids, silhouettes = render(c, scene.objects)
        assert np.array_equal(posed.image, image) and np.array_equal(posed.ids, ids)
        assert posed.silhouettes == silhouettes


def test_pose_camera_conventions():
    """Turning left brings what was ahead to the right of the image; a camera moved right of
    another stands at positive x in the other's camera coordinates; the ground's tiles stay put."""
    cam = PoseCamera(112, 112, 1.5, math.radians(20), 112.0)
    ahead = np.array([0.0, 0.0, 6.0])
    assert abs(cam.to_camera(ahead)[0]) < 1e-9
    assert PoseCamera(112, 112, 1.5, math.radians(20), 112.0, yaw=math.radians(30)).to_camera(ahead)[0] > 1
    right, down, fwd = cam.axes()
    assert np.allclose(np.stack([right, down, fwd]) @ np.stack([right, down, fwd]).T, np.eye(3))
    moved = PoseCamera(112, 112, 1.5, math.radians(20), 112.0, x=1.5)
    assert cam.to_camera(moved.origin)[0] == pytest.approx(1.5)
    obj = (Object3D("cube", "red", 0.4, 0.0, 5.0, 0.0),)
    a, b = render_posed(cam, obj), render_posed(moved, obj)
    assert not np.array_equal(a.image[-10:], b.image[-10:])  # the floor slid by under the camera
    cols = lambda s: np.nonzero(s.ids == 0)[1].mean()
    assert cols(b) < cols(a)  # the camera moved right: the cube moved left in the image
    assert [s.ids.tolist() for s in render_many([(cam, obj), (moved, obj)], workers=2)] == [
        a.ids.tolist(), b.ids.tolist()
    ]  # fmt: skip


def _near_misses(s: vst.VSTSample) -> list[str]:
    """Wrong answers close to the truth, one family per skill."""
    a, q = s.answer, s.question
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", a)]
    if s.skill in ("relative_size", "vid_moved_most"):
        objs = s.scene.objects if s.skill == "relative_size" else [t.obj for t in s.scene.tracks]
        return [objs[k].color for k in _named(q, objs) if objs[k].color != a]
    if s.skill == "distance":
        return [f"{nums[0] * 1.15:.1f}", f"{nums[0] * 0.85:.1f}", "far"]
    if s.skill == "box3d":
        c, d, yaw = nums[:3], nums[3:6], nums[6]
        out = [[*(v * 1.2 for v in c), *d, yaw], [*c, d[0] * 1.3, *d[1:], yaw], [*c, *d, yaw + 20], [*c, *d]]
        return ["(" + ", ".join(f"{v:.1f}" for v in row) + ")" for row in out]
    if s.skill in ("mv_closer", "mv_count", "vid_count"):
        return [str(int(nums[0]) + 1), str(int(nums[0]) - 1)]
    if s.skill == "mv_rotation":
        side = a.split(",")[0]
        other = "right" if side == "left" else "left"
        return [f"{other}, {nums[0]:.0f}", f"{side}, {nums[0] + 15:.0f}", f"{side}, {nums[0] - 15:.0f}"]
    if s.skill in ("mv_translation", "vid_direction", "vid_camera"):
        options = {
            "mv_translation": "left right forward backward",
            "vid_camera": "left right forward backward",
        }
        return [w for w in options.get(s.skill, "left right toward away").split() if w != a]
    if s.skill == "mv_correspondence":
        x1, y1, x2, y2 = nums
        w = x2 - x1
        return [f"<bbox>{x1 + 0.6 * w:.0f},{y1:.0f},{x2 + 0.6 * w:.0f},{y2:.0f}</bbox>", "<bbox>1,2,3</bbox>"]
    if s.skill == "vid_order":
        first, second, third = a.split(", ")
        return [f"{second}, {first}, {third}", f"{first}, {third}, {second}"]
    if s.skill == "vid_when":
        return [a.replace(f"[{nums[0]:.1f}", f"[{nums[0] + d:.1f}") for d in (0.5, -0.5)]
    raise AssertionError(s.skill)


@pytest.mark.parametrize("skill", NEW)
def test_verifier_accepts_truth_rejects_near_misses(skill):
    for s in _samples(skill):
        assert s.skill == skill and s.scenario == vst.SKILLS[skill] and s.rationale
        assert vst.check_answer(skill, s.answer, s.answer)
        assert vst.check_answer(skill, f"{THINK}{s.rationale}{END_THINK}{s.answer}", s.answer)
        misses = _near_misses(s)
        assert misses, s
        for miss in misses:
            assert not vst.check_answer(skill, miss, s.answer), (skill, miss, s.answer)
        assert vst.graded_score(skill, s.answer, s.answer) == pytest.approx(1.0)


def test_single_image_answers_agree_with_the_scene():
    for s in _samples("distance", 3):
        i, j = _named(s.question, s.scene.objects)
        d = np.linalg.norm(s.scene.objects[i].center - s.scene.objects[j].center)  # world frame
        assert float(s.answer) == pytest.approx(d, abs=0.051)
    for s in _samples("relative_size", 3):
        objs = [s.scene.objects[k] for k in _named(s.question, s.scene.objects)]
        vol = {"sphere": 4 / 3 * math.pi, "cube": 8.0, "cylinder": 2.4 * math.pi}
        assert s.answer == max(objs, key=lambda o: vol[o.shape] * o.size**3).color
    for s in _samples("box3d", 3):
        (k,) = _named(s.question, s.scene.objects)
        o = s.scene.objects[k]
        nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", s.answer)]
        assert nums[4] == pytest.approx(o.height, abs=0.051) and nums[3] == pytest.approx(
            2 * o.size, abs=0.051
        )
        assert vst.check_answer("depth", f"{nums[2]}", f"{s.scene.depth(k):.1f}")


def test_multiview_answers_agree_with_the_poses():
    for s in _samples("mv_translation", 3):
        v = int(re.search(r"view (\d+) move", s.question)[1]) - 1
        a, b = s.scene.views[0].camera, s.scene.views[v].camera
        d = (b.origin - a.origin) * [1, 0, 1]  # level: the cameras' heights differ
        fwd = a.axes()[2] * [1, 0, 1]
        x, z = d @ a.axes()[0], d @ fwd / np.linalg.norm(fwd)
        axis = {"left": -x, "right": x, "forward": z, "backward": -z}
        assert max(axis, key=axis.get) == s.answer
    for s in _samples("mv_rotation", 3):
        v = int(re.search(r"to view (\d+)", s.question)[1]) - 1
        f1, f2 = s.scene.views[0].camera.axes()[2], s.scene.views[v].camera.axes()[2]
        turn = math.degrees(math.atan2(f1[0] * f2[2] - f1[2] * f2[0], f1[0] * f2[0] + f1[2] * f2[2]))
        side, angle = s.answer.split(", ")
        assert side == ("left" if turn > 0 else "right")  # turn > 0: f2 is rotated from +x toward +z
        assert abs(abs(turn) - float(angle)) < 7.5
    for s in _samples("mv_count", 3):
        shape = s.question.split()[2].rstrip("s")
        objs = [k for k, o in enumerate(s.scene.objects) if shape == "object" or o.shape == shape]
        assert int(s.answer) == len(objs)
        assert all(any((view.ids == k).any() for view in s.scene.views) for k in objs)
    for s in _samples("mv_correspondence", 2):
        v = int(re.search(r"in view (\d+)\.", s.question)[1]) - 1
        boxes = [s.scene.views[v].visible_box(k) for k in range(len(s.scene.objects)) if s.scene.seen(v, k)]
        assert (
            s.answer == "<bbox>" + ",".join(str(c) for c in vst.spatial._NUM_RE.findall(s.answer)) + "</bbox>"
        )
        assert tuple(int(c) for c in re.findall(r"\d+", s.answer)) in boxes


def test_video_answers_agree_with_the_frames():
    for s in _samples("vid_direction", 3):
        (k,) = _named(s.question, [t.obj for t in s.scene.tracks])
        t0, t1 = s.scene.times[0], s.scene.times[-1]
        first = render_posed(s.scene.cameras[0], tuple(t.at(t0) for t in s.scene.tracks))
        last = render_posed(s.scene.cameras[-1], tuple(t.at(t1) for t in s.scene.tracks))
        cols = [np.nonzero(f.ids == k)[1].mean() for f in (first, last)]
        size = [f.silhouettes[k] for f in (first, last)]
        moves = {"left": cols[0] - cols[1], "right": cols[1] - cols[0], "toward": 0, "away": 0}
        if s.answer in ("left", "right"):
            assert moves[s.answer] > 0
        else:
            assert (size[1] > size[0]) == (s.answer == "toward")
    for s in _samples("vid_when", 2):
        (k,) = _named(s.question, [t.obj for t in s.scene.tracks])
        f = s.scene.times.index(float(re.search(r"\[(\d+\.\d)", s.answer)[1]))
        assert s.scene.pixels[f, k] > 0 and not s.scene.pixels[:f, k].any()
    for s in _samples("vid_count", 2):
        (k,) = _named(s.question, [t.obj for t in s.scene.tracks])
        shown = np.concatenate([[0], s.scene.pixels[:, k] > 0, [0]]).astype(int)
        assert int(s.answer) == int((np.diff(shown) == 1).sum())


def test_media_task_picks_the_sampling_rate():
    frames = np.zeros((20, 56, 56, 3), np.uint8)  # 2 s at 10 FPS
    tok = ByteTokenizer()
    for task, n in (("default", 2), ("temporal", 4), ("counting", 10), ("motion", 10)):
        conv = Conversation(
            (Turn("user", (Media("video", frames, fps=10.0, task=task), "?")), Turn("assistant", ("a",)))
        )
        assert len(encode_conversation(conv, tok).images) == n, task
    assert len(encode_conversation(Conversation((Turn("user", (Media("video", frames, fps=10.0), "?")),
                                                 Turn("assistant", ("a",)))), tok).images) == 2  # fmt: skip
    with pytest.raises(SampleError, match="task"):
        bad = Media("video", frames, fps=10.0, task="slow-motion")
        encode_conversation(Conversation((Turn("user", (bad,)), Turn("assistant", ("a",)))), tok)


@pytest.mark.parametrize("skill", list(TASKS))
def test_video_questions_reach_the_sampler_with_their_rate(skill):
    s = _samples(skill, 1)[0]
    media = s.parts[0]
    assert media.kind == "video" and media.task == TASKS[skill] and media.fps == VIDEO_FPS[TASKS[skill]]
    conv = Conversation((Turn("user", s.parts), Turn("assistant", (s.answer,))))
    enc = encode_conversation(conv, ByteTokenizer(), EncodeConfig())
    assert len(enc.images) == len(media.source)  # rendered at the sampler's rate: every frame kept
    text = ByteTokenizer().decode(enc.ids.tolist())
    stamps = [float(t) for t in re.findall(r"\[(\d+\.\d) second\]", text)]
    assert stamps[: len(media.source)] == pytest.approx([i / media.fps for i in range(len(media.source))])


def test_dataset_is_deterministic_and_mixes_as_stated():
    cfg = vst.VSTConfig(think_prob=0.5)
    a, b = vst.VSTDataset(3, cfg), vst.VSTDataset(3, cfg)
    for i in range(4):
        x, y = a[i], b[i]
        assert x.meta == y.meta and x.turns[1] == y.turns[1]
        media = [p.source for p in x.turns[0].parts if isinstance(p, Media)]
        assert all(
            np.array_equal(m, n)
            for m, n in zip(media, [p.source for p in y.turns[0].parts if isinstance(p, Media)], strict=True)
        )
        assert vst.reward(x.meta, x.turns[1].parts[0]) == 1.0
        assert x.meta["think"] == x.turns[1].parts[0].startswith(THINK)
    ahead = vst.VSTDataset(3, cfg, prefetch=2)
    for i in (0, 2, 4, 1):  # strided reads, then a jump back
        assert ahead[i].meta == a[i].meta and ahead[i].turns[1] == a[i].turns[1]
    ahead.close()
    mix = cfg.mix()
    assert sum(mix.values()) == pytest.approx(1.0)
    for scenario, weight in vst.DEFAULT_SCENARIOS:
        assert sum(w for k, w in mix.items() if vst.SKILLS[k] == scenario) == pytest.approx(weight)
    only = vst.VSTConfig(
        scenarios=(("multiview", 1.0), ("video", 3.0)), skills=(("mv_count", 1.0), ("vid_when", 1.0))
    )
    assert only.mix() == pytest.approx({"mv_count": 0.25, "vid_when": 0.75})
    counts = {k: 0 for k in vst.SKILLS}
    ds = vst.VSTDataset(0)
    for i in range(3000):
        counts[ds.skill(i)] += 1
    for k, share in ds.cfg.mix().items():
        assert counts[k] / 3000 == pytest.approx(share, abs=0.02), k
    for bad in ({"scenarios": (("audio", 1.0),)}, {"skills": (("jump", 1.0),)}, {"think_prob": 2.0},
                {"skills": (("mv_count", 0.0),)}):  # fmt: skip
        with pytest.raises(ValueError, match="VSTConfig"):
            vst.VSTConfig(**bad)


def test_reasoning_variant_behind_the_think_toggle():
    never, always = (
        vst.VSTDataset(1, vst.VSTConfig(think_prob=0.0)),
        vst.VSTDataset(1, vst.VSTConfig(think_prob=1.0)),
    )
    for i in range(3):
        plain, think = never[i].turns[1].parts[0], always[i].turns[1].parts[0]
        assert plain == never[i].meta["answer"] and think.endswith(END_THINK + plain)
        assert think.startswith(THINK) and len(think) > len(plain) + 15


def test_scores_per_skill_and_scenario_with_baselines():
    skills = ["closer", "distance", "mv_correspondence", "mv_count", "vid_order", "vid_when"]
    questions = vst_questions([5], 2, skills=skills)
    baseline = VSTBaseline.fit((q.kind, q.text, q.truth) for q in vst_questions([6], 4, skills=skills))
    records = [EvalRecord(q.kind, q.text, q.truth, q.truth, True, 1.0, q.image) for q in questions]
    scores = score_vst(records, baseline)
    assert list(scores) == [*skills, "single/all", "multiview/all", "video/all", "all"]
    assert scores["all"]["total"] == 12 and scores["video/all"]["total"] == 4
    assert scores["closer"]["baseline"] == 0.5 and scores["vid_order"]["baseline_rule"] == "chance 1/6"
    assert scores["mv_correspondence"]["metric"] == "IoU" and scores["distance"]["metric"] == "closeness"
    assert scores["distance"]["baseline_rule"].startswith("mean answer")
    assert all(0 <= scores[k]["baseline"] <= 1 and scores[k]["accuracy"] == 1 for k in skills)
    assert scores["mv_correspondence"]["baseline_score"] < 1


def test_heldout_on_a_checkpoint_from_the_command_line(tmp_path, monkeypatch, capsys):
    """python -m trainer.evaluate --data vst, on three skills with short clips to keep it quick."""
    from trainer.evaluate import main

    run_dir = make_run(tmp_path)
    skills, full = ["count", "mv_count", "vid_count"], VSTHeldOut.vst.__func__
    short = vst.VSTConfig(video=VideoConfig(duration=(2.0, 2.0)))
    small = lambda cls, *a, **k: full(cls, *a, **{**k, "skills": skills, "fit_per_skill": 2, "cfg": short})
    monkeypatch.setattr(VSTHeldOut, "vst", classmethod(small))
    assert main([str(run_dir), "--data", "vst", "--num", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"].startswith("vst") and np.isfinite(out["loss"])
    assert list(out["eval"]) == [*skills, "single/all", "multiview/all", "video/all", "all"]
    assert out["eval"]["video/all"]["total"] == 1 and out["eval"]["all"]["baseline_rule"] == "per skill"


def test_answers_batched_across_skills_equal_the_per_skill_ones(tmp_path, monkeypatch):
    """Mixed-skill batches keep each answer to its own budget: the same answers as trainer.evaluate's
    one batch per skill; a think budget lengthens the decoding by as many tokens."""
    import torch

    from trainer import evaluate
    from trainer.evaluate import MARGIN, HeldOut, load_checkpoint

    loaded = load_checkpoint(make_run(tmp_path), torch.device("cpu"))
    short = vst.VSTConfig(video=VideoConfig(duration=(2.0, 2.0)))
    skills = ["count", "ground2d", "mv_rotation", "vid_when"]
    held = VSTHeldOut.vst(
        loaded.tok, loaded.encode, seed=0, per_skill=2, fit_per_skill=1, cfg=short, skills=skills
    )
    cpu = torch.device("cpu")
    mixed = held.answer(loaded.model, cpu, batch=8)
    with monkeypatch.context() as m:  # trainer.evaluate's batching: one skill per batch
        m.setattr(held, "_batches", lambda batch: HeldOut._batches(held, batch))
        per_skill = held.answer(loaded.model, cpu)
    assert [r.answer for r in mixed] == [r.answer for r in per_skill]
    assert len({len(r.answer) for r in mixed}) > 1, "budgets differ by skill (the fresh model never stops)"
    caps, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: caps.append(a[2]) or real(*a, **k))
    held.think_tokens = 5
    held.answer(loaded.model, cpu, batch=8)
    assert caps == [MARGIN + 5 + max(len(loaded.tok.encode(q.truth)) for q in held.questions)]
