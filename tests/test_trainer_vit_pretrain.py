"""ViT pre-training: masking under packing, the MIM / SigLIP / SuperClass losses against hand-computed
values, HOG, the heads' packing, the Hugging Face teacher loader, and a tiny run of ``--recipe vit``
whose ViT loads into the VLM."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.config import ViTConfig, get_preset
from model.preprocess import pack_images, patchify
from model.vit import SeedViT
from model.vit_heads import (
    AttentionPool,
    MIMDecoder,
    PretrainConfig,
    SeedViTPretrain,
    SigLIPHead,
    TextEncoder,
)
from tests.utils import assert_close, tol
from trainer.config import RunConfig, SetupError
from trainer.vit_pretrain import data as vit_data
from trainer.vit_pretrain import loop as vit_loop
from trainer.vit_pretrain import losses as vit_losses
from trainer.vit_pretrain.data import CaptionTokenizer, objects_caption, pack_text, scene_caption
from trainer.vit_pretrain.export import load_pretrained_vit
from trainer.vit_pretrain.losses import (
    hog,
    idf_weights,
    mask_packed,
    mim_loss,
    patch_colour,
    same_caption,
    siglip_loss,
    superclass_loss,
)
from trainer.vit_pretrain.teacher import HFTeacher, HOGTargets, unpatchify

VIT = get_preset("vit-tiny")
F32 = tol(torch.float32, 10)


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ims = [
        patchify(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g), size=(h, w))
        for h, w in sizes
    ]
    return ims, pack_images(ims)


# ----------------------------------------------------------------------------- masking under packing


def test_mask_packed_keeps_a_quarter_of_each_image_inside_it():
    cu = torch.tensor([0, 4, 4, 52, 60, 61], dtype=torch.int32)  # 4, empty, 48, 8, 1 patches
    keep, masked, cu_keep, max_keep = mask_packed(cu, 0.75, torch.Generator().manual_seed(1))
    assert cu_keep.tolist() == [0, 1, 1, 13, 15, 16]  # max(1, round(n / 4)) each, none of the empty one
    assert max_keep == 12
    assert torch.equal(torch.sort(torch.cat([keep, masked])).values, torch.arange(61))
    assert torch.all(keep.diff() > 0) and torch.all(masked.diff() > 0)
    image_of = torch.repeat_interleave(torch.arange(5), cu.diff().long())
    kept_per_image = torch.bincount(image_of[keep], minlength=5)
    assert kept_per_image.tolist() == cu_keep.diff().tolist()
    other = mask_packed(cu, 0.75, torch.Generator().manual_seed(2))[0]
    assert not torch.equal(keep, other)  # a different draw masks other patches
    with pytest.raises(ValueError, match="ratio"):
        mask_packed(cu, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mask_packed(cu.long(), 0.5)


def test_masked_encoder_and_decoder_do_not_depend_on_packing():
    """Kept patches keep their own 2D RoPE positions; each image of the packed batch encodes and
    decodes as it would alone, and moving a kept patch's position changes its output."""
    torch.manual_seed(0)
    vit, dec = SeedViT(VIT).eval(), MIMDecoder(VIT, 12).eval()
    ims, packed = _images([(28, 56), (84, 28), (56, 56)])
    keep, _, cu_keep, max_keep = mask_packed(packed.cu_seqlens, 0.75, torch.Generator().manual_seed(3))
    with torch.no_grad():
        enc = vit(packed.patches[keep], packed.pos_hw[keep], cu_keep, max_keep)
        pred = dec(enc, keep, packed.pos_hw, packed.cu_seqlens, packed.max_seqlen)
        assert pred.shape == (packed.patches.shape[0], 12)
        cu = packed.cu_seqlens.tolist()
        for i, im in enumerate(ims):
            mine = keep[(keep >= cu[i]) & (keep < cu[i + 1])]
            local = mine - cu[i]
            n = im.patches.shape[0]
            one_cu = torch.tensor([0, local.numel()], dtype=torch.int32)
            alone = vit(im.patches[local], im.pos_hw[local], one_cu, local.numel())
            rows = slice(int(cu_keep[i]), int(cu_keep[i + 1]))
            assert_close(enc[rows], alone, f"encoder, image {i}", **F32)
            dec_alone = dec(alone, local, im.pos_hw, torch.tensor([0, n], dtype=torch.int32), n)
            assert_close(pred[cu[i] : cu[i + 1]], dec_alone, f"decoder, image {i}", **F32)
        shifted = packed.pos_hw[keep].clone()
        shifted[0, 1] += 3  # RoPE sees relative positions: move one kept patch against the others
        moved = vit(packed.patches[keep], shifted, cu_keep, max_keep)
        assert (moved[:1] - enc[:1]).abs().max() > 1e-4


