"""Users' own data: a JSONL manifest of conversations with image and video paths.

One JSON object per line, in either of the two common layouts:

    {"images": ["a.jpg"], "messages": [{"role": "user", "content": "<image>What is this?"},
                                        {"role": "assistant", "content": "A cat."}]}
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                          {"from": "gpt", "value": "A cat."}]}

- Turns: ``messages`` (role/content: system, user, assistant) or ``conversations`` (from/value:
  system, human, gpt). Content is a string or a list of parts ``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": path}``, ``{"type": "video", "video": path, "fps": 2}``.
- Media listed at the top (``images``/``image``, ``videos``/``video``; an entry may be a path or
  ``{"path": ..., "fps": ...}``) fill the ``<image>`` / ``<video>`` placeholders (and ``{"type":
  "image"}`` parts without a path) in order; with no placeholder at all they go before the first
  user text (LLaVA's convention).
- Paths are relative to the manifest's directory unless absolute (or ``media_root``). Videos are
  directories of frame images, .npy or .npz arrays of (N, H, W, 3) uint8 frames; ``fps`` is their
  frame rate (default 1).

Checks at load time (the whole file is read once): malformed JSON, missing turns, unknown roles,
empty conversations, no assistant text, placeholder/media count mismatches and missing media files
are reported with the file, line and cause, and the line is skipped. Corrupt media and over-long
samples are found when a sample is encoded (trainer.data.stream) and skipped the same way. A
manifest with no usable line is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .chat import ROLES, Conversation, Media, SampleError, SkipLog, Turn

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
_PLACEHOLDER = re.compile(r"(<image>|<video>)")


class ManifestDataset:
    """The usable conversations of a JSONL manifest; ``ds[i]`` is one :class:`Conversation`."""

    def __init__(
        self, path: str | Path, *, media_root: str | Path | None = None, skips: SkipLog | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {str(self.path)!r} not found")
        self.root = Path(media_root) if media_root is not None else self.path.parent
        self.skips = skips if skips is not None else SkipLog()
        self.records: list[Conversation] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path.name}:{lineno}"
                try:
                    self.records.append(parse_record(_json(line), self.root, where))
                except SampleError as err:
                    self.skips.skip(err.cause, f"{where}: {err}")
        if not self.records:
            raise ValueError(
                f"manifest {str(self.path)!r}: no usable sample ({self.skips.total} skipped; see the log)"
            )

    @property
    def name(self) -> str:
        return f"manifest({self.path})"

    @property
    def num_samples(self) -> int:
        return len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Conversation:
        return self.records[index]


def _json(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise SampleError(f"malformed JSON: {err}", "invalid record") from None
    if not isinstance(obj, dict):
        raise SampleError(f"expected a JSON object, got {type(obj).__name__}", "invalid record")
    return obj


def _media_list(obj: dict, kind: str, root: Path) -> list[Media]:
    raw = obj.get(f"{kind}s", obj.get(kind))
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    return [_media(kind, item, root, obj.get("fps", 1.0)) for item in items]


def _media(kind: str, item: object, root: Path, fps: float = 1.0) -> Media:
    if isinstance(item, dict):
        fps = float(item.get("fps", fps))
        item = item.get("path", item.get(kind))
    if not isinstance(item, str) or not item:
        raise SampleError(f"{kind} entry: expected a path, got {item!r}", "invalid record")
    path = Path(item) if Path(item).is_absolute() else root / item
    if not path.exists():
        raise SampleError(f"{kind} {item!r} not found (looked for {path})", "missing media")
    return Media(kind, str(path), fps)


def parse_record(obj: dict, root: Path, where: str = "") -> Conversation:
    """One manifest object -> Conversation; SampleError names what is wrong."""
    raw_turns = obj.get("messages", obj.get("conversations"))
    if raw_turns is None:
        raise SampleError("no 'messages' or 'conversations' field", "invalid record")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise SampleError("empty conversation", "empty conversation")
    pending = {"image": _media_list(obj, "image", root), "video": _media_list(obj, "video", root)}
    listed = {k: len(v) for k, v in pending.items()}
    used = {"image": 0, "video": 0}

    def take(kind: str) -> Media:
        if used[kind] >= len(pending[kind]):
            raise SampleError(
                f"more <{kind}> placeholders than {kind}s listed ({listed[kind]})", "invalid record"
            )
        used[kind] += 1
        return pending[kind][used[kind] - 1]

    turns: list[Turn] = []
    for t in raw_turns:
        if not isinstance(t, dict):
            raise SampleError(f"turn: expected an object, got {type(t).__name__}", "invalid record")
        role = t.get("role", t.get("from"))
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise SampleError(
                f"unknown role {role!r} (expected one of {ROLES} or human/gpt)", "invalid record"
            )
        content = t.get("content", t.get("value"))
        parts: list[str | Media] = []
        if isinstance(content, str):
            for piece in _PLACEHOLDER.split(content):
                if piece in ("<image>", "<video>"):
                    parts.append(take(piece[1:-1]))
                elif piece:
                    parts.append(piece)
        elif isinstance(content, list):
            for part in content:
                parts.append(_part(part, root, take))
        else:
            raise SampleError(f"{role} turn: content must be a string or a list of parts", "invalid record")
        turns.append(Turn(role, tuple(parts)))

    unused = {k: len(v) - used[k] for k, v in pending.items() if len(v) > used[k]}
    if unused:
        if any(used.values()):
            counts = ", ".join(f"{listed[k]} {k}s listed, {used[k]} placeholders" for k in unused)
            raise SampleError(f"media/placeholder mismatch: {counts}", "invalid record")
        first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
        if first_user is None:
            raise SampleError("media listed but there is no user turn to put them in", "invalid record")
        media = tuple(pending["image"] + pending["video"])
        turns[first_user] = Turn("user", media + turns[first_user].parts)
    if not any(
        t.role == "assistant" and any(isinstance(p, str) and p.strip() for p in t.parts) for t in turns
    ):
        raise SampleError("no assistant text to learn from", "empty conversation")
    sample_id = str(obj.get("id", where))
    return Conversation(tuple(turns), sample_id=sample_id, meta=dict(obj.get("meta", {})))


def _part(part: object, root: Path, take) -> str | Media:
    if not isinstance(part, dict) or "type" not in part:
        raise SampleError(f"content part: expected an object with a 'type', got {part!r}", "invalid record")
    kind = part["type"]
    if kind == "text":
        return str(part.get("text", ""))
    if kind in ("image", "video"):
        ref = part.get(kind) or part.get("path")
        if ref is None:
            return take(kind)
        return _media(kind, {"path": ref, "fps": part.get("fps", 1.0)}, root)
    raise SampleError(
        f"content part: unknown type {kind!r} (expected text, image or video)", "invalid record"
    )
