"""LLaVA-OneVision's own (NeXT's any-resolution packing, ``anyres_max`` downsampling, single-tile images in
multi-image prompts, SigLIP without [CLS]) on a tiny random-weight ``LlavaOnevisionForConditionalGeneration``
(models and inputs: ``onevision_tiny.py``; videos: ``test_onevision_video.py``). What it shares with other
families (token counts, positions, per-layer counts, mixed sizes, saliency of one image, grids):
``test_family_invariants.py``; keep-all = stock, batched = one by one, stock after exit and no host sync in
decode: ``test_conformance.py``."""

from __future__ import annotations

import pytest
import torch
from family_checks import eager_tower_attentions, generate, layer0_input, one_image_token_short
from onevision_tiny import (
    COUNTS,
    DOWNSAMPLED,
    GRIDS,
    LAYERS,
    MULTI,
    SIZE,
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

pytestmark = pytest.mark.usefixtures("one_thread")

TWO = [[(20, 40), SIZE], [(32, 32), (16, 64)]]  # two images per sample, of any sizes: 17 tokens each


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


# ---------------------------------------------------------------- packing, downsampling (token counts: test_family_invariants.py)
@pytest.mark.parametrize("size", list(COUNTS))
def test_packing_is_the_base_tile_then_the_unpadded_or_downsampled_grid_with_newlines(model, size):
    source, _ = adapter_for(model).packing(size)
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


def test_token_count_disagreement_and_other_feature_strategies_raise(model):
    adapter = adapter_for(model)
    x = batch((0,))
    ids = x["input_ids"]
    short = one_image_token_short(ids)
    with pytest.raises(ValueError, match=r"disagree with the images: input_ids hold 45 .* the 1 images give \[46\]"):
        adapter.visual_index(short, x)
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
            adapter_for(model).visual_index(ids, x)
    finally:
        model.config.vision_feature_select_strategy = "full"


# ---------------------------------------------------------------- multi-image samples
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


def test_saliency_of_a_multi_image_sample_is_each_tile_then_minus_inf(model):
    x = inputs([prompt(3, 4, 0, images=2), prompt(2, 2, 1, images=2)], TWO)
    with vtprune.apply(model, "visionzip", budget=6) as run:
        generate(model, x, 1)
    per_tile = received_attention(model, x["pixel_values"][:, 0]).view(2, 2, P)
    expected = torch.cat([per_tile, torch.full((2, 2, 1), float("-inf"))], -1)
    assert torch.equal(torch.isinf(run.gen.saliency), torch.isinf(expected))
    torch.testing.assert_close(run.gen.saliency[..., :P], per_tile, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- pool: downsampled grid, single tiles
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