def test_mim_loss_is_the_mean_cosine_distance_at_masked_rows():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = torch.tensor([[5.0, 5.0], [-1.0, -1.0], [0.0, 1.0]])
    # rows 1 and 2: cos = -1 and 1 -> distances 2 and 0; row 0 is kept and not scored
    assert mim_loss(pred, target, torch.tensor([1, 2])).item() == pytest.approx(1.0, abs=1e-6)
    assert mim_loss(pred, target, torch.tensor([1, 2]), total=4).item() == pytest.approx(0.5, abs=1e-6)
    assert mim_loss(pred, target, torch.tensor([], dtype=torch.long)).item() == 0.0


def test_hog_bins_edges_by_orientation():
    patch = torch.zeros(14, 14, 3)
    patch[:, 7:] = 1.0  # a vertical edge: horizontal gradient, orientation 0 -> bins 8 and 0 (soft)
    h = hog(patch.reshape(1, -1)).view(3, 2, 2, 9)
    assert h.shape == (3, 2, 2, 9)
    assert torch.norm(h).item() == pytest.approx(1.0, abs=1e-5)
    energy = h.sum((0, 1, 2))
    assert energy[[0, 8]].sum() == pytest.approx(energy.sum().item(), rel=1e-6)
    assert energy[0].item() == pytest.approx(energy[8].item(), rel=1e-5)
    flat = torch.zeros(14, 14, 3)
    flat[7:] = 1.0  # a horizontal edge: orientation pi/2 -> bin 4
    energy = hog(flat.reshape(1, -1)).view(3, 2, 2, 9).sum((0, 1, 2))
    assert energy[4].item() == pytest.approx(energy.sum().item(), rel=1e-6)


def test_teacher_free_targets_are_hog_then_the_mean_colour():
    red, blue = torch.zeros(14, 14, 3), torch.zeros(14, 14, 3)
    red[..., 0], blue[..., 2] = 1.5, -0.5  # flat patches: no gradients, so only the colour part
    edged = torch.zeros(14, 14, 3)
    edged[:, 7:] = torch.tensor([0.2, -1.0, 0.4])
    patches = torch.stack([red, blue, edged]).reshape(3, -1)
    targets = HOGTargets()(SimpleNamespace(patches=patches))  # it reads the packed patches only
    assert targets.shape == (3, HOGTargets.feature_dim) == (3, 111)
    want_hog = hog(patches)
    assert torch.equal(targets[:, :108], want_hog) and want_hog[:2].abs().max() == 0
    w = vit_losses.COLOUR_WEIGHT
    assert_close(targets[0, 108:], torch.tensor([w, 0.0, 0.0]), "red", **tol(torch.float32))
    assert_close(targets[1, 108:], torch.tensor([0.0, 0.0, -w]), "blue", **tol(torch.float32))
    mean = torch.tensor([0.1, -0.5, 0.2])  # half the patch holds the colour
    assert_close(targets[2, 108:], w * mean / mean.norm(), "edged", **tol(torch.float32))
    assert patch_colour(torch.zeros(2, 588)).abs().max() == 0  # a zero mean has no direction


# ----------------------------------------------------------------------------- contrastive losses


