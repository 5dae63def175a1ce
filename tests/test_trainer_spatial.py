"""The procedural spatial data: deterministic by (seed, index), and every answer agrees with the
scene, checked here with geometry written independently of the generator (pinhole projection of
the known 3D layout) and with the renderer as a black box (what changes when an object is removed).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest

from trainer.data.chat import EncodeConfig, encode_conversation
from trainer.data.manifest import ManifestDataset
from trainer.data.render import render
from trainer.data.spatial import (
    CURRICULUM,
    KINDS,
    PLURAL,
    SpatialConfig,
    SpatialDataset,
    check_answer,
    describe,
    export_spatial,
    training_config,
)
from trainer.data.tokenizer import ByteTokenizer

N_PER_KIND = 12


def _single(kind: str, seed: int = 3) -> SpatialDataset:
    return SpatialDataset(seed, SpatialConfig(mix=((kind, 1.0),)))


def _cam_coords(scene, obj) -> np.ndarray:
    """Camera coordinates (x right, y down, z forward) of the object's centre, from first principles."""
    cam = scene.camera
    p = np.array([obj.x, obj.height / 2 - cam.elevation, obj.z])  # relative to the camera
    s, c = math.sin(cam.pitch), math.cos(cam.pitch)
    return np.array([p[0], -c * p[1] - s * p[2], -s * p[1] + c * p[2]])


def _contact_row(cam, obj) -> float:
    """Image row where the object meets the ground: pinhole projection of (x, 0, z)."""
    s, c = math.sin(cam.pitch), math.cos(cam.pitch)
    y, z = -cam.elevation, obj.z
    return cam.height / 2 + cam.focal * (-c * y - s * z) / (-s * y + c * z)


def _named(scene, text: str) -> int:
    names = [o.name for o in scene.objects]
    return names.index(text)


def _samples(kind: str):
    ds = _single(kind)
    out = [ds.sample(i) for i in range(N_PER_KIND)]
    return [s for s in out if s[1] == kind]


def test_deterministic_by_seed_and_index():
    a, b = SpatialDataset(7), SpatialDataset(7)
    for i in (0, 5, 123):
        ca, cb = a[i], b[i]
        assert ca.meta == cb.meta
        assert ca.turns[1] == cb.turns[1]
        np.testing.assert_array_equal(ca.turns[0].parts[0].source, cb.turns[0].parts[0].source)
    assert a[1].meta != SpatialDataset(8)[1].meta or not np.array_equal(
        a[1].turns[0].parts[0].source, SpatialDataset(8)[1].turns[0].parts[0].source
    )


def test_images_and_chat_format():
    ds = SpatialDataset(0)
    for i in range(10):
        conv = ds[i]
        image, question = conv.turns[0].parts
        h, w, c = image.source.shape
        assert image.kind == "image" and image.source.dtype == np.uint8 and c == 3
        assert h in SpatialConfig().sizes and w in SpatialConfig().sizes
        assert conv.turns[0].role == "user" and conv.turns[1].role == "assistant"
        assert question.endswith(("?", "."))
        assert conv.turns[1].parts[0] == conv.meta["answer"]
        enc = encode_conversation(conv, ByteTokenizer())
        assert (enc.ids == ByteTokenizer().image_token_id).sum() == h * w // (28 * 28)


def test_every_kind_is_generated():
    ds = SpatialDataset(0, SpatialConfig(mix=tuple((k, 1.0) for k in KINDS)))
    assert {ds[i].meta["kind"] for i in range(60)} == set(KINDS)


def test_count_answers():
    samples = _samples("count")
    assert samples
    for scene, _, question, answer, _ in samples:
        # Every object is visible in the rendered id buffer.
        assert set(np.unique(scene.ids)) - {-1} == set(range(len(scene.objects)))
        m = re.fullmatch(r"How many (\w+) are there\?", question)
        shapes = [o.shape for o in scene.objects]
        want = len(shapes) if m[1] == "objects" else sum(PLURAL[s] == m[1] for s in shapes)
        assert answer == str(want)


def test_closer_answers_match_the_image():
    samples = _samples("closer")
    assert samples
    for scene, _, question, answer, _ in samples:
        a, b = re.fullmatch(r"Which is closer to the camera, the (.+) or the (.+)\?", question).groups()
        ia, ib = _named(scene, a), _named(scene, b)
        za, zb = _cam_coords(scene, scene.objects[ia])[2], _cam_coords(scene, scene.objects[ib])[2]
        assert max(za, zb) >= 1.2 * min(za, zb), "pairs differ by more than 20% in depth"
        assert answer == (a if za < zb else b).split()[0]  # the nearer object's colour
        # In the image: the nearer object touches the ground lower down (pitched-down camera).
        rows = {k: _contact_row(scene.camera, scene.objects[k]) for k in (ia, ib)}
        near, far = (ia, ib) if za < zb else (ib, ia)
        assert rows[near] > rows[far]


