"""Communication volume of one training micro-batch per rank under a layout, from the model's own
parameter counts (model.summary) and the collectives trainer.parallel issues.

    python profiles/parallel_comm.py                                   # the table in parallelism.md
    python profiles/parallel_comm.py --preset seedvl-qwen3-235b-a22b --dp 16 --cp 4 --ep 16

Bytes are what one rank sends (and, by symmetry, receives) with ring collectives: an all-gather or
reduce-scatter of N bytes over G ranks moves N (G-1)/G per rank, an all-to-all sends the (G-1)/G of
its rows bound for other ranks (uniform routing). Per micro-batch, with every parameter trainable
(stage 1) and bf16 mixed precision:

    FSDP unit over G ranks     all-gather in forward and again in backward (resharded after
                               forward), bf16; reduce-scatter of the gradients, fp32
    expert all-to-all (EP)     dispatch and combine in forward, their transposes in backward: 4 x
                               (T/cp tokens x k slots x D x 2 bytes) per MoE layer
    ring attention (CP)        forward: cp-1 KV hops; backward: cp-1 KV hops and cp fp32 dKV hops;
                               a KV block is 2 x T/cp x Hkv x Dh x 2 bytes, per layer

The loss normaliser's all-reduce, the MoE count exchanges and the balance statistics' all-reduce
are a few hundred bytes each and left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import VLMConfig, get_preset
from model.summary import count

BF16, FP32 = 2, 4


def ring(nbytes: float, group: int) -> float:
    return nbytes * (group - 1) / group


def volumes(preset: str, dp: int, cp: int, ep: int, seq_len: int) -> dict[str, float]:
    """Bytes per rank per micro-batch of ``seq_len`` LLM tokens (per dp replica), by collective."""
    cfg = get_preset(preset)
    assert isinstance(cfg, VLMConfig), preset
    llm = cfg.llm
    parts = count(cfg)
    experts = parts["llm.routed_experts"].params
    dense = sum(p.params for name, p in parts.items() if name != "llm.routed_experts")
    world, edp = dp * cp, dp * cp // ep
    moe_layers = sum(llm.is_moe_layer(i) for i in range(llm.num_layers))
    tokens = seq_len / cp  # LLM tokens on this rank
    kv_block = 2 * tokens * llm.num_kv_heads * llm.head_dim * BF16
    return {
        "FSDP all-gathers, dense (ViT, adapter, LLM) over dp x cp": 2 * ring(dense * BF16, world),
        "FSDP reduce-scatter, dense over dp x cp": ring(dense * FP32, world),
        "FSDP all-gathers, experts over edp": 2 * ring(experts / ep * BF16, edp),
        "FSDP reduce-scatter, experts over edp": ring(experts / ep * FP32, edp),
        "EP all-to-all (dispatch, combine, fwd + bwd)": moe_layers
        * 4
        * ring(tokens * llm.top_k * llm.hidden * BF16, ep),
        "CP ring attention (KV and dKV hops)": llm.num_layers
        * ((cp - 1) * 2 * kv_block + cp * kv_block * FP32 / BF16 * (cp > 1)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="seedvl-qwen3-30b-a3b")
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32_768, help="LLM tokens per micro-batch (stage 1: 32,768)")
    a = p.parse_args(argv)
    rows = volumes(a.preset, a.dp, a.cp, a.ep, a.seq_len)
    print(f"{a.preset}, dp={a.dp}, cp={a.cp}, ep={a.ep}, {a.seq_len:,} LLM tokens per micro-batch")
    print("| collective | GB per rank per micro-batch |\n|---|---:|")
    for name, nbytes in rows.items():
        print(f"| {name} | {nbytes / 1e9:.2f} |")
    print(f"| total | {sum(rows.values()) / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