def test_siglip_loss_hand_computed():
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    head = SigLIPHead()  # t = log 10, b = -10
    logits = head(image, text)
    # cosines 1, 0.6 / 0, 0.8 -> logits 0, -4 / -10, -2; positives on the diagonal
    assert logits.tolist() == [pytest.approx([0.0, -4.0], abs=1e-5), pytest.approx([-10.0, -2.0], abs=1e-5)]
    log_sig = lambda z: -math.log1p(math.exp(-z))
    expected = -(log_sig(0.0) + log_sig(4.0) + log_sig(10.0) + log_sig(-2.0)) / 2
    assert siglip_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    both = torch.ones(2, 2, dtype=torch.bool)  # every pair a positive
    expected = -(log_sig(0.0) + log_sig(-4.0) + log_sig(-10.0) + log_sig(-2.0)) / 2
    assert siglip_loss(logits, both).item() == pytest.approx(expected, rel=1e-6)
    # A rank's rows against every caption, over the global count: the ranks' losses sum to the whole.
    eye = torch.eye(2, dtype=torch.bool)
    shares = [siglip_loss(head(image[r : r + 1], text), eye[r : r + 1], n=2) for r in range(2)]
    assert sum(shares).item() == pytest.approx(siglip_loss(logits).item(), rel=1e-6)
    assert same_caption(["a cube", "two objects", "a cube"]).tolist() == [
        [True, False, True],
        [False, True, False],
        [True, False, True],
    ]
    with pytest.raises(ValueError, match="image, text"):
        head(image, text[:, :1])
    with pytest.raises(ValueError, match="positives: needed"):
        siglip_loss(logits[:1])
    with pytest.raises(ValueError, match="positives: expected"):
        siglip_loss(logits, both[:1])


def test_superclass_loss_hand_computed():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]))  # softmax 1/6, 2/6, 3/6
    bags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    idf = torch.tensor([1.0, 5.0, 3.0])
    # caption 0: weights 1/4 and 3/4 on classes 0 and 2; caption 1 has no words: 0
    expected = (0.25 * math.log(6) + 0.75 * math.log(2) + 0.0) / 2
    assert superclass_loss(logits, bags, idf).item() == pytest.approx(expected, rel=1e-6)
    halves = [superclass_loss(logits[r : r + 1], bags[r : r + 1], idf, n=2) for r in range(2)]
    assert sum(halves).item() == pytest.approx(expected, rel=1e-6)
    df_bags = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    expected_idf = [0.0, math.log(4 / 2), math.log(4 / 1)]  # log(4/5) < 0 is clamped to 0
    assert idf_weights(df_bags).tolist() == pytest.approx(expected_idf, rel=1e-6)


def test_captions_tokenise_and_bag(monkeypatch):
    from trainer.data.spatial import sample_scene
    from trainer.vit_pretrain.data import IMAGE_SCENES

    tok = CaptionTokenizer(buckets=16)
    assert tok.encode("A red cube, three objects") == tok.encode("a red cube three objects")
    assert len(set(tok.encode("red green blue yellow purple cyan orange gray sphere cube cylinder"))) == 11
    scene = sample_scene(np.random.default_rng(0), IMAGE_SCENES)
    caption = scene_caption(scene, np.random.default_rng(1))
    assert [o.name for o in scene.objects] == ["gray sphere"]
    assert caption == "one object: one sphere, a gray sphere"
    monkeypatch.setattr(vit_data, "SUMMARY_SHARE", 0.5)  # then half of them say it without the shapes
    assert scene_caption(scene, np.random.default_rng(1)) == "one object, a gray sphere"
    assert scene_caption(scene, np.random.default_rng(2)) == caption
    batch = pack_text([caption, "a cube", ""], tok)
    assert batch.cu_seqlens.tolist()[-1] == batch.ids.numel()
    assert batch.bags[1].sum().item() == 2 and batch.bags[2].sum().item() == 1  # "" -> "a"


def test_captions_state_the_count_of_each_shape():
    objects = [("red", "cube"), ("blue", "sphere"), ("gray", "cube")]
    assert objects_caption(objects, False) == "three objects, a red cube, a blue sphere, a gray cube"
    assert (
        objects_caption(objects, True)
        == "three objects: one sphere and two cubes, a red cube, a blue sphere, a gray cube"
    )
    assert objects_caption(
        [("red", "cube"), ("cyan", "cylinder"), ("green", "sphere"), ("red", "sphere")], True
    ) == (
        "four objects: two spheres, one cube and one cylinder, "
        "a red cube, a cyan cylinder, a green sphere, a red sphere"
    )
    assert objects_caption([], True) == "zero objects"


