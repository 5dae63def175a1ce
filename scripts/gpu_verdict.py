"""The compact verdict of a GPU pass: ``python scripts/gpu_verdict.py OUT_DIR``.

Reads what scripts/gpu_pass.sh left in OUT_DIR, whatever stage it reached:
  stages.tsv        one line per stage: name, budget (s), seconds used, exit status (124: timed out)
  selfcheck.jsonl   one line per (op, impl) from ``python -m seedvl_kernels.selfcheck --jsonl``
  tests/*.log       the GPU test shards' pytest logs (their last summary line is counted)
  bench.jsonl       one line per benchmark row (bench/harness.py, $SEEDVL_BENCH_JSONL)
and prints, in a few dozen lines (the device tool returns only the last 12,000 characters), one line
per op and implementation: correct at real sizes in bf16?, rows measured, the best TFLOP/s or GB/s
and its % of the measured peak, and the ratio to the strongest peer timed for the same case
(peer time / time, above 1: faster), as a geometric mean over the rows and at the worst row.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

_SUMMARY = re.compile(r"=+ (.*\d+ (?:passed|failed|error|errors|skipped|deselected).*?) in [\d.]+s")
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")


def read_jsonl(path: Path) -> list[dict]:
    """Every complete line of ``path`` (a line cut off by a kill is dropped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def op_label(row: dict) -> str:
    """The op a benchmark row measures, named as in seedvl_kernels (bench_moe.py holds two)."""
    if row["op"] == "moe":
        return "grouped_gemm" if "gemm" in row["case"] else "moe_ffn"
    return row["op"]


def strongest_peer(row: dict) -> tuple[str, float] | None:
    """(name, ratio) of the fastest peer timed for this row's case, other than the row itself."""
    timed = [
        (t, name)
        for name, t in row.get("peer_time_ms", {}).items()
        if t is not None and name != row["impl"] and row["ratio_to_peer"].get(name) is not None
    ]
    if not timed:
        return None
    _, name = min(timed)
    return name, row["ratio_to_peer"][name]


def _case(row: dict) -> str:
    return " ".join(str(v) for v in row["case"].values())


def bench_summary(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (op, impl): rows measured, the best row's throughput and % of peak, peer ratios."""
    peers_of = {row["op"]: set(row.get("peer_time_ms", {})) for row in rows}
    out: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["impl"] in peers_of[row["op"]]:  # a peer's own row: its speed is in the others' ratios
            continue
        s = out.setdefault((op_label(row), row["impl"]), {"rows": 0, "best": None, "ratios": []})
        s["rows"] += 1
        bw = row.get("tflops") is None and row.get("gbps") is not None
        value = row["gbps"] if bw else row.get("tflops")
        pct = row.get("pct_of_copy_bw") if bw else row.get("pct_of_matmul_peak")
        if value is not None and (s["best"] is None or value > s["best"][0]):
            s["best"] = (value, "GB/s" if bw else "TFLOP/s", pct, _case(row))
        peer = strongest_peer(row)
        if peer is not None:
            s["ratios"].append((peer[1], peer[0], _case(row)))
    return out


def test_summary(out_dir: Path) -> str | None:
    counts: dict[str, int] = {}
    logs = sorted((out_dir / "tests").glob("*.log"))
    unfinished = []
    failed = []
    for log in logs:
        text = log.read_text(errors="replace")
        found = _SUMMARY.findall(text)
        if found:
            pairs = [
                (int(n), "errors" if w.startswith("error") else w) for n, w in _COUNTS.findall(found[-1])
            ]
        else:  # killed at its timeout: count the tests its verbose log shows as finished
            unfinished.append(log.stem)
            done = re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)", text)
            pairs = [(done.count(w), w.lower()) for w in ("PASSED", "FAILED", "SKIPPED") if w in done]
        for n, what in pairs:
            counts[what] = counts.get(what, 0) + n
        failed += re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M) or re.findall(
            r"^(\S+::\S+) (?:FAILED|ERROR)", text, flags=re.M
        )
    if not logs:
        return None
    line = ", ".join(f"{n} {what}" for what, n in counts.items()) or "no summary"
    line = f"tests: {line} ({len(logs)} shards"
    line += f"; cut off: {', '.join(unfinished)})" if unfinished else ")"
    if failed:
        line += (
            "\n  failed: " + " ".join(failed[:8]) + (f" ... (+{len(failed) - 8})" if len(failed) > 8 else "")
        )
    return line


def verdict(out_dir: Path) -> list[str]:
    lines = ["== seedvl GPU pass verdict"]
    stages = out_dir / "stages.tsv"
    if stages.exists():
        cells = [line.split("\t") for line in stages.read_text().splitlines() if line.strip()]
        lines.append(
            "stages: "
            + "  ".join(
                f"{c[0]} {c[2]}/{c[1]}s"
                + ("" if c[3] == "0" else " TIMEOUT" if c[3] == "124" else f" rc={c[3]}")
                for c in cells
                if len(c) >= 4
            )
        )
    tests = test_summary(out_dir)
    if tests:
        lines.append(tests)
    checks = read_jsonl(out_dir / "selfcheck.jsonl")
    bench = read_jsonl(out_dir / "bench.jsonl")
    if bench:
        peaks = bench[-1]["peaks"]
        lines.append(
            f"device: {bench[-1].get('device')}; peaks {peaks['matmul_tflops']:.0f} TFLOP/s, "
            f"{peaks['copy_gbps']:.0f} GB/s"
        )
    correct: dict[tuple[str, str], str] = {}
    for c in checks:
        key = (c["op"], c["impl"])
        worst = max(c.get("errors", {}).values(), default=None)
        correct[key] = c["status"] if worst is None else f"{c['status']} {worst:.0e}"
    perf = bench_summary(bench)
    keys = list(dict.fromkeys([*correct, *perf]))
    table = [("op", "impl", "correct", "rows", "best", "%peak", "x peer gmean", "worst x peer (case)")]
    for key in keys:
        s = perf.get(key)
        best = s and s["best"]
        ratios = s["ratios"] if s else []
        gmean = math.exp(sum(math.log(r) for r, _, _ in ratios) / len(ratios)) if ratios else None
        worst = min(ratios) if ratios else None
        table.append(
            (
                key[0],
                key[1],
                correct.get(key, "-"),
                str(s["rows"]) if s else "-",
                f"{best[0]:.1f} {best[1]}" if best else "-",
                f"{best[2]:.1f}" if best and best[2] is not None else "-",
                f"{gmean:.2f}" if gmean is not None else "-",
                f"{worst[0]:.2f} {worst[1]} ({worst[2]})" if worst else "-",
            )
        )
    if len(table) > 1:
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    else:
        lines.append("no self-check or benchmark results")
    failing = [f"{op}/{impl}" for (op, impl), v in correct.items() if v.startswith("FAIL")]
    passed = sum(v.startswith("ok") for v in correct.values())
    skipped = sum(v.startswith("skipped") for v in correct.values())
    if not checks:
        lines.append("VERDICT: no self-check result (see selfcheck.log)")
    elif failing:
        lines.append(f"VERDICT: MISMATCH in {', '.join(failing)}; {passed} op/impl checks ok")
    else:
        lines.append(f"VERDICT: {passed} op/impl checks ok at real sizes, {skipped} skipped, none failed")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print("\n".join(verdict(args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
