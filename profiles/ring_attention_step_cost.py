"""Expected multi-GPU efficiency of zigzag ring attention from its per-step cost and a link model.

One GPU cannot show the overlap of a ring, but it can time everything a rank does per ring step: the
step's varlen_attention block (forward and backward, for each kind of step: own chunks causal, "before"
= both query chunks against one KV chunk, "after" = one query chunk against both KV chunks) and the
fp32 merge / accumulation, relative to one unsharded attention call. With the KV (and dKV) bytes each
step moves over a link of bandwidth B, a rank's time is the sum over steps of
max(compute_t, transfer_t) (a transfer overlaps the step before the block is needed), plus the last
dKV hop home; the efficiency is (unsharded time / CP) over that.

    python profiles/ring_attention_step_cost.py --model-only   # analytic: assumed kernel throughput
    python profiles/ring_attention_step_cost.py --out $OUT     # on a GPU: measured per-step costs
    python profiles/ring_attention_step_cost.py --tiny         # CPU smoke test of the measurement

See profiles/ring_attention_model.md for the model, its assumptions and results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import time_ms
from model.config import get_preset
from seedvl_kernels import _dispatch

# The module (the package's ``ring_attention`` attribute is the function once it is exported).
ra = importlib.import_module("seedvl_kernels.ring_attention")

LINKS = {"nvlink_h100_450GBps": 450e9, "ib_ndr_50GBps": 50e9}
LAYOUTS = {"1x128k": [131072], "4x32k": [32768] * 4, "16x8k": [8192] * 16, "64x2k": [2048] * 64}
CPS = (2, 4, 8, 16)
# Assumed for --model-only (replace by measurement): achieved bf16 attention throughput of a
# FlashAttention-class kernel on H100 SXM at long sequences, and achievable HBM bandwidth.
ASSUMED_FWD_FLOPS, ASSUMED_BWD_FLOPS, ASSUMED_HBM = 400e12, 300e12, 2.8e12


def _pairs(lengths: list[int], cp: int) -> float:
    """Visible (query, key) pairs of one ring step, summed over documents (2 c^2 per document)."""
    return sum(2 * (math.ceil(n / (2 * cp))) ** 2 for n in lengths)


def _ring_time(steps: list[float], transfer: float, last_hop: float = 0.0) -> float:
    """A rank's time: step t's compute overlaps the transfer of block t+1 (none after the last)."""
    return sum(max(c, transfer if t + 1 < len(steps) else 0.0) for t, c in enumerate(steps)) + last_hop


def predict(costs: dict, lengths: list[int], cp: int, hkv: int, d: int, bandwidth: float) -> float:
    """Efficiency from per-step costs (seconds): fwd/bwd of the unsharded call and of a mean step
    (block + merge or accumulation), and the link bandwidth (bytes/s per direction)."""
    t_local = sum(2 * math.ceil(n / (2 * cp)) for n in lengths)
    kv = 2 * t_local * hkv * d * 2  # bf16 K and V
    fwd = _ring_time([costs["step_fwd"]] * cp, kv / bandwidth)
    bwd = _ring_time([costs["step_bwd"]] * cp, (kv + 2 * kv) / bandwidth, last_hop=2 * kv / bandwidth)
    return (costs["full_fwd"] + costs["full_bwd"]) / cp / (fwd + bwd)


def modelled_costs(lengths: list[int], cp: int, hq: int, hkv: int, d: int) -> dict:
    full_pairs = sum(n * (n + 1) / 2 for n in lengths)
    t_local = sum(2 * math.ceil(n / (2 * cp)) for n in lengths)
    merge = (t_local * hq * d * (4 + 4 + 4) + t_local * hq * 12) / ASSUMED_HBM  # o32 r/w, fp32 o_t, lse
    accumulate = (t_local * hq * d + 2 * t_local * hkv * d) * (4 + 4 + 4) / ASSUMED_HBM  # dq, dkv (fp32)
    step = _pairs(lengths, cp) * hq * d
    return {
        "full_fwd": 4 * full_pairs * hq * d / ASSUMED_FWD_FLOPS,
        "full_bwd": 10 * full_pairs * hq * d / ASSUMED_BWD_FLOPS,
        "step_fwd": 4 * step / ASSUMED_FWD_FLOPS + merge,
        "step_bwd": 10 * step / ASSUMED_BWD_FLOPS + accumulate,
    }


def measure_full(lengths, hq, hkv, d, device, impl) -> tuple[dict, tuple]:
    """Seconds of one unsharded causal call (forward, backward), and its bf16 inputs."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths), hq, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lengths), hkv, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    full, mx, scale = (cu.to(device), cu.to(device), True), max(lengths), 1 / math.sqrt(d)
    out, lse = ra._block_fwd(q, k, v, full, mx, mx, scale, impl)
    costs = {
        "full_fwd": time_ms(lambda: ra._block_fwd(q, k, v, full, mx, mx, scale, impl), device) / 1e3,
        "full_bwd": time_ms(
            lambda: ra._block_bwd(out, None, q, k, v, out, lse, full, mx, mx, scale, impl), device
        )
        / 1e3,
    }
    return costs, (q, k, v, cu)