def test_relation_depth_and_3d_answers():
    for kind in ("relation", "depth", "ground3d", "depth_order"):
        samples = _samples(kind)
        assert samples, kind
        for scene, _, question, answer, _ in samples:
            if kind == "relation":
                a, side, b = re.fullmatch(r"Is the (.+) to the (left|right) of the (.+)\?", question).groups()
                xa = _cam_coords(scene, scene.objects[_named(scene, a)])[0]
                xb = _cam_coords(scene, scene.objects[_named(scene, b)])[0]
                assert abs(xa - xb) >= 0.3
                assert answer == ("yes" if (xa < xb) == (side == "left") else "no")
            elif kind == "depth":
                name = re.fullmatch(r"What is the depth of the (.+) in meters\?", question)[1]
                z = _cam_coords(scene, scene.objects[_named(scene, name)])[2]
                assert abs(float(answer) - z) <= 0.051
            elif kind == "ground3d":
                name = re.fullmatch(
                    r"Where is the center of the (.+) in camera coordinates, in meters\?", question
                )[1]
                want = _cam_coords(scene, scene.objects[_named(scene, name)])
                got = np.array([float(v) for v in re.findall(r"-?\d+\.\d", answer)])
                np.testing.assert_allclose(got, want, atol=0.051)
            else:
                names = re.findall(r"the ([a-z]+ [a-z]+)", question)
                depth = {n: _cam_coords(scene, scene.objects[_named(scene, n)])[2] for n in names}
                assert answer == ", ".join(n.split()[0] for n in sorted(names, key=depth.get))


def test_boxes_match_what_the_object_changes_in_the_image():
    samples = _samples("ground2d")
    assert samples
    for scene, _, question, answer, _ in samples:
        name = re.fullmatch(r"Give the bounding box of the (.+)\.", question)[1]
        k = _named(scene, name)
        without = tuple(o for i, o in enumerate(scene.objects) if i != k)
        ss = 2
        _, ids_without, _ = render(scene.camera, without, ss)
        # Pixels (supersampled) where removing the object changes what is seen: its visible pixels.
        remap = np.array([i for i in range(len(scene.objects)) if i != k] + [-1])
        changed = scene.ids != remap[ids_without]
        rows, cols = np.nonzero(changed)
        h, w = changed.shape
        want = [
            cols.min() / w * 999,
            rows.min() / h * 999,
            (cols.max() + 1) / w * 999,
            (rows.max() + 1) / h * 999,
        ]
        got = [int(v) for v in re.fullmatch(r"<bbox>(\d+),(\d+),(\d+),(\d+)</bbox>", answer).groups()]
        assert all(0 <= v <= 999 for v in got) and got[0] < got[2] and got[1] < got[3]
        np.testing.assert_allclose(got, want, atol=1.0)


def test_check_answer():
    assert check_answer("count", " 3. ", "3")
    assert not check_answer("count", "4", "3")
    assert check_answer("closer", "<think>red: 3 m; blue: 5 m</think>Red", "red")
    assert check_answer("ground2d", "<bbox>100,100,200,200</bbox>", "<bbox>110,100,210,200</bbox>")
    assert not check_answer("ground2d", "<bbox>100,100,200,200</bbox>", "<bbox>300,300,400,400</bbox>")
    assert not check_answer("ground2d", "a box", "<bbox>300,300,400,400</bbox>")
    assert check_answer("depth", "4.3", "4.0") and not check_answer("depth", "4.5", "4.0")
    assert check_answer("ground3d", "(0.1, 0.5, 4.1)", "(0.0, 0.5, 4.0)")
    assert not check_answer("ground3d", "(0.1, 0.5)", "(0.0, 0.5, 4.0)")
    ds = SpatialDataset(1)
    for i in range(30):
        meta = ds[i].meta
        assert check_answer(meta["kind"], meta["answer"], meta["answer"])


def test_think_rationale_is_optional():
    ds = SpatialDataset(0, SpatialConfig(mix=(("closer", 1.0),), think_prob=1.0))
    conv = next(c for c in (ds[i] for i in range(20)) if c.meta["kind"] == "closer")
    reply = conv.turns[1].parts[0]
    assert reply.startswith("<think>") and reply.endswith("</think>" + conv.meta["answer"])


def test_export_round_trip(tmp_path):
    manifest = export_spatial(tmp_path, 6, seed=4)
    loaded = ManifestDataset(manifest)
    ds, tok, cfg = SpatialDataset(4), ByteTokenizer(), EncodeConfig()
    assert loaded.num_samples == 6
    for i in range(6):
        a, b = encode_conversation(ds[i], tok, cfg), encode_conversation(loaded[i], tok, cfg)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.levels, b.levels)
        for pa, pb in zip(a.images, b.images, strict=True):
            assert pa.grid_hw == pb.grid_hw
            assert bool((pa.patches == pb.patches).all()), "PNG export must be lossless"
        assert loaded[i].meta["kind"] == ds[i].meta["kind"]


def test_bad_config():
    with pytest.raises(ValueError, match="unknown kinds"):
        SpatialConfig(mix=(("colour", 1.0),))
    with pytest.raises(ValueError, match="questions"):
        SpatialConfig(questions=0)


