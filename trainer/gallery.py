"""The eval gallery: held-out questions drawn as a grid of their images, each with the question, the
model's answer and the truth, framed green when the answer is right and red when it is wrong.

One column per skill, headed by its accuracy over all of the given records; ``rows`` questions in
each, the skill's first ones (a held-out set is fixed, so the galleries of successive checkpoints
show the same scenes). A box answer (ground2d) is also drawn on its image: the truth dashed white,
the answer in the frame's colour.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .data.chat import SampleError, load_image
from .data.spatial import _NUM_RE
from .heldout import EvalRecord, skill_order

RIGHT, WRONG, TRUTH = "#1a9641", "#d7191c", "#555555"
TEXT_WIDTH = 30  # characters per line under a cell
CELL_WIDTH, CELL_HEIGHT, HEADER = 2.5, 3.5, 0.6  # inches


def write_gallery(
    records: Sequence[EvalRecord], png_path: str | Path, *, rows: int = 4, title: str | None = None
) -> Path:
    """Draw up to ``rows`` records of every skill into ``png_path``; returns the path."""
    if not records:
        raise ValueError("write_gallery: no records to draw")
    if rows < 1:
        raise ValueError(f"write_gallery: rows: expected >= 1, got {rows}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind: dict[str, list[EvalRecord]] = defaultdict(list)
    for r in records:
        by_kind[r.kind].append(r)
    kinds = sorted(by_kind, key=skill_order)
    shown = max(min(rows, len(rs)) for rs in by_kind.values())
    # Inches: each cell is a square image with 3 lines of question above and 4 of answers below.
    height = CELL_HEIGHT * shown + HEADER
    fig = plt.figure(figsize=(CELL_WIDTH * len(kinds), height))
    columns = fig.subfigures(1, len(kinds), squeeze=False)[0]
    for column, kind in zip(columns, kinds, strict=True):
        rs = by_kind[kind]
        right = sum(r.ok for r in rs)
        column.suptitle(f"{kind}\n{right}/{len(rs)} right", fontsize=10, fontweight="bold")
        axes = column.subplots(shown, 1, squeeze=False)[:, 0]
        column.subplots_adjust(
            left=0.06, right=0.94, top=1 - (HEADER + 0.45) / height, bottom=0.7 / height, hspace=0.62
        )
        for ax, record in zip(axes, rs[:shown] + [None] * (shown - len(rs[:shown])), strict=True):
            _cell(ax, record)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0, va="bottom", parse_math=False)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_path


def _cell(ax, record: EvalRecord | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if record is None:
        ax.set_axis_off()
        return
    color = RIGHT if record.ok else WRONG
    for spine in ax.spines.values():
        spine.set_color(color)
        spine.set_linewidth(4)
    ax.set_facecolor("#eeeeee")
    image = _image(record)
    if image is not None:
        ax.imshow(image)
        if record.kind == "ground2d":
            _box(ax, record.truth, image.shape, edgecolor="white", linestyle="--")
            _box(ax, record.answer, image.shape, edgecolor=color, linestyle="-")
        # A square view around the image: every cell has the same shape, whatever the image's.
        h, w = image.shape[:2]
        half = max(h, w) / 2
        ax.set_xlim(w / 2 - 0.5 - half, w / 2 - 0.5 + half)
        ax.set_ylim(h / 2 - 0.5 + half, h / 2 - 0.5 - half)
    else:
        ax.set_box_aspect(1)
    ax.set_title(_wrap(record.question, 3), fontsize=7, parse_math=False)
    ax.text(
        0.5, -0.04, _wrap(f"model: {record.answer or '(nothing)'}", 2), transform=ax.transAxes,
        ha="center", va="top", fontsize=7, color=color, fontweight="bold", parse_math=False,
    )  # fmt: skip
    ax.text(
        0.5, -0.26, _wrap(f"truth: {record.truth}", 2), transform=ax.transAxes,
        ha="center", va="top", fontsize=7, color=TRUTH, parse_math=False,
    )  # fmt: skip


def _image(record: EvalRecord):
    """The record's image as (H, W, 3) uint8, or None (no image, or one that no longer decodes)."""
    if record.image is None:
        return None
    try:
        return load_image(record.image)
    except SampleError:
        return None


def _box(ax, text: str, shape: tuple[int, ...], **style) -> None:
    """A <bbox>x1,y1,x2,y2</bbox> answer (coordinates in [0, 999]) as a rectangle on the image."""
    from matplotlib.patches import Rectangle

    values = [float(v) for v in _NUM_RE.findall(text)]
    if len(values) != 4:
        return
    h, w = shape[:2]
    x1, y1, x2, y2 = values[0] * w / 999, values[1] * h / 999, values[2] * w / 999, values[3] * h / 999
    # imshow puts pixel centres on integers, so pixel edges are at -0.5
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, linewidth=1.5, **style))


def _wrap(text: str, lines: int) -> str:
    """``text`` with its whitespace collapsed and control characters (an untrained model's bytes)
    shown as "·", wrapped, and cut to ``lines`` lines."""
    text = "".join(c if c.isprintable() else "·" for c in " ".join(text.split()))
    wrapped = textwrap.wrap(text, TEXT_WIDTH) or [""]
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], wrapped[lines - 1][: TEXT_WIDTH - 1] + "…"]
    return "\n".join(wrapped)
