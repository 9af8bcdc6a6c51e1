"""LLaVA-OneVision (NeXT's any-resolution packing, ``anyres_max`` downsampling, single-tile images in
multi-image prompts, SigLIP without [CLS]) on a tiny random-weight ``LlavaOnevisionForConditionalGeneration``
(models and inputs: ``onevision_tiny.py``; keep-all = stock, batched = one by one, stock after exit and no
host sync in decode: ``test_conformance.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_TOKEN
from family_checks import (
    check_fastv_counts_and_kv_lengths,
    check_hand_written_decode_loop,
    check_mixed_batch_runs_as_groups,
    check_original_positions,
    check_parvts_subjects,
    eager_tower_attentions,
    generate,
    layer0_input,
)
from onevision_tiny import (
    COUNTS,
    DOWNSAMPLED,
    GRIDS,
    LAYERS,
    MIXED,
    MULTI,
    NEW,
    SIZE,
    VIDEO_TOKEN,
    N,
    P,
    batch,
    inputs,
    prompt,
    tiny_onevision,
)

import vtprune
from vtprune.adapters import PatchGrid, adapter_for
from vtprune.adapters.llava_next import NEWLINE
from vtprune.adapters.llava_onevision import MIXED as MIXED_TOKEN
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = [[(20, 40), SIZE], [(32, 32), (16, 64)]]  # two images per sample, of any sizes: 17 tokens each


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


# ---------------------------------------------------------------- token counts, packing, downsampling
@pytest.mark.parametrize("size", list(COUNTS))
def test_visual_tokens_per_image_follow_its_size(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaOnevisionAdapter) and adapter.tokens_per_image() is None
    visual = adapter.visual_index(x["input_ids"], x)
    start = int((x["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    assert visual.tolist() == [[list(range(start, start + COUNTS[size]))]]  # hand count = processor's
    with torch.no_grad():  # = the model's own packed feature length
        feats = model.model.get_image_features(x["pixel_values"], x["image_sizes"],
                                               batch_num_images=x["batch_num_images"]).pooler_output
    assert [f.shape[0] for f in feats] == [COUNTS[size]]
    source, _ = adapter.packing(size)
    rows, cols = GRIDS[size]
    assert source[:P].tolist() == list(range(P))  # the base tile first
    assert (source == NEWLINE).nonzero().flatten().tolist() == list(range(P + cols, COUNTS[size], cols + 1))
    hires = source[P:][source[P:] != NEWLINE]
    assert bool((hires == MIXED_TOKEN).all()) == (size in DOWNSAMPLED)  # downsampled tokens mix patches
    assert bool((hires >= P).all()) == (size not in DOWNSAMPLED)  # otherwise each is one patch of a tile


def test_each_image_of_a_multi_image_sample_is_one_tile_and_a_newline(model):
    x = inputs([prompt(3, 4, 0, images=2), prompt(2, 2, 1, images=2)], TWO)
    assert x["batch_num_images"].tolist() == [2, 2] and x["pixel_values"].shape[:2] == (4, 1)
    adapter = adapter_for(model)
    visual = adapter.visual_index(x["input_ids"], x)
    assert visual.shape == (2, 2, MULTI)
    source, tiles = adapter.packing(SIZE, tiled=False)
    assert tiles == 1 and source.tolist() == list(range(P)) + [NEWLINE]
    assert adapter.visual_grids(visual, x) == (PatchGrid(4, 4),)  # the newline is in no grid
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"], x["image_sizes"],
                                               batch_num_images=x["batch_num_images"]).pooler_output
    assert [f.shape[0] for f in feats] == [MULTI] * 4
    with pytest.raises(ValueError, match=r"batch_num_images \[3\] .* does not add up to the 4 images"):
        adapter.visual_index(x["input_ids"], {**x, "batch_num_images": torch.tensor([3])})


def test_token_count_disagreement_and_video_raise(model):
    adapter = adapter_for(model)
    x = batch((0,))
    ids = x["input_ids"]
    first = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)
    with pytest.raises(ValueError, match=r"disagree with the images: input_ids hold 45 .* need \[46\]"):
        adapter.visual_index(short, x)
    with pytest.raises(ValueError, match=r"video inputs are not supported \(got pixel_values_videos\)"):
        adapter.visual_index(ids, {**x, "pixel_values_videos": torch.zeros(1, 2, 3, 32, 32)})
    with_video = torch.cat([ids, torch.full((1, 1), VIDEO_TOKEN)], 1)
    with pytest.raises(ValueError, match=rf"video tokens \(video_token_id={VIDEO_TOKEN}\) in input_ids"):
        with vtprune.apply(model, "fastv", budget=4):
            generate(model, {**x, "input_ids": with_video, "attention_mask": torch.ones_like(with_video)}, 2)
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
            adapter_for(model).visual_index(ids, x)
    finally:
        model.config.vision_feature_select_strategy = "full"


# ---------------------------------------------------------------- positions, counts, groups
def test_kept_tokens_keep_original_positions_in_prefill_and_decode(model):
    check_original_positions(model, batch(), N)


def test_hand_written_decode_loop_without_position_ids_matches_generate(model):
    check_hand_written_decode_loop(model, batch((1,)))


def test_fastv_counts_and_kv_lengths(model):
    check_fastv_counts_and_kv_lengths(model, batch(), N, NEW, LAYERS)


def test_parvts_subjects_are_patches_never_newlines(model):
    top = check_parvts_subjects(model, batch(), N, NEW, LAYERS)
    source, _ = adapter_for(model).packing(SIZE)
    assert (source[top.flatten()] != NEWLINE).all()


@pytest.mark.parametrize("method,opts", [("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 8}),
                                         ("visionzip", {"budget": 8}), ("pool", {"keep_ratio": 0.25}), ("none", {})])
def test_a_batch_of_mixed_image_sizes_runs_as_groups_and_equals_one_by_one(model, method, opts):
    prompts = [prompt(2 + b, 3 + 2 * b, 20 + b) for b in range(len(MIXED))]
    check_mixed_batch_runs_as_groups(model, inputs, prompts, MIXED, method, opts, [46, 34, 46, 52], [[0, 2], [1], [3]])


@pytest.mark.parametrize("method,opts", [("none", {}), ("parvts", {"budget": 5}), ("pool", {"budget": 6}),
                                         ("pool", {"keep_ratio": 1.0})])
def test_multi_image_samples_batched_equal_one_by_one(model, method, opts):
    prompts = [prompt(3, 4, 0, images=2), prompt(2, 2, 1, images=2)]
    x = inputs(prompts, TWO)
    stock = generate(model, x, 4)
    with vtprune.apply(model, method, **opts) as run:
        together = generate(model, x, 4)
        counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
        for b in range(2):
            assert torch.equal(generate(model, inputs([prompts[b]], [TWO[b]], seed=10 * b), 4)[0], together[b])
    if method == "none" or opts.get("keep_ratio") == 1.0:
        assert torch.equal(together, stock) and counts == [2 * MULTI] * LAYERS
    else:
        assert counts[-1] < 2 * MULTI


# ---------------------------------------------------------------- saliency
def received_attention(model, pixel_values) -> torch.Tensor:
    """The attention each patch of every tile receives in SigLIP's last layer (feature layer -1), from the
    tower run eagerly (output_attentions): mean over heads and queries, FloatTensor [tiles, 16]."""
    return eager_tower_attentions(model, pixel_values)[-1].mean(1).mean(1)


# size -> (tiles, tile grid (rows, cols), unpadded rows, unpadded cols), read off the docstring of onevision_tiny
UNPAD = {(20, 40): (3, (1, 2), slice(0, 4), slice(0, 8)), (16, 64): (3, (1, 2), slice(1, 3), slice(0, 8)),
         (64, 48): (5, (2, 2), slice(0, 8), slice(1, 7)), (64, 64): (5, (2, 2), slice(0, 8), slice(0, 8))}


def hand_packed(per_tile: torch.Tensor, size) -> torch.Tensor:
    """Per-tile saliency packed by hand: base tile, then the tiles' patch map cropped to the unpadded rows
    and columns, bilinearly resized to the downsampled grid where ``anyres_max_2`` downsamples, -inf after
    each row."""
    _, (tile_rows, tile_cols), rows, cols = UNPAD[size]
    grid = per_tile[1:].view(tile_rows, tile_cols, 4, 4).permute(0, 2, 1, 3).reshape(4 * tile_rows, 4 * tile_cols)
    grid = grid[rows, cols]
    if size in DOWNSAMPLED:
        grid = F.interpolate(grid[None, None], size=GRIDS[size], mode="bilinear")[0, 0]
    with_newlines = torch.cat([grid, torch.full((grid.shape[0], 1), float("-inf"))], 1)
    return torch.cat([per_tile[0], with_newlines.flatten()])


@pytest.mark.parametrize("size", [(16, 64), (64, 48), (64, 64)])
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_saliency_is_attention_received_packed_like_the_features(model, size, call):
    x = inputs([prompt(2, 3, 1), prompt(4, 2, 2)], [[size], [size]])
    with vtprune.apply(model, "parvts", budget=6) as run:
        if call == "generate":
            generate(model, x, 1)
        else:
            with torch.no_grad():
                model(**x)
    assert run.gen.saliency.shape == (2, 1, COUNTS[size])
    tiles = UNPAD[size][0]
    for b in range(2):
        per_tile = received_attention(model, x["pixel_values"][b, :tiles])
        torch.testing.assert_close(per_tile.sum(-1), torch.ones(tiles))  # each tile's sums to 1
        expected, ours = hand_packed(per_tile, size), run.gen.saliency[b, 0]
        assert torch.equal(torch.isinf(ours), torch.isinf(expected))
        torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)], atol=1e-5, rtol=1e-5)


def test_saliency_of_a_multi_image_sample_is_each_tile_then_minus_inf(model):
    x = inputs([prompt(3, 4, 0, images=2), prompt(2, 2, 1, images=2)], TWO)
    with vtprune.apply(model, "visionzip", budget=6) as run:
        generate(model, x, 1)
    per_tile = received_attention(model, x["pixel_values"][:, 0]).view(2, 2, P)
    expected = torch.cat([per_tile, torch.full((2, 2, 1), float("-inf"))], -1)
    assert torch.equal(torch.isinf(run.gen.saliency), torch.isinf(expected))
    torch.testing.assert_close(run.gen.saliency[..., :P], per_tile, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- pool: base grid + (downsampled) grid
@pytest.mark.parametrize("size", list(GRIDS))
def test_grids_are_the_base_tile_and_the_unpadded_or_downsampled_grid(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(model)
    visual = adapter.visual_index(x["input_ids"], x)
    rows, cols = GRIDS[size]
    expected = (PatchGrid(4, 4), PatchGrid(rows, cols, start=P, stride=cols + 1))
    assert adapter.visual_grids(visual, x) == expected
    generate_kwargs = {k: x[k] for k in ("image_sizes", "batch_num_images")}  # generate pops them before the prefill
    assert adapter.visual_grids(visual, {"generate_kwargs": generate_kwargs}) == expected
    assert adapter.visual_grids(visual, {}) is None


def test_pool_on_a_downsampled_grid_and_on_single_tiles_keeps_the_newlines(model):
    with vtprune.apply(model, "pool", budget=12) as run:
        generate(model, batch((0,)), 2)
    # 46 = base 4x4 + 5x5 downsampled grid with a newline per row: base 4 (2x2), grid 2x3 + 2 newlines = 8
    kept = (run.gen.visual[0, 0] - run.gen.visual_index[0, 0, 0]).tolist()
    source, _ = adapter_for(model).packing(SIZE)
    assert len(kept) == 12 and sum(int(source[k]) == NEWLINE for k in kept) == 2
    x = inputs([prompt(3, 4, 0, images=2)], TWO[:1])
    stock_h = layer0_input(model, x)
    with vtprune.apply(model, "pool", budget=5) as run:  # 4 pooled patches (2x2) + the trailing newline
        pooled_h = layer0_input(model, x)
    start = run.gen.visual_index[0, :, 0]
    assert (run.gen.visual[0] - start[:, None]).tolist() == [[0, 2, 8, 10, P]] * 2
    index = run.gen.layouts[0].index[0].tolist()
    for i in range(2):  # each image's newline, unchanged at its own position
        newline = int(start[i]) + P
        assert torch.equal(pooled_h[0, index.index(newline)], stock_h[0, newline])
        window = stock_h[0, start[i] + torch.tensor([0, 1, 4, 5])]  # the first pooled 2x2 window of patches
        torch.testing.assert_close(pooled_h[0, index.index(int(start[i]))], window.mean(0))
