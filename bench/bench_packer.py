"""Packer throughput: the host work of one training step must stay far ahead of the GPU step.

The packer is CPU work wherever training runs, so every row is host-timed (median of repeated
calls, one thread; see bench/harness.py) on any machine. Cases, for N samples and a token budget
per step (4,096: the tiny preset's stage 2; 32,768: the paper's stage 0/1 sequence length;
131,072: stage 2 and SFT):

- ``plan``: first-fit bin planning of N sample lengths (trainer.data.packer.plan_bins, numba).
  Peer ``numpy_first_fit``: the same first fit, one vectorised scan of the open bins per sample.
- ``pool+build``: flattening N encoded text samples and building every packed batch (ids,
  shifted labels, positions, cu_seqlens, placeholder positions) -- what the stream does per window.
- ``build+images``: the same with one 16-patch image per sample (patch concatenation included).
- ``encode_spatial``: rendering + patchifying + tokenising embedded spatial samples (the data
  generator, not the packer; it runs in the prefetch thread).
- ``host_data_path``: all of it as the trainer runs it (trainer.data.stream: render, tokenise,
  plan, build) for the main job's stage-1 steps, beside one training step of the tiny model on the
  same machine (``model_step_ms``, ``data_over_step``): the data path must stay well under 1, since
  it runs ahead in background threads (one window ahead, see trainer/data/stream.py).

Columns: samples/s and tokens/s, and ``ms/step`` = the time divided by the steps (bins) it
produces, to set against a GPU step. Sample lengths are log-normal (median 600 tokens, clipped to
[16, min(8192, budget)]), the shape of mixed captions, QA and interleaved documents.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from bench import harness
from model.preprocess import ImagePatches, window_positions
from trainer.data.chat import LEVEL_PROMPT, EncodedSample, encode_conversation
from trainer.data.packer import SamplePool, plan_bins
from trainer.data.spatial import SpatialDataset
from trainer.data.tokenizer import ByteTokenizer

CPU = torch.device("cpu")
IMAGE_TOKEN = ByteTokenizer().image_token_id
ROWS: list[dict] = []


def _lengths(n: int, longest: int = 8192) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(np.log(600), 0.8, size=n), 16, longest).astype(np.int64)


def _samples(n: int, images: bool, longest: int = 8192) -> list[EncodedSample]:
    rng = np.random.default_rng(1)
    lengths = _lengths(n, longest)
    image = ImagePatches(torch.randn(16, 588), window_positions(4, 4), (4, 4)) if images else None
    out = []
    for i, length in enumerate(lengths):
        ids = rng.integers(0, 256, size=int(length), dtype=np.int32)
        levels = np.ones(int(length), dtype=np.int8)
        if images:
            ids[1:5] = IMAGE_TOKEN  # 16 patches -> 4 visual tokens
            levels[1:5] = 0
        out.append(EncodedSample(ids, levels, [image] if images else [], f"s{i}"))
    return out


def _numpy_first_fit(lengths: np.ndarray, budget: int) -> int:
    big = lengths > budget // 4
    order = np.concatenate(
        [np.flatnonzero(big)[np.argsort(-lengths[big], kind="stable")], np.flatnonzero(~big)]
    )
    room = np.full(len(lengths), budget, dtype=np.int64)
    used = 0
    for i in order:
        b = int(np.argmax(room[: used + 1] >= lengths[i]))
        room[b] -= lengths[i]
        used = max(used, b + 1)
    return used


def _row(benchmark, case: dict, impl: str, fn, samples: int, tokens: int, steps: int) -> dict:
    with harness.quiet_cpu(CPU):
        ms = harness.host_median_ms(fn, min_rounds=3, min_time_s=0.2)
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    row = {
        "op": "packer", "impl": impl, **case, "time_ms": round(ms, 3),
        "samples_per_s": samples / (ms * 1e-3), "tokens_per_s": tokens / (ms * 1e-3),
        "ms_per_step": ms / steps if steps else None, "steps": steps,
    }  # fmt: skip
    benchmark.extra_info.update(row)
    ROWS.append(row)
    return row


@pytest.fixture(scope="module", autouse=True)
def _print_rows(request):
    """The module's rows as a table after its last test (outside output capture)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not ROWS:
        return
    lines = ["", "packer rows (host-timed, one thread; ms/step = time / packed batches produced)"]
    for r in ROWS:
        lines.append(
            f"  {r['case']:<14} {r['impl']:<16} N={r['N']:<6} budget={r['budget']:<7}"
            f" {r['time_ms']:>10.3f} ms  {r['samples_per_s']:>12,.0f} samples/s"
            f"  {r['tokens_per_s']:>14,.0f} tok/s"
            + (f"  {r['ms_per_step']:>8.4f} ms/step" if r["ms_per_step"] is not None else "")
            + (f"  (model step {r['model_step_ms']:.1f} ms: data/step {r['data_over_step']:.2f})"
               if "model_step_ms" in r else "")
        )  # fmt: skip
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("impl", ["numba", "numpy_first_fit"])
@pytest.mark.parametrize("n", [1000, 10000])
@pytest.mark.parametrize("budget", [32768, 131072])
def test_plan(benchmark, budget, n, impl):
    lengths = _lengths(n)
    if impl == "numba":
        plan_bins(lengths[:10], budget)  # compile (or load the cached) kernel outside the timing
        steps = len(plan_bins(lengths, budget))
        fn = lambda: plan_bins(lengths, budget)
    else:
        steps = _numpy_first_fit(lengths, budget)
        fn = lambda: _numpy_first_fit(lengths, budget)
    assert steps == len(plan_bins(lengths, budget))
    _row(benchmark, {"case": "plan", "N": n, "budget": budget}, impl, fn, n, int(lengths.sum()), steps)