def test_several_questions_and_the_caption_per_scene():
    one, many = SpatialDataset(5), SpatialDataset(5, SpatialConfig(questions=4, caption=True))
    tok, enc = ByteTokenizer(), EncodeConfig()
    asked = 0
    for i in range(12):
        a, b = one[i], many[i]
        # The first question is the one-question sample's; the image is sent once, in the first turn.
        np.testing.assert_array_equal(b.turns[0].parts[0].source, a.turns[0].parts[0].source)
        assert b.turns[0].parts[1:] == a.turns[0].parts[1:] and b.turns[1] == a.turns[1]
        assert [t.role for t in b.turns] == ["user", "assistant"] * (len(b.turns) // 2)
        assert all(isinstance(p, str) for t in b.turns[1:] for p in t.parts)
        assert len(encode_conversation(b, tok, enc).images) == 1
        scene = one.sample(i)[0]
        questions = [t.parts[-1] for t in b.turns[0:-2:2]]
        assert len(set(questions)) == len(questions) <= 4
        asked += len(questions)
        # Later turns answer their own question about the same scene.
        for q in b.meta.get("asked", [])[1:]:
            reply = b.turns[2 * questions.index(q["question"]) + 1].parts[0]
            assert reply == q["answer"]
            if q["kind"] == "depth":
                name = re.search(r"of the (\w+ \w+) in", q["question"]).group(1)
                assert float(reply) == pytest.approx(scene.depth(_named(scene, name)), abs=0.051)
            if q["kind"] == "count" and "objects" in q["question"]:
                assert int(reply) == len(scene.objects)
        assert b.turns[-2].parts == ("Describe the scene.",)
        assert b.turns[-1].parts == (describe(scene),)
    assert asked > 3 * 12  # a scene runs out of distinct questions only rarely


def test_caption_matches_the_scene():
    scene = SpatialDataset(2).sample(0)[0]
    text = describe(scene)
    near, left = text.removeprefix("Near to far: ").split(". Left to right: ")
    depths = [float(m) for m in re.findall(r"(\d+\.\d) m", near)]
    assert depths == sorted(depths) and len(depths) == len(scene.objects)
    xs = {o.color: _cam_coords(scene, o)[0] for o in scene.objects}
    colours = left.rstrip(".").split(", ")
    assert [xs[c] for c in colours] == sorted(xs.values())


def test_training_config_options():
    assert training_config("") == SpatialConfig(curriculum=CURRICULUM)
    assert training_config("curriculum=0") == SpatialConfig()
    cfg = training_config("questions=3,caption=1,think_prob=0.5")
    assert (cfg.questions, cfg.caption, cfg.think_prob) == (3, True, 0.5)
    assert training_config("caption=0").caption is False
    with pytest.raises(ValueError, match=r"'colour=1'.*caption"):
        training_config("colour=1")
    with pytest.raises(ValueError, match="'questions=x'"):
        training_config("questions=x")
    from trainer.components import _source
    from trainer.data.chat import SkipLog

    src = _source("spatial:questions=2", 0, SkipLog())
    assert src.cfg.questions == 2 and len(src[0].turns) in (2, 4)


def test_export_several_questions(tmp_path):
    cfg = SpatialConfig(questions=3, caption=True)
    loaded = ManifestDataset(export_spatial(tmp_path, 3, seed=4, cfg=cfg))
    ds, tok, enc = SpatialDataset(4, cfg), ByteTokenizer(), EncodeConfig()
    for i in range(3):
        a, b = encode_conversation(ds[i], tok, enc), encode_conversation(loaded[i], tok, enc)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.levels, b.levels)
        assert "answer" not in loaded[i].meta  # no single answer to score a held-out split against


def test_curriculum_phases():
    """Sample i draws its skill from the phase holding i; the scenes do not depend on the mix."""
    cfg = SpatialConfig(curriculum=((0, (("closer", 1.0),)), (5, (("depth", 1.0),))))
    ds, flat = SpatialDataset(3, cfg), SpatialDataset(3)
    kinds = [ds.sample(i)[1] for i in range(10)]
    # A scene without a closer (depth-separated) pair falls back to counting, as with any mix.
    assert set(kinds[:5]) <= {"closer", "count"} and "closer" in kinds[:5]
    assert kinds[5:] == ["depth"] * 5
    for i in (0, 7):
        assert [o.color for o in ds.sample(i)[0].objects] == [o.color for o in flat.sample(i)[0].objects]
    # Later questions about a scene follow the phase too.
    more = SpatialDataset(3, replace(cfg, questions=3))[6].meta["asked"]
    assert {q["kind"] for q in more} == {"depth"}


@pytest.mark.parametrize(
    "curriculum, match",
    [
        (((1, (("closer", 1.0),)),), "starting at 0"),
        (((0, (("closer", 1.0),)), (0, (("depth", 1.0),))), "increasing"),
        (((0, (("closer", 1.0),)), (4, (("colour", 1.0),))), r"curriculum\[1\]: unknown kinds \['colour'\]"),
        (((0, (("closer", 0.0),)),), r"curriculum\[0\]: expected weights"),
    ],
)
def test_curriculum_rejects(curriculum, match):
    with pytest.raises(ValueError, match=match):
        SpatialConfig(curriculum=curriculum)