def test_image_and_clip_captions_keep_separate_statistics():
    torch.manual_seed(0)
    model = SeedViTPretrain(PretrainConfig(VIT, 50, 12))
    ids, cu = torch.randint(0, 50, (9,)), torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    model.encode_text(ids, cu, 4, video=True)
    assert model.text_norm.num_batches_tracked.item() == 0
    assert model.video_text_norm.num_batches_tracked.item() == 1
    model.encode_text(ids, cu, 4)
    assert model.text_norm.num_batches_tracked.item() == 1
    model.eval()
    with torch.no_grad():  # in evaluation each uses its own running statistics
        raw = model.text(ids, cu, 4)
        for norm, video in ((model.text_norm, False), (model.video_text_norm, True)):
            expected = (raw - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
            assert_close(model.encode_text(ids, cu, 4, video=video), expected, f"video={video}", **F32)


def test_attention_pool_and_text_encoder_pack_independently():
    torch.manual_seed(0)
    pool, text = AttentionPool(VIT, 8).eval(), TextEncoder(VIT, 50, 8).eval()
    x = torch.randn(9, VIT.width)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)  # the second sequence is empty
    ids = torch.randint(0, 50, (9,))
    with torch.no_grad():
        pooled, encoded = pool(x, cu, 5), text(ids, cu, 5)
        for i, (a, b) in enumerate([(0, 4), (4, 9)]):
            one = torch.tensor([0, b - a], dtype=torch.int32)
            row = (0, 2)[i]
            assert_close(pooled[row], pool(x[a:b], one, b - a)[0], f"pool {i}", **F32)
            assert_close(encoded[row], text(ids[a:b], one, b - a)[0], f"text {i}", **F32)
    assert pooled.shape == (3, 8) and torch.isfinite(pooled).all() and torch.isfinite(encoded).all()


# ----------------------------------------------------------------------------- the teacher


def test_unpatchify_inverts_patchify():
    image = torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8)
    p = patchify(image, size=(56, 84))
    pixels = unpatchify(p.patches, *p.grid_hw)
    expected = (image.float() / 255 - torch.tensor((0.48145466, 0.4578275, 0.40821073))) / torch.tensor(
        (0.26862954, 0.26130258, 0.27577711)
    )
    assert_close(pixels, expected, "unpatchify", **F32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
        image_size=28, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).eval()
    path = tmp_path_factory.mktemp("clip_teacher")
    model.save_pretrained(path)
    return model, path


def test_hf_clip_teacher_gives_one_feature_per_student_patch(clip_dir):
    model, path = clip_dir
    teacher = HFTeacher(path)
    assert teacher.feature_dim == 32 and teacher.family == "clip"
    ims, packed = _images([(28, 56), (56, 28)], seed=4)
    feats = teacher(packed)
    assert feats.shape == (packed.patches.shape[0], 32)
    # The first image by hand: its pixels through CLIP at 28x56, class token dropped, and the
    # 2 x 4 grid in 2x2-window order (rows 0-1 of columns 0-1, then of columns 2-3).
    pixels = unpatchify(ims[0].patches, 2, 4).permute(2, 0, 1)[None]  # CLIP's normalisation already
    with torch.no_grad():
        hidden = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[0, 1:]
    grid = hidden.view(2, 4, 32)
    expected = torch.stack(
        [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1], grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]]
    )
    assert_close(feats[:8], expected, "CLIP teacher features", **F32)


def test_hf_qwen2_vl_vision_teacher_matches_seedvit(tmp_path):
    pytest.importorskip("transformers")
    from model.hf_vision import save_qwen2_vl_vision

    torch.manual_seed(0)
    vit = SeedViT(VIT).eval()
    with torch.no_grad():
        vit.patch_embed.bias.zero_()  # Qwen2-VL's patch embedding has no bias
    save_qwen2_vl_vision(vit, tmp_path)
    teacher = HFTeacher(tmp_path)
    _, packed = _images([(28, 56), (56, 56)], seed=5)
    with torch.no_grad():
        ours = vit(packed.patches, packed.pos_hw, packed.cu_seqlens, packed.max_seqlen)
    assert_close(teacher(packed), ours, "Qwen2-VL teacher vs SeedViT", **tol(torch.float32, 100))