@pytest.mark.parametrize("n", [1000, 10000])
@pytest.mark.parametrize("budget", [4096, 32768])
def test_pool_and_build(benchmark, budget, n):
    samples = _samples(n, images=False, longest=min(8192, budget))
    tokens = sum(s.length for s in samples)

    def run():
        pool = SamplePool(samples)
        return [
            pool.collate(b, min_level=LEVEL_PROMPT, image_token_id=IMAGE_TOKEN) for b in pool.plan(budget)
        ]

    steps = len(run())
    _row(benchmark, {"case": "pool+build", "N": n, "budget": budget}, "numba", run, n, tokens, steps)


def test_build_with_images(benchmark):
    n, budget = 2000, 32768
    samples = _samples(n, images=True)
    pool = SamplePool(samples)
    bins = pool.plan(budget)
    run = lambda: [pool.collate(b, min_level=LEVEL_PROMPT, image_token_id=IMAGE_TOKEN) for b in bins]
    batches = run()
    assert sum(b.patches.shape[0] for b in batches) == 16 * n
    case = {"case": "build+images", "N": n, "budget": budget}
    _row(benchmark, case, "numba", run, n, sum(s.length for s in samples), len(bins))


def test_encode_spatial(benchmark):
    ds, tok, n = SpatialDataset(0), ByteTokenizer(), 64
    ds[0]  # compile the renderer outside the timing
    run = lambda: [encode_conversation(ds[i], tok) for i in range(n)]
    tokens = sum(s.length for s in run())
    _row(benchmark, {"case": "encode_spatial", "N": n, "budget": "-"}, "numba+torch", run, n, tokens, 0)


def test_host_data_path(benchmark):
    """The whole host data path of the main job -- spatial scenes rendered, tokenised, packed into
    2 x 512-token micro-batches per step (stage 1 of the tiny preset) by trainer.data.stream -- next
    to one training step of the tiny model on the same batches (forward + backward, this machine)."""
    from model.vlm import SeedVLM
    from trainer.components import build_model_config, micro_batch_loss
    from trainer.data.stream import BatchStream, Position

    tok, budget, steps = ByteTokenizer(), 512, 24
    stream = BatchStream(SpatialDataset(0), tok, seed=0, window=128)
    stream.encode_window(0, budget)  # compile the renderer and the packer outside the timing

    def run():
        fresh = BatchStream(SpatialDataset(0), tok, seed=0, window=128)
        it = fresh.batches(Position(0, 0), budget, min_level=LEVEL_PROMPT)
        return [next(it)[0] for _ in range(2 * steps)]

    batches = run()
    samples, tokens = sum(b.num_documents for b in batches), sum(b.num_tokens for b in batches)
    row = _row(benchmark, {"case": "host_data_path", "N": samples, "budget": budget}, "stream", run,
               samples, tokens, steps)  # fmt: skip
    cfg = build_model_config("seedvl-tiny", tok)
    model = SeedVLM(cfg)

    def train_step():
        for b in batches[:2]:
            _, loss = micro_batch_loss(model(**b.model_inputs()), b.labels, targets=1, accum=2, llm=cfg.llm)
            loss.backward()

    step_ms = harness.host_median_ms(train_step, min_rounds=3, min_time_s=0.2)
    row.update(model_step_ms=round(step_ms, 3), data_over_step=row["ms_per_step"] / step_ms)
    benchmark.extra_info.update(row)
