"""The JSONL manifest loader: both common layouts, content parts, videos, and bad data -- a missing
image, a corrupt image file, an empty conversation, an over-long sample and malformed lines -- each
reported with its line and cause and skipped, never a crash of the stream."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from trainer.data.chat import LEVEL_PROMPT, EncodeConfig, Media, SkipLog, encode_conversation
from trainer.data.manifest import ManifestDataset
from trainer.data.stream import BatchStream, Position
from trainer.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _image(path, size=(56, 84), value=0):
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _write(tmp_path, records) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


GOOD = [
    {"id": "msgs", "images": ["a.png"], "messages": [_user("<image>How many?"), _bot("2")]},
    {
        "id": "llava",
        "image": "b.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Cubes."}],
    },
    {
        "id": "parts",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Which?"}],
            },
            _bot("Left."),
        ],
    },
    {
        "id": "video",
        "videos": [{"path": "clip", "fps": 2}],
        "messages": [_user("<video>What moves?"), _bot("A ball.")],
    },
    {"id": "prepend", "images": ["a.png", "b.png"], "messages": [_user("Compare."), _bot("Same.")]},
    {"id": "npyvideo", "video": "clip.npy", "fps": 1, "messages": [_user("<video>Count."), _bot("3")]},
]
BAD_AT_LOAD = [
    (
        {"images": ["missing.png"], "messages": [_user("<image>Hi"), _bot("Hey")]},
        "missing media",
        "not found",
    ),
    ({"messages": []}, "empty conversation", "empty conversation"),
    ({"messages": [_user("Anyone?")]}, "empty conversation", "no assistant text"),
    ('{"messages": [', "invalid record", "malformed JSON"),
    (
        {"images": ["a.png"], "messages": [_user("<image><image>Two?"), _bot("No")]},
        "invalid record",
        "placeholders",
    ),
    ({"messages": [{"role": "robot", "content": "beep"}, _bot("ok")]}, "invalid record", "unknown role"),
]
LONG = {"id": "long", "messages": [_user("Tell me."), _bot("word " * 400)]}
CORRUPT = {"id": "corrupt", "images": ["corrupt.png"], "messages": [_user("<image>What?"), _bot("Noise.")]}


@pytest.fixture
def data_dir(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", (84, 56), 1)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (tmp_path / "clip").mkdir()
    for i in range(4):
        _image(tmp_path / "clip" / f"{i:03d}.png", (56, 56), 10 + i)
    np.save(tmp_path / "clip.npy", np.random.default_rng(0).integers(0, 256, (3, 28, 56, 3), dtype=np.uint8))
    return tmp_path


def test_layouts(data_dir):
    ds = ManifestDataset(_write(data_dir, GOOD))
    assert [c.sample_id for c in ds.records] == [r["id"] for r in GOOD]
    by_id = {c.sample_id: c for c in ds.records}
    msgs = by_id["msgs"]
    assert [t.role for t in msgs.turns] == ["user", "assistant"]
    assert isinstance(msgs.turns[0].parts[0], Media) and msgs.turns[0].parts[1] == "How many?"
    assert by_id["llava"].turns[0].parts[1] == "\nWhat?" and by_id["llava"].turns[1].parts == ("Cubes.",)
    assert [t.role for t in by_id["parts"].turns] == ["system", "user", "assistant"]
    prepended = by_id["prepend"].turns[0].parts
    assert [type(p) for p in prepended] == [Media, Media, str]
    for conv in ds.records:
        enc = encode_conversation(conv, TOK)
        placeholders = int((enc.ids == TOK.image_token_id).sum())
        assert placeholders * 4 == enc.num_patches > 0
    video = encode_conversation(by_id["video"], TOK)
    text = TOK.decode(video.ids.tolist())
    # 4 frames at 2 fps = 2 s, sampled at 1 fps: frames at 0 s and 1 s, each after its timestamp.
    assert text.count("<|time_start|>[0.0 second]<|time_end|><|vision_start|>") == 1
    assert "[1.0 second]" in text and len(video.images) == 2
    assert len(encode_conversation(by_id["npyvideo"], TOK).images) == 3


def test_bad_lines_are_reported_and_skipped(data_dir, caplog):
    records = GOOD[:2] + [r for r, _, _ in BAD_AT_LOAD] + [CORRUPT, LONG]
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        ds = ManifestDataset(_write(data_dir, records))
    assert ds.num_samples == 4  # the corrupt image and the long sample only fail when encoded
    for k, (_, _, message) in enumerate(BAD_AT_LOAD):
        line = f"data.jsonl:{3 + k}:"
        assert any(line in m and message in m for m in caplog.messages), (
            f"{line} {message}: {caplog.messages}"
        )
    assert ds.skips.counts == Counter(cause for _, cause, _ in BAD_AT_LOAD)

    # The stream encodes the rest: the corrupt file and the over-long sample are skipped too.
    caplog.clear()
    stream = BatchStream(ds, TOK, seed=0, window=4, skips=ds.skips, encode=EncodeConfig())
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        it = stream.batches(Position(), 512, min_level=LEVEL_PROMPT)
        seen = set()
        for _ in range(3):
            batch, _ = next(it)
            seen.update(batch.sample_ids)
    assert seen == {"msgs", "llava"}
    assert ds.skips.counts["corrupt media"] >= 1 and ds.skips.counts["too long"] >= 1
    assert any("corrupt" in m and "cannot decode image" in m for m in caplog.messages)
    assert any("long" in m and "exceed the step's token budget of 512" in m for m in caplog.messages)


def test_unusable_manifest_is_an_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="no usable sample"):
        ManifestDataset(_write(data_dir, [r for r, _, _ in BAD_AT_LOAD]))
    with pytest.raises(FileNotFoundError, match="not found"):
        ManifestDataset(tmp_path / "nope.jsonl")


def test_stream_of_only_bad_samples_stops_with_a_message(data_dir):
    ds = ManifestDataset(_write(data_dir, [CORRUPT, LONG]))
    stream = BatchStream(ds, TOK, seed=0, window=2, skips=SkipLog())
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(stream.batches(Position(), 512, min_level=LEVEL_PROMPT))