def test_hf_teacher_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        HFTeacher(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="vision tower on its own"):
        HFTeacher(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="CLIP, SigLIP or Qwen2-VL"):
        HFTeacher(tmp_path)


# ----------------------------------------------------------------------------- recipes and a tiny run


def test_full_recipe_splits_overrides_and_orders_stages(tmp_path):
    vit, vlm = vit_loop._split_overrides(["vit_mim.steps=3", "stage1.lr_max=1e-3", "*.grad_clip=0.5"])
    assert vit == ["vit_mim.steps=3", "*.grad_clip=0.5"]
    assert vlm == ["stage1.lr_max=1e-3", "*.grad_clip=0.5"]
    with pytest.raises(SetupError, match="must come before"):
        vit_loop.train_recipe(RunConfig(recipe="stage0,vit_mim"), train_vlm=None)
    with pytest.raises(SetupError, match=r"--data vst:single=1: ViT pre-training reads captioned images"):
        vit_loop.ViTRun(RunConfig(recipe="vit", data="vst:single=1", out=str(tmp_path / "vit")))
    with pytest.raises(SetupError, match=r"--parallel cp=2: ViT pre-training is data parallel only"):
        vit_loop.ViTRun(RunConfig(recipe="vit", parallel="cp=2", out=str(tmp_path / "vit")))
    with pytest.raises(
        SetupError, match=r"--parallel dp=2,cp=1,ep=1 needs 2 processes: launch with torchrun"
    ):
        vit_loop.ViTRun(RunConfig(recipe="vit", parallel="dp=2", out=str(tmp_path / "vit")))
    scaled = vit_loop.scale_vit_stages(vit_loop.get_recipe("vit"), VIT)
    assert [s.lr_max for s in scaled] == pytest.approx([5e-3, 5e-3, 5e-4])  # x 1280/64 x 2.5 or 0.5, capped


def test_tiny_vit_recipe_writes_zero_shot_scores_and_a_loadable_vit(tmp_path, monkeypatch):
    for name, value in (
        ("IMAGE_BANK", 24),
        ("VIDEO_BANK", 4),
        ("ZERO_SHOT_PER_CLASS", 2),
        ("IDF_CAPTIONS", 32),
    ):
        monkeypatch.setattr(vit_loop, name, value)
    from trainer.loop import train

    out = tmp_path / "vit"
    cfg = RunConfig(
        recipe="vit", out=out, progress=False, tensorboard=False, eval_every=0,
        overrides=["vit_mim.steps=2", "vit_contrastive.steps=2", "vit_video.steps=1", "*.seq_len=400"],
    )  # fmt: skip
    summary = train(cfg)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 5 == summary["steps"]
    assert set(saved["zero_shot"]) == {"shape", "colour", "count", "motion"}
    for v in saved["zero_shot"].values():
        assert 0 <= v["top1"] <= 1 and v["chance"] == pytest.approx(v["top1"] - v["above_chance"])
    assert [s["stage"] for s in saved["stages"]] == ["vit_mim", "vit_contrastive", "vit_video"]
    assert Path(saved["gallery"]).is_file() and Path(saved["loss_plot"]).is_file()
    from safetensors.torch import load_file

    vlm_vit = SeedViT(get_preset("seedvl-tiny").vit)
    load_pretrained_vit(out, vlm_vit)
    on_disk = load_file(str(out / "seedvit" / "model.safetensors"))
    for name, value in vlm_vit.state_dict().items():
        assert torch.equal(value, on_disk[name]), name
    narrower = SeedViT(ViTConfig(width=32, depth=3, num_heads=2, head_dim=16))
    with pytest.raises(ValueError, match="width 64"):
        load_pretrained_vit(out, narrower)


# ----------------------------------------------------------------------------- data parallelism

