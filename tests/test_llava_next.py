"""LLaVA-NeXT's own (any-resolution packing, token counts that disagree with the images, each method's final
budget, pool's least budget, stock after exit) on a tiny random-weight ``LlavaNextForConditionalGeneration``
(models and inputs: ``next_tiny.py``). What it shares with other families (token counts, positions, per-layer
counts, several images, mixed sizes, saliency, grids, pool's windows): ``test_family_invariants.py``."""

from __future__ import annotations

import pytest
import torch
from family_checks import generate, one_image_token_short
from next_tiny import COUNTS, NEW, N, batch, tiny_llava_next

import vtprune
from vtprune.adapters import adapter_for


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def stock(model):
    """The unmodified model's greedy outputs on the single and the batched input."""
    return {"single": generate(model, batch((0,)), NEW), "batched": generate(model, batch(), NEW)}


# ---------------------------------------------------------------- packing (token counts: test_family_invariants.py)
@pytest.mark.parametrize("size", list(COUNTS))
def test_packing_is_the_base_tile_then_the_grid_with_a_newline_after_each_row(model, size):
    source, _ = adapter_for(model).packing(size)
    assert source.tolist()[:16] == list(range(16))  # the base tile first
    cols = {(20, 40): 8, (16, 64): 8, (64, 48): 6, (64, 64): 8}[size]
    newlines = (source == -1).nonzero().flatten().tolist()
    assert newlines == list(range(16 + cols, COUNTS[size], cols + 1))  # one after every grid row


def test_token_count_disagreement_raises(model):
    x = batch((0,))
    x["input_ids"] = one_image_token_short(x["input_ids"])
    x["attention_mask"] = x["attention_mask"][:, 1:]
    with vtprune.apply(model, "fastv", budget=4):
        with pytest.raises(ValueError, match=r"disagree with the images: input_ids hold 51 .* need \[52\]"):
            model(**x)
        with pytest.raises(ValueError, match="disagree with the images"):
            generate(model, x, NEW)
    x = batch((0,))
    x.pop("image_sizes")
    with pytest.raises(ValueError, match="needs image_sizes"):
        adapter_for(model).visual_index(x["input_ids"], x)


# ---------------------------------------------------------------- counts (keep-all = stock and batched = one by one: test_conformance.py)
PRUNING = [("none", {}), ("fastv", {"budget": 8}), ("st3", {}), ("parvts", {"budget": 8}), ("vtw", {"layer": 3}),
           ("pdrop", {"layers": [2, 4]}), ("visionzip", {"budget": 8}), ("random", {"budget": 8}), ("pool", {"budget": 12})]
FINAL = {"none": N, "fastv": 8, "parvts": 8, "visionzip": 8, "random": 8, "vtw": 0, "pool": 12}


@pytest.mark.parametrize("method,opts", PRUNING)
def test_final_budget_of_each_method_in_a_padded_batch(model, method, opts):
    x = batch()
    assert x["attention_mask"][0, 0] == 0  # left padding
    with vtprune.apply(model, method, **opts) as run:
        generate(model, x, NEW)
    final = FINAL[method] if method in FINAL else run.plan.per_layer[-1]
    assert [s["final_budget"] for s in run.report()["samples"]] == [final] * 3


def test_pool_budget_below_the_grids_least_is_refused(model):
    with pytest.raises(ValueError, match="budget of 2 visual tokens per image is below the 3"):
        with vtprune.apply(model, "pool", budget=2):
            generate(model, batch((0,)), 2)
    assert "generate" not in model.__dict__


def test_model_is_stock_after_exit_and_after_exception(model, stock):
    x = batch()
    with vtprune.apply(model, "parvts", budget=8):
        assert "get_image_features" in model.model.__dict__
        generate(model, x, 2)
    assert "get_image_features" not in model.model.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.apply(model, "parvts", budget=8):
            raise RuntimeError("boom")
    assert "get_image_features" not in model.model.__dict__
    saliency_layer = model.model.vision_tower.encoder.layers[1].self_attn
    assert not saliency_layer._forward_pre_hooks and not model._forward_pre_hooks
    assert torch.equal(generate(model, x, NEW), stock["batched"])
