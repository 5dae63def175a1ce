"""Linear probes on the visual tokens of a pre-trained SeedViT and of a random one (issue 20).

For each object of held-out-style scenes, take the 2x2-pooled ViT token (what the adapter pools
and the LLM reads) that holds the object's visible centre, and fit ridge probes for its depth,
image row, image column and visible size, and for its colour. The probes train on 400 scenes and
are tested on 100 others. The two towers see the same patches: the tiny preset's ViT at its
random init (seed 0), and the same tower loaded from a `--recipe vit` run.

    python profiles/vit_feature_probe.py runs/vit-seedvl-tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import PRESETS
from model.preprocess import patchify
from model.vit import SeedViT
from trainer.data.render import COLORS
from trainer.data.spatial import sample_scene
from trainer.vit_pretrain.export import load_pretrained_vit

SIDE, GRID = 112, 4  # the embedded data's image side and its grid of visual tokens


def tower(run: str | None) -> SeedViT:
    torch.manual_seed(0)
    vit = SeedViT(PRESETS["seedvl-tiny"].vit).eval()
    if run is not None:
        load_pretrained_vit(run, vit)
    return vit


def features(towers: dict[str, SeedViT], scenes: int):
    """Per object: each tower's token feature, and (depth, row, column, size, colour index, scene)."""
    colors = list(COLORS)
    feats: dict[str, list[np.ndarray]] = {k: [] for k in towers}
    rows = []
    n = (SIDE // 14) ** 2
    for i in range(scenes):
        scene = sample_scene(np.random.default_rng([5, i]))
        p = patchify(scene.image, size=(SIDE, SIDE))
        with torch.no_grad():
            tokens = {
                k: v(p.patches, p.pos_hw, torch.tensor([0, n], dtype=torch.int32), n)
                .reshape(n // 4, 4, -1)
                .mean(1)
                .numpy()
                for k, v in towers.items()
            }
        h, w = scene.ids.shape
        for j, obj in enumerate(scene.objects):
            r, c = np.nonzero(scene.ids == j)
            row, col = r.mean() / h, c.mean() / w
            token = int(row * GRID) * GRID + int(col * GRID)
            for k in towers:
                feats[k].append(tokens[k][token])
            rows.append((scene.depth(j), row, col, np.sqrt(len(r)) / h, colors.index(obj.color), i))
    return {k: np.array(v) for k, v in feats.items()}, np.array(rows)


def ridge(x: np.ndarray, y: np.ndarray, train: np.ndarray, lam: float = 0.1) -> np.ndarray:
    xb = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(xb[train].T @ xb[train] + lam * np.eye(xb.shape[1]), xb[train].T @ y[train])
    return xb[~train] @ w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vit_run", help="a --recipe vit run directory (or its seedvit/ directory)")
    ap.add_argument("--scenes", type=int, default=500, help="scenes; the last fifth are the test set")
    args = ap.parse_args()
    torch.set_num_threads(1)
    feats, y = features({"pre-trained": tower(args.vit_run), "random": tower(None)}, args.scenes)
    train = y[:, 5] < 0.8 * args.scenes
    print(f"{(~train).sum()} test objects")
    for name, x in feats.items():
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        r2 = []
        for t in range(4):
            pred, truth = ridge(x, y[:, t], train), y[~train, t]
            r2.append(1 - ((pred - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())
        onehot = np.eye(len(COLORS))[y[:, 4].astype(int)]
        colour = (ridge(x, onehot, train).argmax(1) == y[~train, 4]).mean()
        raw = feats[name]
        print(
            f"{name:12s} R2 depth {r2[0]:.2f} row {r2[1]:.2f} column {r2[2]:.2f} size {r2[3]:.2f}; "
            f"colour accuracy {colour:.2f}; feature RMS {np.sqrt((raw**2).mean()):.2f}, "
            f"mean-vector norm {np.linalg.norm(raw.mean(0)):.2f}"
        )


if __name__ == "__main__":
    main()