TINY_BANKS = (("IMAGE_BANK", 24), ("VIDEO_BANK", 6), ("ZERO_SHOT_PER_CLASS", 2), ("IDF_CAPTIONS", 32))
# Batches of 4-6 images, or 3-4 clips and as many images beside them.
DP_OVERRIDES = [
    "vit_mim.steps=2", "vit_contrastive.steps=2", "vit_video.steps=2",
    "*.seq_len=300", "vit_video.seq_len=1800",
]  # fmt: skip
# The first step's gradients of each stage, ranks against one process, relative to each tensor's
# largest entry. Measured: at most 2.3e-5 (pool.norm.bias; the ranks run the ViT over other
# packings, and the batch normalisation of a handful of nearly parallel embeddings magnifies that
# rounding). Dividing a rank's SigLIP share by its own image count instead of the batch's moved
# them by 1.0.
GRAD_RTOL = 2e-4


def test_shard_bounds_cut_contiguous_shares_of_about_equal_patches():
    assert vit_data.shard_bounds([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert vit_data.shard_bounds([30, 5, 5, 5, 5], 2) == [(0, 1), (1, 5)]  # 30 | 20, not 35 | 15
    assert vit_data.shard_bounds([1, 1, 1, 100], 3) == [(0, 2), (2, 3), (3, 4)]  # one item each at least
    assert vit_data.shard_bounds([7, 3], 1) == [(0, 2)]
    assert vit_data.shard_bounds([0, 0, 0], 3) == [(0, 1), (1, 2), (2, 3)]  # empty images are items too
    bounds = vit_data.shard_bounds(list(range(1, 40)), 4)
    assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]] and bounds[-1][1] == 39
    with pytest.raises(ValueError, match="a step of 2 items for 3 ranks"):
        vit_data.shard_bounds([5, 5], 3)


def _dp_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    for name, value in TINY_BANKS:
        setattr(vit_loop, name, value)


def _vit_cfg(out: Path, **kw) -> RunConfig:
    return RunConfig(
        recipe="vit", out=out, progress=False, tensorboard=False, eval_every=0, ckpt_every=3, keep=10,
        overrides=DP_OVERRIDES, **kw,
    )  # fmt: skip


def _first_step_grads(out: Path, mixed_precision: str = "fp32") -> None:
    """Full gradients of the first step of each ViT stage from the initial weights, each stage's
    loss (rank 0's share under torchrun), and the dtypes the ViT computed in and the weights and
    gradients are kept in; rank 0 saves them."""
    from torch.distributed.tensor import DTensor

    run = vit_loop.ViTRun(_vit_cfg(out / "run", eval_samples=0, mixed_precision=mixed_precision))
    grads, losses, dtypes = {}, {}, set()
    hook = run.model.vit.register_forward_hook(lambda m, args, out: dtypes.add(f"vit out {out.dtype}"))
    try:
        for index, stage in enumerate(run.stages):
            run.state.update(stage_index=index, stage_step=0)
            run._enter(index)
            loss, _, _, _ = run.forward(stage)
            loss.backward()
            losses[stage.name] = loss.item()
            for name, p in run.model.named_parameters():
                dtypes.add(f"param {p.dtype}")
                if p.grad is not None:
                    g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                    grads[f"{stage.name}/{name}"] = g.detach().clone()
                    dtypes.add(f"grad {g.dtype}")
            run.optimizer.zero_grad(set_to_none=True)
        if run.rank == 0:
            torch.save({"grads": grads, "losses": losses, "dtypes": dtypes}, out / "grads.pt")
    finally:
        hook.remove()
        run.close()


def _grads_worker(rank: int, world_size: int, port: int, out: str, mixed_precision: str) -> None:
    _dp_env(rank, world_size, port)
    _first_step_grads(Path(out), mixed_precision)


def _run_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _dp_env(rank, world_size, port)
    vit_loop.train_recipe(_vit_cfg(Path(out)), train_vlm=None)


