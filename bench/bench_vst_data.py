"""VST data-path cost: how many samples per second each scenario yields, rendered (ray casting, one
numba call per image, view or frame) and encoded (patchify, tokenise) as the stream does it.

Host work wherever training runs, so every row is host-timed (median of repeated calls; torch on
one thread, bench/harness.py). Cases:

- ``single``, ``multiview``, ``video``: trainer.data.vst.VSTDataset restricted to one scenario
  (skills equally weighted), samples 0..N-1 built and encoded from scratch on every call: all on
  one thread (``serial``); a sample's views and frames rendered on trainer.data.multiview's pool
  (``frames xW``, W = its default worker count: up to 8 CPUs); or W samples built ahead at once
  (``prefetch xW``, VSTDataset(prefetch=W); the builds in flight when the reader stops are waited
  for and counted). The kernel releases the GIL, so both scale with the cores. Clips are rendered
  at their task's sampling rate (no frame the sampler would drop) and a frame that repeats (nothing
  moved) is rendered once.
- ``mixed_vs_step``: the default mix (single 0.5, multiview 0.25, video 0.25) packed into one 2,048-
  token batch, beside one training step (forward + backward) of the tiny model on that batch on the
  same machine: ``data_over_step`` is the time to build the
  batch's samples over the step's, on one core. The stream builds them one window ahead in a
  background thread, so above 1 the data path starves a model this small on this machine; a GPU
  step of a real preset is far longer per sample.

Columns: samples/s, visual tokens + text tokens per second, ms per sample.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench import harness
from trainer.data.chat import LEVEL_PROMPT, encode_conversation
from trainer.data.multiview import render_workers
from trainer.data.packer import SamplePool
from trainer.data.tokenizer import ByteTokenizer
from trainer.data.vst import VSTConfig, VSTDataset

CPU = torch.device("cpu")
TOK = ByteTokenizer()
N = {"single": 12, "multiview": 6, "video": 4}
ROWS: list[dict] = []


def _row(benchmark, case: str, impl: str, fn, samples: int, tokens: int, extra: dict | None = None) -> dict:
    with harness.quiet_cpu(CPU):
        ms = harness.host_median_ms(fn, min_rounds=2, min_time_s=0.0)
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
    row = {
        "op": "vst_data", "impl": impl, "case": case, "N": samples, "time_ms": round(ms, 3),
        "samples_per_s": samples / (ms * 1e-3), "tokens_per_s": tokens / (ms * 1e-3),
        "ms_per_sample": ms / samples, **(extra or {}),
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
    lines = ["", "vst data rows (host-timed; torch on one thread)"]
    for r in ROWS:
        lines.append(
            f"  {r['case']:<14} {r['impl']:<10} N={r['N']:<4} {r['samples_per_s']:>9,.1f} samples/s"
            f"  {r['tokens_per_s']:>11,.0f} tok/s  {r['ms_per_sample']:>8.2f} ms/sample"
            + (f"  (model step {r['model_step_ms']:.1f} ms: data/step {r['data_over_step']:.2f})"
               if "model_step_ms" in r else "")
        )  # fmt: skip
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line)


def _dataset(scenario: str, prefetch: int = 0) -> VSTDataset:
    return VSTDataset(0, VSTConfig(scenarios=((scenario, 1.0),)), prefetch=prefetch)


@pytest.mark.parametrize("how", ["serial", "frames", "samples"])
@pytest.mark.parametrize("scenario", list(N))
def test_scenario_samples_per_s(benchmark, monkeypatch, scenario, how):
    w = render_workers()
    if how != "serial" and w == 1:
        pytest.skip("one CPU: nothing to parallelise over")
    monkeypatch.setenv("SEEDVL_RENDER_WORKERS", str(w if how == "frames" else 1))
    n = N[scenario]
    _dataset(scenario)[0]  # compile (or load the cached) kernels outside the timing

    def run():
        ds = _dataset(scenario, prefetch=w if how == "samples" else 0)
        out = [encode_conversation(ds[i], TOK) for i in range(n)]
        ds.close()
        return out

    tokens = sum(s.length for s in run())
    impl = {"serial": "serial", "frames": f"frames x{w}", "samples": f"prefetch x{w}"}[how]
    _row(benchmark, scenario, impl, run, n, tokens)


def test_mixed_batch_vs_model_step(benchmark, monkeypatch):
    from model.vlm import SeedVLM
    from trainer.components import build_model_config, micro_batch_loss

    monkeypatch.setenv("SEEDVL_RENDER_WORKERS", "1")
    ds, n, budget = VSTDataset(0), 8, 2048
    ds[0]  # compile outside the timing
    run = lambda: [encode_conversation(ds[i], TOK) for i in range(n)]
    samples = run()
    pool = SamplePool(samples)
    batch = pool.collate(pool.plan(budget)[0], min_level=LEVEL_PROMPT, image_token_id=TOK.image_token_id)
    row = _row(benchmark, "mixed_vs_step", "serial", run, n, sum(s.length for s in samples))
    cfg = build_model_config("seedvl-tiny", TOK)
    torch.manual_seed(0)
    model = SeedVLM(cfg)

    def train_step():
        _, loss = micro_batch_loss(
            model(**batch.model_inputs()), batch.labels, targets=1, accum=1, llm=cfg.llm
        )
        loss.backward()

    with harness.quiet_cpu(CPU):
        step_ms = harness.host_median_ms(train_step, min_rounds=1, min_time_s=0.0)
    data_ms = row["ms_per_sample"] * batch.num_documents
    row.update(
        model_step_ms=round(step_ms, 3), data_over_step=data_ms / step_ms, batch_samples=batch.num_documents
    )
    benchmark.extra_info.update(row)
