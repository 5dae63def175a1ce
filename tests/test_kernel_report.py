"""The hot kernels keep what profiles/kernel_report.json records for sm_90a: no new register spills,
their tensor-core instructions (wgmma), and more than one wgmma group in flight where they had it.

profiles/kernel_report.py --hot --check runs in a subprocess (the Triton kernels must be real JIT
functions there; conftest sets TRITON_INTERPRET=1 here). It compiles the hot Triton kernels with
Triton's compiler and ptxas (no GPU needed) and, when a built extension with sm_90a code is found,
reads its CUDA kernels with cuobjdump. The comparison itself is tested on synthetic regressions.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "profiles" / "kernel_report.py"


def _load():
    # kernel_report imports nothing of the package at module level, so this leaves TRITON_INTERPRET
    # and the interpreted kernels of the other tests alone.
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _load()
BASELINE = json.loads(kr.BASELINE.read_text())


def _row(key: str) -> dict:
    return copy.deepcopy(BASELINE["kernels"][key])


def _hot_keys() -> list[str]:
    return [f"triton {k}" for k in kr.HOT_TRITON]


def test_baseline_covers_the_hot_kernels_and_explains_its_spills():
    missing = [k for k in _hot_keys() if k not in BASELINE["kernels"]]
    assert not missing, f"hot kernels missing from {kr.BASELINE.name}: {missing}"
    spilling = {k for k, row in BASELINE["kernels"].items() if row["spill"]}
    unexplained = sorted(k for k in spilling if not BASELINE["known_spills"].get(k, "").strip())
    assert not unexplained, f"spills without a reason in known_spills: {unexplained}"


def test_comparison_flags_a_new_spill():
    clean = next(k for k in _hot_keys() if not BASELINE["kernels"][k]["spill"])
    row = _row(clean)
    assert kr.regressions(BASELINE, [row]) == []
    row["spill"] = 96
    found = kr.regressions(BASELINE, [row])
    assert len(found) == 1 and "spills 96 B" in found[0] and clean in found[0], found


def test_comparison_holds_a_known_spill_to_its_size():
    known = next(k for k in BASELINE["known_spills"] if k in BASELINE["kernels"])
    row = _row(known)
    assert kr.regressions(BASELINE, [row]) == []
    row["spill"] += 8
    found = kr.regressions(BASELINE, [row])
    assert len(found) == 1 and "more than the baseline" in found[0], found


def test_comparison_flags_lost_tensor_cores_and_lost_pipelining():
    wgmma = next(k for k in _hot_keys() if BASELINE["kernels"][k]["mma"] == "wgmma")
    for mma in ("none", "mma.sync"):
        row = _row(wgmma)
        row["mma"], row["waits"] = mma, []
        found = kr.regressions(BASELINE, [row])
        assert len(found) == 1 and f"wgmma -> {mma}" in found[0], found
    piped = next(k for k in _hot_keys() if max(BASELINE["kernels"][k]["waits"] or [0]) >= 1)
    row = _row(piped)
    row["waits"] = [0]
    found = kr.regressions(BASELINE, [row])
    assert len(found) == 1 and "no longer pipelined" in found[0], found


def test_comparison_flags_lost_warp_specialization():
    specialized = next(k for k in _hot_keys() if BASELINE["kernels"][k].get("mma_partitions"))
    row = _row(specialized)
    assert row["mma_partitions"] == 2 and row["in_flight"] == 2 and kr.regressions(BASELINE, [row]) == []
    row["mma_partitions"] = None
    found = kr.regressions(BASELINE, [row])
    assert len(found) == 1 and "specialization lost" in found[0], found


def test_ttgir_mma_partitions_counts_the_partitions_that_issue_wgmma():
    plain = "tt.func @k() {\n  %0 = ttng.warp_group_dot %a, %b, %c\n}"
    assert kr.ttgir_mma_partitions(plain) is None
    ws = (
        "ttg.warp_specialize(%x)\n    default {\n      ttng.async_tma_copy_global_to_local %d\n"
        "    }\n    partition0(%a: i32) num_warps(4) {\n      %s = ttng.warp_group_dot %q, %k, %z\n"
        "    }\n    partition1(%a: i32) num_warps(4) {\n      %s = ttng.warp_group_dot %q, %k, %z\n"
        "    }\n    partition2(%a: i32) num_warps(1) {\n      ttng.arrive_barrier %b\n    }\n"
    )
    assert kr.ttgir_mma_partitions(ws) == 2
    row = kr.Row("triton", "op", "k", "s", 168, 0, 0, 0, 384, 1, 12, "regs", "wgmma", [0], mma_partitions=2)
    assert row.in_flight == 2 and kr.Row(**{**row.__dict__, "mma_partitions": None}).in_flight == 1


def test_comparison_flags_a_hot_kernel_that_did_not_compile():
    keys = _hot_keys()
    rows = [_row(k) for k in keys[1:]]
    found = kr.regressions(BASELINE, rows, expected=keys)
    assert len(found) == 1 and keys[0] in found[0], found


def test_occupancy_matches_the_sm90_limits():
    assert kr.occupancy(255, 0, 128) == (2, 8, "regs")  # 8 KB of registers per warp: 2 per sub-partition
    assert kr.occupancy(32, 0, 1024)[:2] == (2, 64)  # 32 warps per CTA
    assert kr.occupancy(64, 227 * 1024, 128)[0] == 1  # the most one CTA may ask for
    assert kr.occupancy(128, 100 * 1024, 256) == (2, 16, "regs/smem")


def test_sass_facts_read_wgmma_and_its_waits():
    sass = """
        Function : k1
        /*0010*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0020*/ WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0030*/ WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        Function : k2
        /*0010*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
    """
    assert kr.sass_facts(sass) == {"k1": ("wgmma", [0, 1]), "k2": ("mma.sync", [])}


def test_sass_counts_read_the_instruction_mix():
    sass = """
        Function : k1
        /*0010*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0020*/ HGMMA.64x16x16.F32.BF16 R88, gdesc[UR12], R88, gsb0 ;
        /*0030*/ @!P0 MUFU.EX2 R5, R4 ;
        /*0040*/ MUFU.RCP R6, R7 ;
        /*0050*/ MUFU.EX2 R8, R9 ;
        /*0060*/ STL [R1+0x4], R2 ;
        /*0070*/ LDL.64 R2, [R1] ;
        Function : k2
        /*0010*/ FFMA R4, R8, R12, R4 ;
    """
    assert kr.sass_counts(sass) == {
        "k1": (7, {"EX2": 2, "RCP": 1}, 2, {"64x16x16": 1, "64x64x16": 1}),
        "k2": (1, {}, 0, {}),
    }
    ttgir = "%1 = math.sin %0 : tensor<32x64xf32>\n%2 = math.cos %0 : tensor<32x64xf32>\n%3 = math.exp2 %2"
    assert kr.ttgir_sincos(ttgir) == 2


def test_comparison_flags_sin_cos_computed_again():
    """The attention kernels read RoPE's sin/cos from a table: one that evaluates them again fails."""
    table = next(k for k, row in BASELINE["kernels"].items() if row.get("sincos") == 0 and "rope=1" in k)
    row = _row(table)
    assert kr.regressions(BASELINE, [row]) == []
    row["sincos"] = 8
    found = kr.regressions(BASELINE, [row])
    assert len(found) == 1 and "8 sin/cos operations" in found[0], found


@pytest.mark.slow
def test_hot_kernels_hold_the_baseline():
    missing = kr.toolchain_missing()
    if missing:
        pytest.skip(f"cannot compile for sm_90a here: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, str(SCRIPT), "--hot", "--check", "--json"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stderr + run.stdout)[-6000:]
    report = json.loads(run.stdout)
    compiled = {row["key"] for row in report["rows"]}
    assert set(_hot_keys()) <= compiled, sorted(set(_hot_keys()) - compiled)