@pytest.mark.dist
def test_data_parallel_vit_stages_give_the_single_process_gradients(tmp_path, monkeypatch):
    """Two gloo ranks, each embedding half of the batch: after gathering both towers' rows (and the
    batch-norm statistics) and summing the ranks' shares of the losses, every parameter's gradient
    is the one process's, in each of the three stages."""
    from tests.dist_utils import spawn

    for name, value in TINY_BANKS:
        monkeypatch.setattr(vit_loop, name, value)
    (tmp_path / "single").mkdir()
    (tmp_path / "dp2").mkdir()
    _first_step_grads(tmp_path / "single")
    spawn(_grads_worker, 2, str(tmp_path / "dp2"), "fp32")
    ref = torch.load(tmp_path / "single" / "grads.pt")["grads"]
    got = torch.load(tmp_path / "dp2" / "grads.pt")["grads"]
    assert ref.keys() == got.keys()
    for stage, head in (("vit_mim", "mim."), ("vit_contrastive", "siglip."), ("vit_video", "time.")):
        assert any(k.startswith(f"{stage}/{head}") for k in ref), f"{stage}: {head} got gradients"
    for name, g in ref.items():
        scale = g.abs().max().item()
        err = (got[name] - g).abs().max().item()
        assert err <= GRAD_RTOL * max(scale, 1e-12), f"{name}: max error {err:.2e} (scale {scale:.2e})"


# bf16 against fp32, the first step of each stage from the same weights and batch: the error of a
# stage's whole gradient relative to its norm. Measured: 0.004 (MIM), 0.069 (contrastive) and 0.040
# (video) in one process; 0.004, 0.070 and 0.048 over two ranks. Single tensors can differ by more
# than their size (the ViT's norm biases in the video stage): the batch normalisation of a handful
# of nearly parallel embeddings at init magnifies rounding (see GRAD_RTOL), and bf16 keeps 8
# mantissa bits to fp32's 24.
BF16_GRAD_RTOL = 0.15
BF16 = {"vit out torch.bfloat16", "param torch.float32", "grad torch.float32"}


def _stage_errors(ref: dict, got: dict) -> dict[str, float]:
    errors = {}
    for stage in ("vit_mim", "vit_contrastive", "vit_video"):
        keys = [k for k in ref if k.startswith(f"{stage}/")]
        a, b = (torch.cat([g[k].flatten() for k in keys]) for g in (ref, got))
        errors[stage] = ((b - a).norm() / a.norm()).item()
    return errors


@pytest.mark.dist
def test_bf16_vit_stages_follow_fp32_in_one_process_and_over_two_ranks(tmp_path, monkeypatch):
    """``--mixed-precision bf16``: the towers compute in bf16 (one process: autocast; two gloo
    ranks: FSDP's bf16 gathers) while weights and gradients stay fp32, and each stage's first step
    follows fp32's: the loss within 1e-2, the gradient within BF16_GRAD_RTOL."""
    from tests.dist_utils import spawn

    for name, value in TINY_BANKS:
        monkeypatch.setattr(vit_loop, name, value)
    for run in ("fp32", "bf16", "dp2"):
        (tmp_path / run).mkdir()
    _first_step_grads(tmp_path / "fp32")
    _first_step_grads(tmp_path / "bf16", "bf16")
    spawn(_grads_worker, 2, str(tmp_path / "dp2"), "bf16")
    ref, one, two = (torch.load(tmp_path / run / "grads.pt") for run in ("fp32", "bf16", "dp2"))
    assert ref["dtypes"] == {"vit out torch.float32", "param torch.float32", "grad torch.float32"}
    assert one["dtypes"] == BF16 and two["dtypes"] == BF16
    for stage, loss in ref["losses"].items():
        assert one["losses"][stage] == pytest.approx(loss, rel=1e-2), stage
        assert one["losses"][stage] != loss, f"{stage}: bf16 computed nothing in bf16"
    for what, got in (("one process", one), ("two ranks", two)):
        assert got["grads"].keys() == ref["grads"].keys()
        for stage, err in _stage_errors(ref["grads"], got["grads"]).items():
            assert 0 < err <= BF16_GRAD_RTOL, f"{what}, {stage}: gradient error {err:.3f}"


