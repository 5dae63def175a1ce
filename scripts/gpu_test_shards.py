"""Split the GPU tests into shards for parallel pytest processes: ``gpu_test_shards.py N DIR [args]``.

Collects ``pytest -m gpu tests/ [args]`` and writes DIR/shard<i>.txt, one node id a line. A test
function's cases stay in one shard (they share kernels, so each Triton compile happens once); the
functions are dealt largest first to the shard with the fewest tests so far.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def shard(node_ids: list[str], n: int) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for node in node_ids:
        groups.setdefault(node.split("[", 1)[0], []).append(node)
    shards: list[list[str]] = [[] for _ in range(n)]
    for members in sorted(groups.values(), key=len, reverse=True):
        min(shards, key=len).extend(members)
    return shards


def main(argv: list[str]) -> int:
    n, out = int(argv[0]), Path(argv[1])
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"]
    run = subprocess.run([*cmd, "tests/", *argv[2:]], capture_output=True, text=True)
    ids = [line for line in run.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if not ids:
        print(run.stdout[-2000:] + run.stderr[-2000:])
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for i, members in enumerate(shard(ids, n)):
        (out / f"shard{i}.txt").write_text("".join(f"{m}\n" for m in members))
    print(f"{len(ids)} GPU tests in {n} shards: " + " ".join(str(len(s)) for s in shard(ids, n)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
