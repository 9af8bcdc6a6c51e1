"""InternVL's own (tiles + thumbnail between ``<img>`` markers, pixel shuffle, tile counts that disagree with
the tokens, the feature strategy the saliency needs, hooks removed) on a tiny random-weight
``InternVLForConditionalGeneration`` (models and inputs: ``internvl_tiny.py``). What it shares with other
families (token counts, positions, per-layer counts, per-image budgets, several images, mixed tile counts,
saliency, grids, pool's windows): ``test_family_invariants.py``; keep-all = stock, batched = one by one, stock
after exit and no host sync in decode: ``test_conformance.py``."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN
from family_checks import generate, one_image_token_short
from internvl_tiny import COUNTS, END, NEW, START, TILES, P, batch, inputs, prompt, tiny_internvl

import vtprune
from vtprune.adapters import adapter_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


# ---------------------------------------------------------------- tiles per image size (token counts: test_family_invariants.py)
@pytest.mark.parametrize("size", list(COUNTS))
def test_each_image_is_its_tiles_of_p_tokens_between_img_markers(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    assert adapter_for(model).tokens_per_tile == P and x["pixel_values"].shape[0] == TILES[size]
    ids = x["input_ids"][0]
    start = int((ids == IMAGE_TOKEN).nonzero()[0])
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
    short = one_image_token_short(ids)  # 47 is not 3 tiles of 16
    with pytest.raises(ValueError, match=r"is 16 image tokens .* per tile, got runs of \[\[47\]\]"):
        adapter.visual_index(short, {})
    with pytest.raises(ValueError, match=r"48 image tokens \(3 tiles of 16\), the call carries 2 tiles"):
        adapter.visual_index(ids, {"pixel_values": x["pixel_values"][:2]})
    with vtprune.apply(model, "fastv", budget=4), pytest.raises(ValueError, match="disagree"):
        generate(model, {**x, "pixel_values": x["pixel_values"][:2]}, 2)


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
    stock = generate(model, x, NEW)
    attn = model.model.vision_tower.encoder.layer[-1].attention
    with pytest.raises(RuntimeError, match="boom"), vtprune.apply(model, "visionzip", budget=8):
        assert attn._forward_pre_hooks and model.model.language_model._forward_pre_hooks
        generate(model, x, 2)
        raise RuntimeError("boom")
    assert not attn._forward_pre_hooks and not model._forward_pre_hooks
    assert not model.model.language_model._forward_pre_hooks
    assert torch.equal(generate(model, x, NEW), stock)
