"""scripts/gpu_pass.sh fits a lent GPU's time and returns numbers however far it gets, checked on a CPU:
its stage budgets sum to under 7 minutes, benchmark rows reach the JSON lines file the moment they are
measured, and the verdict reads whatever a cut-off pass left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_test_shards  # noqa: E402
import gpu_verdict  # noqa: E402

SEVEN_MINUTES_S = 420


def _plan() -> dict[str, int]:
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_pass.sh"), "--plan"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)s\s", run.stdout, flags=re.M)}


def test_plan_budgets_fit_in_seven_minutes():
    plan = _plan()
    total = plan.pop("total")
    assert list(plan) == ["setup", "selfcheck", "tests", "bench", "full", "verdict"], plan
    assert all(b > 0 for b in plan.values()), plan
    assert sum(plan.values()) == total
    assert total < SEVEN_MINUTES_S, f"stage budgets sum to {total} s, over 7 minutes: {plan}"


def test_plan_needs_no_gpu_and_no_build(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_pass.sh"), "--plan"], env=env, check=True, timeout=60)
    assert not any(tmp_path.iterdir()), "--plan must not start the pass"


def test_shards_keep_a_functions_cases_together():
    ids = [f"tests/a.py::test_x[{i}]" for i in range(5)] + ["tests/a.py::test_y", "tests/b.py::test_z[1]"]
    shards = gpu_test_shards.shard(ids, 3)
    assert sorted(n for s in shards for n in s) == sorted(ids)
    assert any(all(f"test_x[{i}]" in " ".join(s) for i in range(5)) for s in shards)
    assert [len(s) for s in shards] == [5, 1, 1]


@pytest.mark.slow
def test_bench_rows_are_appended_as_measured_and_peers_can_be_left_out(tmp_path):
    """A CPU bench run with $SEEDVL_BENCH_JSONL writes one line per row; $SEEDVL_BENCH_PEERS leaves the
    torch.compile'd peer untimed (with a note), as the GPU pass's curated stage does."""
    jsonl = tmp_path / "bench.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"SEEDVL_BENCH_JSONL": str(jsonl), "SEEDVL_BENCH_PEERS": "copy"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable"]
    cmd += ["bench/bench_rope_2d.py", "-k", "ref and not compile"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = gpu_verdict.read_jsonl(jsonl)
    assert rows, run.stdout[-2000:]
    for row in rows:
        assert row["op"] == "rope_2d" and row["impl"] == "ref" and row["time_ms"] > 0
        assert set(row["peer_time_ms"]) == {"copy"}
        assert "torch_compile_ref" in row["notes"]
        assert row["peaks"]["matmul_tflops"] > 0


def _bench_row(op: str, impl: str, case: dict, tflops: float, peers: dict[str, float]) -> dict:
    time_ms = 1.0
    return {
        "op": op,
        "impl": impl,
        "case": case,
        "time_ms": time_ms,
        "tflops": tflops,
        "gbps": None,
        "pct_of_matmul_peak": 100 * tflops / 800,
        "pct_of_copy_bw": None,
        "peer_time_ms": peers,
        "ratio_to_peer": {n: t / time_ms for n, t in peers.items()},
        "device": "NVIDIA H200",
        "peaks": {"matmul_tflops": 800.0, "copy_gbps": 4000.0},
    }


def test_verdict_reads_a_pass_cut_off_midway(tmp_path):
    (tmp_path / "stages.tsv").write_text("setup\t90\t4\t0\nselfcheck\t60\t41\t0\ntests\t120\t120\t124\n")
    checks = [
        {
            "kind": "selfcheck",
            "op": "varlen_attention",
            "impl": "triton",
            "status": "ok",
            "errors": {"out": 0.01},
        },
        {"kind": "selfcheck", "op": "moe_ffn", "impl": "triton", "status": "FAIL", "errors": {"dx": 0.3}},
        {"kind": "selfcheck", "op": "rope_2d", "impl": "cuda", "status": "skipped", "reason": "no _C"},
    ]
    (tmp_path / "selfcheck.jsonl").write_text("".join(json.dumps(c) + "\n" for c in checks))
    rows = [
        _bench_row(
            "varlen_attention", "triton", {"pack": "1k_images", "pass": "fwd"}, 400, {"torch_varlen": 1.2}
        ),
        _bench_row(
            "varlen_attention", "triton", {"pack": "llm", "pass": "bwd"}, 300, {"flex": 0.8, "sdpa": 2.0}
        ),
        _bench_row("moe", "triton", {"model": "235b", "routing": "zipf"}, 500, {"grouped_mm": 1.1}),
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"op": "rope_2d", "imp'  # a line cut by the kill
    (tmp_path / "bench.jsonl").write_text(text)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "shard0.log").write_text("===== 3 passed, 1 skipped in 12.3s =====\n")
    (tmp_path / "tests" / "shard1.log").write_text(
        "tests/t.py::test_a[1] PASSED\ntests/t.py::test_a[2] FAILED\ntests/t.py::test_b PASSED\n"
    )
    out = "\n".join(gpu_verdict.verdict(tmp_path))
    assert "tests 120/120s TIMEOUT" in out
    assert "5 passed" in out and "1 failed" in out and "cut off: shard1" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("varlen_attention  triton"))
    assert "400.0 TFLOP/s" in line and "50.0" in line  # the best row and its % of the 800 TFLOP/s peak
    assert "0.80 flex (llm bwd)" in line  # worst ratio to the strongest (fastest) peer of its row
    assert re.search(r"^moe_ffn\s+triton\s+FAIL 3e-01\s+1\s", out, flags=re.M)
    assert out.splitlines()[-1].startswith("VERDICT: MISMATCH in moe_ffn/triton")


def test_info_says_which_implementations_ran_on_a_gpu():
    """info names, for every kernel implementation, the GPU pass that verified it (whose result file
    must be committed) or says that it has only been compiled."""
    from seedvl_kernels import info

    for (op, impl), (date, gpu, result_file) in info.GPU_VERIFIED.items():
        assert re.fullmatch(r"\d{8}", date) and gpu, (op, impl)
        assert (ROOT / result_file).is_file(), f"{op}/{impl}: {result_file} is not in the repository"
    table = info.collect()["gpu_verified"]
    for op, row in table.items():
        for impl, status in row.items():
            if impl != "ref":
                assert status.startswith(("verified on ", "compiled only")), (op, impl, status)
    assert table["varlen_attention"]["triton"]


def test_attention_autotune_pins_one_config_per_shape_class(tmp_path, monkeypatch):
    """SEEDVL_AUTOTUNE=pinned keeps one config per shape class (the tuning file's for this GPU, else
    the default of its head-dim class); save_tuning writes what a search chose in the form the pinned
    mode reads back."""
    import torch
    import triton

    from seedvl_kernels import varlen_attention_triton as vat
    from seedvl_kernels import varlen_attention_triton_common as common

    configs = [triton.Config({"BLOCK_N": 64}, num_warps=w, num_stages=s) for w, s in common._PAIRS["fwd"]]
    configs += [triton.Config({"BLOCK_N": 128}, num_warps=w, num_stages=s) for w, s in common.WIDE_N_PAIRS]
    nargs = {"q_ptr": torch.empty(1, dtype=torch.bfloat16)}
    key = {"HEAD_DIM": 64, "CAUSAL": False, "ROPE": True, "BLOCK_M": 128, "DOT_PREC": "ieee"}
    assert list(key) == common.FWD_TUNE_KEY
    prune = common.prune_by_mode("fwd")["early_config_prune"]
    monkeypatch.delenv(common.AUTOTUNE_FILE_ENV, raising=False)
    monkeypatch.setenv(common.AUTOTUNE_ENV, "search")
    assert prune(configs, nargs, **key) == configs
    wide = [c for c in configs if c.kwargs["BLOCK_N"] == 128]  # searched up to D=64, 128-row tiles
    assert not set(prune(configs, nargs, **{**key, "HEAD_DIM": 128})) & set(wide)
    assert not set(prune(configs, nargs, **{**key, "BLOCK_M": 64})) & set(wide)
    monkeypatch.setenv(common.AUTOTUNE_ENV, "pinned")
    (default,) = prune(configs, nargs, **key)
    assert common.config_tuple(default) == common._PINNED["fwd"][64] and default.kwargs["BLOCK_N"] == 64

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    path = tmp_path / "autotune.json"
    shape = common.shape_class(key, torch.bfloat16, common.FWD_TUNE_KEY)
    for winner, recorded in ((configs[1], [4, 3]), (wide[0], [8, 2, 128])):
        tune_key = (*key.values(), "torch.bfloat16", "torch.bfloat16")
        monkeypatch.setattr(vat._varlen_attention_fwd_kernel, "cache", {tune_key: winner}, raising=False)
        table = vat.save_tuning(path)
        assert table["cpu"]["fwd"][shape] == recorded
        monkeypatch.setenv(common.AUTOTUNE_FILE_ENV, str(path))
        common._tuning_file.cache_clear()
        assert prune(configs, nargs, **key) == [winner]


def test_attention_search_times_deeper_backward_pipelines_where_registers_allow(monkeypatch):
    """Search mode times dQ at 4-5 stages at every head dim and dK/dV at 4 stages up to D=96; the
    4-stage dK/dV spills at D=128 in the sm_90a compile and is not timed there."""
    import torch
    import triton

    from seedvl_kernels import varlen_attention_triton_common as common

    monkeypatch.setenv(common.AUTOTUNE_ENV, "search")
    nargs = {"q_ptr": torch.empty(1, dtype=torch.bfloat16)}
    for kernel in ("dkdv", "dq"):
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in common._PAIRS[kernel]]
        prune = common.prune_by_mode(kernel)["early_config_prune"]
        deepest = {
            d: max(c.num_stages for c in prune(configs, nargs, HEAD_DIM=d, BLOCK_M=64)) for d in (64, 80, 128)
        }
        assert deepest == ({64: 4, 80: 4, 128: 3} if kernel == "dkdv" else {64: 5, 80: 5, 128: 5}), deepest
    rows = json.loads(KERNEL_REPORT.read_text())["kernels"]
    assert not rows["triton varlen_attention: dkdv D=64 rope=1 causal=0 32x128 w8 s4"]["spill"]
    assert "triton varlen_attention: dkdv D=128 rope=0 causal=1 32x64 w8 s4" not in rows


KERNEL_REPORT = ROOT / "profiles" / "kernel_report.json"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_attention_pinned_defaults_do_not_spill(kernel, head_dim):
    """Without a tuning file, pinned mode runs a config that the autotuner also searches and that
    the committed sm_90a report (profiles/kernel_report.json) shows without register spills at every
    shape class of the kernel and head-dim class."""
    from seedvl_kernels import varlen_attention_triton_common as common

    pair = common.pinned_pair(kernel, "any gpu", "no recorded shape", head_dim)
    assert pair in common._PAIRS[kernel], f"{kernel}: pinned {pair} is not searched: {common._PAIRS[kernel]}"
    rows = json.loads(KERNEL_REPORT.read_text())["kernels"].values()
    label = re.compile(rf"{kernel} D=(\d+) .* w(\d+) s(\d+)")
    classes = [
        (row, (int(m[2]), int(m[3])))
        for row in rows
        if row["op"] == "varlen_attention" and (m := label.fullmatch(row["shape"]))
        if common.head_dim_class(int(m[1])) == common.head_dim_class(head_dim)
    ]
    if not classes:
        pytest.skip(f"{KERNEL_REPORT.name} has no {kernel} row at a head dim of class {head_dim}")
    pinned = [row for row, p in classes if p == pair]
    shown = sorted({p for _, p in classes})
    assert pinned, f"{kernel} D~{head_dim}: pinned {pair} not in {KERNEL_REPORT.name} (it has {shown})"
    spills = {row["shape"]: row["spill"] for row in pinned if row["spill"]}
    assert not spills, f"{kernel} D~{head_dim}: pinned {pair} spills (bytes): {spills}"