def test_siglip_logits_stay_fp32_under_autocast():
    head = SigLIPHead()
    x, t = torch.randn(5, 16), torch.randn(7, 16)
    want = head(x, t)
    with torch.autocast("cpu", torch.bfloat16):
        got = head(x, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.dist
def test_data_parallel_vit_recipe_runs_the_single_process_batches(tmp_path, monkeypatch):
    """``--recipe vit`` on two ranks: the same global batches step by step, losses that agree
    (relative 1e-2: AdamW's first steps turn the rounding of near-zero gradients into differences
    of up to 3e-4 in single weights, which the later steps carry), rank 0's summary with zero-shot
    scores and a ViT that loads into the VLM, and one checkpoint shard per rank."""
    from tests.dist_utils import spawn

    for name, value in TINY_BANKS:
        monkeypatch.setattr(vit_loop, name, value)
    vit_loop.train_recipe(_vit_cfg(tmp_path / "single"), train_vlm=None)
    spawn(_run_worker, 2, str(tmp_path / "dp2"))

    def steps(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r and "stage" in r]

    single, dp = steps("single"), steps("dp2")
    assert [r["stage"] for r in single] == ["vit_mim"] * 2 + ["vit_contrastive"] * 2 + ["vit_video"] * 2
    assert [r["step"] for r in dp] == [r["step"] for r in single]
    for s, d in zip(single, dp, strict=True):
        assert (d["tokens"], d["images"]) == (s["tokens"], s["images"]), f"step {s['step']}: batch"
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-2), f"step {s['step']} {s['stage']}"
    assert single[0]["loss"] == pytest.approx(dp[0]["loss"], rel=1e-6)  # the same weights and batch
    summary = json.loads((tmp_path / "dp2" / "summary.json").read_text())
    assert set(summary["zero_shot"]) == {"shape", "colour", "count", "motion"}
    assert summary["host"]["device"] == "cpu" and summary["host"]["threads"] >= 1
    load_pretrained_vit(tmp_path / "dp2", SeedViT(get_preset("seedvl-tiny").vit))
    shards = sorted(p.name for p in (tmp_path / "dp2" / "checkpoints" / "step_00000006").glob("*.distcp"))
    assert len(shards) == 2, shards

    # Saved by the two ranks after step 3 (mid-stage), resumed in one process: DCP reshards the
    # model and the optimizer, and the run goes on with the same batches and losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "dp2", resumed)
    for ckpt in (resumed / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > 3:
            shutil.rmtree(ckpt)
    (resumed / "checkpoints" / "latest").write_text("step_00000003\n")
    log = [
        line
        for line in (resumed / "log.jsonl").read_text().splitlines()
        if json.loads(line).get("step", 0) <= 3
    ]
    (resumed / "log.jsonl").write_text("\n".join(log) + "\n")
    vit_loop.train_recipe(_vit_cfg(resumed, resume=True), train_vlm=None)
    assert "resumed from" in (resumed / "train.log").read_text()
    after = steps("resumed")
    assert [r["step"] for r in after] == [r["step"] for r in dp]
    for d, r in zip(dp[3:], after[3:], strict=True):
        assert (r["tokens"], r["images"]) == (d["tokens"], d["images"]), f"step {d['step']}: batch"
        assert r["loss"] == pytest.approx(d["loss"], rel=1e-2), f"resumed, step {d['step']} {d['stage']}"


def _full_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _dp_env(rank, world_size, port)
    from trainer.loop import train

    vit_steps = ["vit_mim.steps=1", "vit_contrastive.steps=1", "vit_video.steps=1"]
    lengths = ["vit_mim.seq_len=300", "vit_contrastive.seq_len=300", "vit_video.seq_len=1800"]
    cfg = RunConfig(
        recipe="full", out=Path(out), progress=False, tensorboard=False, eval_every=0, eval_samples=4,
        steps=2, window=64, overrides=[*vit_steps, *lengths],
    )  # fmt: skip
    train(cfg)


@pytest.mark.dist
def test_full_recipe_under_torchrun(tmp_path):
    """``--recipe full`` on two ranks: the ViT stages data parallel, then the VLM stages from the
    pre-trained ViT in the same process group (leaving it and joining again raced: one rank could
    reach the old rendezvous store and hang in the VLM run's first barrier, 1 run in 3)."""
    from tests.dist_utils import spawn

    spawn(_full_worker, 2, str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["vit_pretrain"]["steps"] == 3 and set(summary["vit_pretrain"]["zero_shot"]) >= {"colour"}
    assert [s["stage"] for s in summary["stages"]] == ["stage0", "stage1", "stage2", "sft"]
    assert "initialised the ViT from the pre-trained ViT" in (tmp_path / "train.log").read_text()
