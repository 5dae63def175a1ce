"""The packer: bins respect the budget and hold every sample once; a packed batch carries the right
ids, labels, positions and boundaries; and the model's loss on a packed batch equals the sum of its
losses on the samples one by one (packing is invisible). The stream resumes mid-window exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.vlm import SeedVLM
from tests.utils import assert_close
from trainer.components import build_model_config, micro_batch_loss
from trainer.data.chat import LEVEL_PROMPT, LEVEL_RESPONSE, EncodeConfig, encode_conversation
from trainer.data.packer import IGNORE_INDEX, SamplePool, pack, plan_bins
from trainer.data.spatial import SpatialDataset
from trainer.data.stream import BatchStream, Position
from trainer.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _encoded(n: int, seed: int = 0):
    ds = SpatialDataset(seed)
    return [encode_conversation(ds[i], TOK) for i in range(n)]


def _first_fit_reference(lengths, budget, large=0.25):
    big = [i for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]) if lengths[i] > large * budget]
    order = big + [i for i in range(len(lengths)) if lengths[i] <= large * budget]
    loads, members = [], []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                loads[b] += lengths[i]
                members[b].append(i)
                break
        else:
            loads.append(lengths[i])
            members.append([i])
    return [sorted(m) for m in members]


@pytest.mark.parametrize("budget", [1, 64, 1000])
def test_plan_bins_matches_first_fit_reference(budget):
    rng = np.random.default_rng(budget)
    lengths = rng.integers(1, budget + 1, size=301 if budget == 1 else 777)
    bins = plan_bins(lengths, budget)
    assert [b.tolist() for b in bins] == _first_fit_reference(lengths.tolist(), budget)
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(len(lengths))), "every item exactly once"
    assert max(lengths[b].sum() for b in bins) <= budget
    again = plan_bins(lengths, budget)
    assert all(np.array_equal(a, b) for a, b in zip(bins, again, strict=True))


def test_plan_bins_edges():
    assert plan_bins(np.zeros(0, np.int64), 10) == []
    with pytest.raises(ValueError, match=r"1\.\.10"):
        plan_bins(np.array([3, 11]), 10)
    with pytest.raises(ValueError, match="budget"):
        plan_bins(np.array([3]), 0)
    # Small samples pack nearly perfectly.
    lengths = np.random.default_rng(0).integers(50, 160, size=2000)
    bins = plan_bins(lengths, 4096)
    assert lengths.sum() / (len(bins) * 4096) > 0.98


def test_collate_fields():
    samples = _encoded(5)
    pool = SamplePool(samples)
    members = np.array([3, 0, 4])
    batch = pool.collate(members, min_level=LEVEL_PROMPT, image_token_id=TOK.image_token_id)
    lengths = [samples[m].length for m in members]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.vit_cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert batch.max_seqlen == max(lengths)
    assert batch.input_ids.tolist() == np.concatenate([samples[m].ids for m in members]).tolist()
    assert batch.position_ids.tolist() == [t for n in lengths for t in range(n)]
    assert batch.sample_ids == tuple(samples[m].sample_id for m in members)
    # Labels: the next token of the same document where it is a target; never across documents.
    bounds = zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist(), strict=True)
    for (s, e), m in zip(bounds, members, strict=True):
        ids, levels = samples[m].ids, samples[m].levels
        want = [
            int(ids[t + 1]) if levels[t + 1] >= LEVEL_PROMPT else IGNORE_INDEX for t in range(len(ids) - 1)
        ]
        assert batch.labels[s : e - 1].tolist() == want
        assert batch.labels[e - 1] == IGNORE_INDEX
    assert torch.equal(batch.loss_mask, batch.labels != IGNORE_INDEX)
    assert batch.num_targets == int(batch.loss_mask.sum())
    assert not (batch.labels == TOK.image_token_id).any(), "placeholders are never targets"
    # Vision side.
    images = [im for m in members for im in samples[m].images]
    assert batch.num_images == len(images)
    assert batch.vit_max_seqlen == max(im.patches.shape[0] for im in images)
    assert batch.grid_hw.tolist() == [list(im.grid_hw) for im in images]
    assert (
        batch.image_positions.tolist() == torch.nonzero(batch.input_ids == TOK.image_token_id)[:, 0].tolist()
    )
    assert batch.image_positions.numel() * 4 == batch.patches.shape[0] == batch.pos_hw.shape[0]
    assert torch.equal(batch.patches, torch.cat([im.patches for im in images]))


def test_sft_targets_are_the_replies():
    samples = _encoded(4)
    sft = pack(samples, 10_000, min_level=LEVEL_RESPONSE, image_token_id=TOK.image_token_id)[0]
    text = TOK.decode(sft.labels[sft.loss_mask].tolist())
    replies = "".join(SpatialDataset(0)[i].meta["answer"] + "<|im_end|>" for i in sorted(range(4)))
    assert text == replies


def test_packed_loss_equals_unpacked():
    cfg = build_model_config("seedvl-tiny", TOK)
    torch.manual_seed(0)
    model = SeedVLM(cfg).eval()
    pool = SamplePool(_encoded(5, seed=2))
    order = np.array([4, 1, 2, 0, 3])

    def logits_and_ce(batch):
        out = model(
            batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, **batch.vision_inputs()
        )
        ce = torch.nn.functional.cross_entropy(
            out.logits, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return out.logits, ce

    with torch.no_grad():
        packed = pool.collate(order, min_level=LEVEL_PROMPT, image_token_id=TOK.image_token_id)
        logits, ce_packed = logits_and_ce(packed)
        assert_close(
            ce_packed,
            micro_batch_loss(model(**packed.model_inputs()), packed.labels, targets=1, accum=1, llm=cfg.llm)[
                0
            ],
            "trainer CE",
            atol=0,
            rtol=0,
        )
        cu, ce_singles = packed.cu_seqlens.tolist(), []
        for k, m in enumerate(order):
            one = pool.collate(np.array([m]), min_level=LEVEL_PROMPT, image_token_id=TOK.image_token_id)
            single_logits, ce = logits_and_ce(one)
            ce_singles.append(ce)
            assert_close(
                logits[cu[k] : cu[k + 1]], single_logits, f"document {k} logits", atol=1e-5, rtol=1e-5
            )
    assert_close(
        ce_packed, torch.stack(ce_singles).sum(), "packed vs one-by-one summed CE", atol=1e-4, rtol=1e-5
    )


def test_stream_resumes_mid_window():
    ds = SpatialDataset(1)
    stream = BatchStream(ds, TOK, seed=5, window=24)
    it = stream.batches(Position(), 700, min_level=LEVEL_PROMPT)
    run = [next(it) for _ in range(12)]
    assert {p.window for _, p in run} >= {0, 1}, "the run crosses a window boundary"
    for k in (2, 7):
        resumed = BatchStream(ds, TOK, seed=5, window=24).batches(run[k][1], 700, min_level=LEVEL_PROMPT)
        for (want, wpos), (got, gpos) in zip(run[k + 1 :], resumed, strict=False):
            assert wpos == gpos
            assert got.sample_ids == want.sample_ids
            for f in dataclasses.fields(want):
                a, b = getattr(got, f.name), getattr(want, f.name)
                assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


def test_stream_drops_over_long_samples(caplog):
    ds = SpatialDataset(0)
    stream = BatchStream(ds, TOK, seed=0, window=16, encode=EncodeConfig(max_pixels=112 * 112))
    lengths = [s.length for s in stream.encode_window(0, 10_000)]
    budget = int(np.median(lengths))
    with caplog.at_level("WARNING", logger="trainer.data"):
        kept = stream.encode_window(0, budget)
    assert 0 < len(kept) < 16 and all(s.length <= budget for s in kept)
    assert stream.skips.counts["too long"] == 16 - len(kept)
    assert f"exceed the step's token budget of {budget}" in caplog.text
