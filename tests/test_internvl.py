"""InternVL (tiles + thumbnail, pixel shuffle) on a tiny random-weight ``InternVLForConditionalGeneration``
(models and inputs: ``internvl_tiny.py``; keep-all = stock, batched = one by one, stock after exit and no
host sync in decode: ``test_conformance.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import IMAGE_TOKEN
from family_checks import (
    check_fastv_counts_and_kv_lengths,
    check_hand_written_decode_loop,
    check_mixed_batch_runs_as_groups,
    check_original_positions,
    check_parvts_subjects,
    eager_tower_attentions,
    layer0_input,
)
from internvl_tiny import (
    COUNTS,
    END,
    LAYERS,
    MIXED,
    NEW,
    SIZE,
    START,
    TILES,
    N,
    P,
    batch,
    inputs,
    prompt,
    tiny_internvl,
)

import vtprune
from vtprune.adapters import PatchGrid, adapter_for
from vtprune.adapters.internvl import InternVLAdapter
from vtprune.methods.st3 import annealed

pytestmark = pytest.mark.usefixtures("one_thread")


def generate(model, x, **kw):
    kw.setdefault("max_new_tokens", NEW)
    return model.generate(**x, do_sample=False, **kw)[:, -kw["max_new_tokens"]:]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


# ---------------------------------------------------------------- tokens per image size
@pytest.mark.parametrize("size", list(COUNTS))
def test_visual_tokens_per_image_follow_its_tiles(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(model)
    assert isinstance(adapter, InternVLAdapter) and adapter.tokens_per_image() is None
    assert adapter.tokens_per_tile == P and x["pixel_values"].shape[0] == TILES[size]
    visual = adapter.visual_index(x["input_ids"], x)
    ids = x["input_ids"][0]
    start = int((ids == IMAGE_TOKEN).nonzero()[0])
    assert visual.tolist() == [[list(range(start, start + COUNTS[size]))]]  # hand count = processor's
    assert ids[start - 1] == START and ids[start + COUNTS[size]] == END  # <img> ... </img>
    with torch.no_grad():  # = the model's own features: P per tile
        feats = model.model.get_image_features(x["pixel_values"]).pooler_output
    assert feats.shape[:2] == (TILES[size], P)


def test_merge_groups_are_the_2x2_patches_of_the_pixel_shuffle(model):
    groups = adapter_for(model).merge_groups()  # 8 x 8 patches -> 4 x 4 tokens of 4 patches
    hand = [sorted((2 * i + a) * 8 + 2 * j + b for a in (0, 1) for b in (0, 1)) for i in range(4) for j in range(4)]
    assert groups.sort(-1).values.tolist() == hand
    # and the model's feature of token t is the concatenation of those patches' features
    patches = torch.randn(1, 8, 8, 3, dtype=torch.float64)
    shuffled = model.model.pixel_shuffle(patches, scale_factor=0.5).reshape(16, 12)
    flat = patches.reshape(64, 3)
    for t in range(16):
        assert torch.equal(shuffled[t].reshape(4, 3).sort(0).values, flat[groups[t]].sort(0).values)


def test_image_tokens_that_disagree_with_the_tiles_raise(model):
    adapter = adapter_for(model)
    x = batch((0,))
    ids = x["input_ids"]
    first = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)  # one image token short: 47 is not 3 tiles of 16
    with pytest.raises(ValueError, match=r"is 16 image tokens .* per tile, got runs of \[\[47\]\]"):
        adapter.visual_index(short, {})
    with pytest.raises(ValueError, match=r"48 image tokens \(3 tiles of 16\), the call carries 2 tiles"):
        adapter.visual_index(ids, {"pixel_values": x["pixel_values"][:2]})
    with vtprune.apply(model, "fastv", budget=4), pytest.raises(ValueError, match="disagree"):
        generate(model, {**x, "pixel_values": x["pixel_values"][:2]}, max_new_tokens=2)


# ---------------------------------------------------------------- positions (1-D, original)
def test_kept_tokens_keep_original_positions_in_prefill_and_decode(model):
    check_original_positions(model, batch(), N)


def test_hand_written_decode_loop_without_position_ids_matches_generate(model):
    check_hand_written_decode_loop(model, batch((1,)))


# ---------------------------------------------------------------- per-layer counts and KV lengths
def test_fastv_counts_and_kv_lengths(model):
    check_fastv_counts_and_kv_lengths(model, batch(), N, NEW, LAYERS)


def test_st3_counts_step_by_step(model):
    with vtprune.apply(model, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=1) as run:
        generate(model, batch())
    g = [48, 34, 34, 24, 24, 17]  # ceil(0.7 * 48) = 34, ceil(0.7 * 34) = 24, ceil(0.7 * 24) = 17
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == g
    for t, counts in enumerate(run.ledger.decode_history, start=1):
        assert counts == [g[0]] + [annealed(g[layer], t, NEW, 0.25) for layer in range(1, LAYERS)], f"step {t}"


def test_parvts_counts_and_subjects(model):
    check_parvts_subjects(model, batch(), N, NEW, LAYERS)


@pytest.mark.parametrize("method", ["fastv", "parvts", "pool"])
def test_budget_is_per_image_over_all_its_tiles(model, method):
    with vtprune.apply(model, method, keep_ratio=0.25) as run:
        for size in [(32, 32), (32, 64), (64, 64)]:
            generate(model, inputs([prompt(3, 4, 0)], [[size]]), max_new_tokens=2)
            sample = run.report()["samples"][0]
            assert sample["visual_tokens_in"] == COUNTS[size]
            assert sample["final_budget"] <= math.ceil(0.25 * COUNTS[size])  # 4, 12, 20 (pool: at most)
            if method != "pool":
                assert sample["final_budget"] == math.ceil(0.25 * COUNTS[size])


# ---------------------------------------------------------------- several images, mixed tile counts
def test_two_images_in_one_prompt_each_pruned_separately(model):
    x = inputs([prompt(2, 3, 5, images=2), prompt(4, 6, 6, images=2)], [[SIZE, SIZE], [SIZE, SIZE]])
    stock = generate(model, x, max_new_tokens=6)
    with vtprune.apply(model, "none") as run:
        assert torch.equal(generate(model, x, max_new_tokens=6), stock)
    assert run.gen.visual_index.shape == (2, 2, N)
    assert torch.equal(run.gen.visual_index[:, 1, 0], run.gen.visual_index[:, 0, -1] + 3)  # </img> <img> between
    with vtprune.apply(model, "parvts", budget=5) as run:
        generate(model, x, max_new_tokens=6)
    assert run.report()["samples"][1]["visual_tokens_per_layer_prefill"][-1] == 10
    top = torch.topk(run.gen.saliency, 5, dim=-1).indices.sort(-1).values  # per image
    assert torch.equal(run.gen.cache_visual[5], torch.gather(run.gen.visual_index, 2, top))


def test_images_of_different_tile_counts_in_one_prompt_raise(model):
    x = inputs([prompt(2, 3, 5, images=2)], [[SIZE, (32, 32)]])
    with pytest.raises(ValueError, match=r"mismatched images.*\[\[48, 16\]\]"):
        with vtprune.apply(model, "fastv", budget=4):
            generate(model, x, max_new_tokens=2)


@pytest.mark.parametrize("method,opts", [("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 8}),
                                         ("visionzip", {"budget": 8}), ("pool", {"keep_ratio": 0.25}), ("none", {})])
def test_a_batch_of_mixed_tile_counts_runs_as_groups_and_equals_one_by_one(model, method, opts):
    prompts = [prompt(2 + b, 3 + 2 * b, 20 + b) for b in range(len(MIXED))]
    assert inputs(prompts, MIXED)["pixel_values"].shape[0] == 3 + 1 + 3 + 5  # the tiles of 48, 16, 48, 80 tokens
    check_mixed_batch_runs_as_groups(model, inputs, prompts, MIXED, method, opts, [48, 16, 48, 80], [[0, 2], [1], [3]])


# ---------------------------------------------------------------- saliency
def hand_merged_cls_attention(model, pixel_values) -> torch.Tensor:
    """[CLS] attention of every tile from the tower run eagerly (output_attentions, last block = feature
    layer -1), summed over heads, [CLS] column dropped, then summed over each 2 x 2 patch block."""
    attn = eager_tower_attentions(model, pixel_values)[-1]
    cls = attn[:, :, 0, 1:].sum(1).view(-1, 4, 2, 4, 2)  # [tiles, token row, patch row, token col, patch col]
    return cls.sum((2, 4)).flatten(1)  # [tiles, 16]


@pytest.mark.parametrize("call", ["generate", "forward"])
def test_saliency_is_eager_cls_attention_summed_over_each_merged_2x2(model, call):
    x = inputs([prompt(2, 3, 1, images=2), prompt(4, 2, 2, images=2)], [[SIZE, SIZE], [SIZE, SIZE]])
    with vtprune.apply(model, "parvts", budget=6) as run:
        if call == "generate":
            generate(model, x, max_new_tokens=1)
        else:
            with torch.no_grad():
                model(**x)
    assert run.gen.saliency.shape == (2, 2, N)
    expected = hand_merged_cls_attention(model, x["pixel_values"]).view(2, 2, N)  # 3 tiles an image, in order
    torch.testing.assert_close(run.gen.saliency, expected, atol=1e-5, rtol=1e-5)
    assert (expected.view(4, 3, P).sum(-1) <= 4 + 1e-5).all()  # each tile's: at most the 4 heads' sum


def test_saliency_needs_the_default_feature_strategy(model):
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
            vtprune.apply(model, "parvts", budget=4)
    finally:
        model.config.vision_feature_select_strategy = "default"
    assert not model._forward_pre_hooks


def test_hooks_are_removed_after_exit_and_after_exception(model):
    x = batch()
    stock = generate(model, x)
    attn = model.model.vision_tower.encoder.layer[-1].attention
    with pytest.raises(RuntimeError, match="boom"), vtprune.apply(model, "visionzip", budget=8):
        assert attn._forward_pre_hooks and model.model.language_model._forward_pre_hooks
        generate(model, x, max_new_tokens=2)
        raise RuntimeError("boom")
    assert not attn._forward_pre_hooks and not model._forward_pre_hooks
    assert not model.model.language_model._forward_pre_hooks
    assert torch.equal(generate(model, x), stock)


# ---------------------------------------------------------------- pool: one grid per tile
@pytest.mark.parametrize("size", list(COUNTS))
def test_grids_are_one_4x4_grid_per_tile(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(model)
    visual = adapter.visual_index(x["input_ids"], x)
    assert adapter.visual_grids(visual, x) == tuple(PatchGrid(4, 4, start=16 * t) for t in range(TILES[size]))
    assert adapter.visual_grids(visual, {}) == adapter.visual_grids(visual, x)  # from the token count alone


def test_pool_pools_every_tile_on_its_own(model):
    x = batch((0,))
    stock_h = layer0_input(model, x)
    with vtprune.apply(model, "pool", budget=12) as run:
        pooled_h = layer0_input(model, x)
    # 3 tiles of 4 x 4: least 1 each, spare 9 split 16:16:16 -> 4 per tile -> 2 x 2 windows of 2 x 2 tokens
    start = int(run.gen.visual_index[0, 0, 0])
    kept = [16 * t + c for t in range(3) for c in (0, 2, 8, 10)]  # window centres: top-left
    assert run.gen.visual[0, 0].tolist() == [start + k for k in kept]
    index = run.gen.layouts[0].index[0].tolist()
    vis = stock_h[0, start:start + N]
    for t in range(3):
        for r in (0, 2):
            for c in (0, 2):
                window = [16 * t + (r + a) * 4 + c + b for a in (0, 1) for b in (0, 1)]
                got = pooled_h[0, index.index(start + 16 * t + r * 4 + c)]
                torch.testing.assert_close(got, vis[window].mean(0))
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == [12] * LAYERS