def measure_steps(inputs: tuple, cp: int, device, impl) -> dict:
    """Seconds of each kind of step on rank 0's shard, of the merge and of the gradient accumulation,
    and of the mean step (rank r has r "before" and CP-1-r "after" steps: on average (CP-1)/2 each)."""
    q, k, v, cu = inputs
    shard = ra.zigzag_shard([q, k, v], cu, cp, 0)
    ql, kl, vl = shard.tensors
    cul, mx, scale = shard.cu_seqlens.to(device), shard.max_seqlen, 1 / math.sqrt(q.shape[2])
    costs = {}
    for kind, call in ra._ring_offsets(cul, True).items():
        o, lse = ra._block_fwd(ql, kl, vl, call, mx, mx, scale, impl)

        def fwd(call=call):
            return ra._block_fwd(ql, kl, vl, call, mx, mx, scale, impl)

        def bwd(call=call, o=o, lse=lse):
            return ra._block_bwd(o, None, ql, kl, vl, o, lse, call, mx, mx, scale, impl)

        costs[f"{kind}_fwd"] = time_ms(fwd, device) / 1e3
        costs[f"{kind}_bwd"] = time_ms(bwd, device) / 1e3
    acc_o, acc_lse = torch.zeros(ql.shape, device=device), torch.zeros(lse.shape, device=device)
    costs["merge"] = time_ms(lambda: ra._merge(acc_o, acc_lse, o, lse), device) / 1e3
    dq, dkv = torch.zeros_like(acc_o), torch.zeros(2, *kl.shape, device=device)
    costs["accumulate"] = time_ms(lambda: (dq.add_(ql), dkv[0].add_(kl), dkv[1].add_(vl)), device) / 1e3
    for way, extra in (("fwd", costs["merge"]), ("bwd", costs["accumulate"])):
        others = (costs[f"before_{way}"] + costs[f"after_{way}"]) / 2
        costs[f"step_{way}"] = (costs[f"self_{way}"] + (cp - 1) * others) / cp + extra
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-only", action="store_true", help="analytic costs, no device work")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--preset", default="qwen3-235b-a22b", help="LLM preset for Hq, Hkv, D")
    parser.add_argument("--impl", default="auto", help="varlen_attention implementation")
    parser.add_argument("--out", default=None, help="folder for the JSON result")
    args = parser.parse_args()
    cfg = get_preset(args.preset)
    hq, hkv, d = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    layouts, cps = LAYOUTS, CPS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        hq, hkv, d, layouts, cps = 4, 2, 16, {"1x96": [96], "3x32": [32] * 3}, (2, 4)
    impl = _dispatch.resolve("varlen_attention", args.impl, device, torch.bfloat16)
    rows = []
    for name, lengths in layouts.items():
        if not args.model_only:
            full, inputs = measure_full(lengths, hq, hkv, d, device, impl)
        for cp in cps:
            if args.model_only:
                costs = modelled_costs(lengths, cp, hq, hkv, d)
            else:
                costs = {**full, **measure_steps(inputs, cp, device, impl)}
            row = {"layout": name, "cp": cp, **costs}
            row["step_ratio_fwd"] = costs["step_fwd"] / costs["full_fwd"]  # ideal 1 / CP^2
            row.update({f"eff_{link}": predict(costs, lengths, cp, hkv, d, bw) for link, bw in LINKS.items()})
            rows.append(row)
            effs = " ".join(f"{link} {row[f'eff_{link}']:.0%}" for link in LINKS)
            ratio = f"step/full fwd {row['step_ratio_fwd']:.4f} (ideal {1 / cp**2:.4f})"
            print(f"{name:>7} CP={cp:<2} {ratio} {effs}")
    if args.out:
        meta = {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "mode": "model" if args.model_only else "measured",
            "impl": None if args.model_only else impl,
            "shape": {"preset": args.preset, "hq": hq, "hkv": hkv, "d": d},
        }
        path = Path(args.out) / f"ring_attention_step_cost_{meta['mode']}.json"
        path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"written: {path}")


if __name__ == "__main__":
    main()
