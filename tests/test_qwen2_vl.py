"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through the engine (tiny random-weight models of the real classes): what
the three Qwen-ViT families share with each other only (a decode loop without position ids, spans found by a
direct forward and generate, video and mismatched images refused, mixed sizes, the adapter, pool's grid).
What they share with other families (positions against the stock model, counts, KV lengths, two images in a
prompt, saliency): test_family_invariants.py; Qwen3-VL's own (DeepStack, interleaved M-RoPE, 4-row position
ids): test_qwen3_vl.py."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import cache_keyword, output_cache
from qwen_tiny import (
    FAMILIES,
    GRID,
    IMAGE_TOKEN,
    N_VISUAL,
    batch,
    make_prompt,
    tiny_qwen,
)

import vtprune
from vtprune.adapters import adapter_for

NEW = 8
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen(request.param)


def generate(model, inputs, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, **kw)[:, -kw["max_new_tokens"]:]


def spy_layers(model, seen: list) -> list:
    """Record (layer, cos, sin, position_ids) each decoder layer receives; returns the hook handles."""
    def spy(layer, module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        pos = kwargs.get("position_ids")
        seen.append((layer, cos.clone(), sin.clone(), None if pos is None else pos.clone()))

    return [layer.register_forward_pre_hook(functools.partial(spy, i), with_kwargs=True)
            for i, layer in enumerate(model.model.language_model.layers)]


def remove(handles):
    for h in handles:
        h.remove()


def test_decode_without_position_ids_continues_at_original_positions(model):
    """A hand-written decode loop (no ``generate``, no position_ids): the model would derive positions
    from layer 0's cache, which ParVTS shortens; the engine gives it the stock ones."""
    inputs = {k: v for k, v in batch(PROMPTS[:1]).items() if k != "attention_mask"}
    fed = torch.tensor([[5], [6], [7]])

    def loop(seen):
        model.model.rope_deltas = None
        handles = spy_layers(model, seen)
        try:
            cache = output_cache(model(**inputs, use_cache=True))
            for token in fed:
                model(input_ids=token[None], use_cache=True, **{cache_keyword(model): cache})
        finally:
            remove(handles)
        return cache

    stock, pruned = [], []
    loop(stock)
    with vtprune.apply(model, "parvts", budget=4, discard_layer=2):
        cache = loop(pruned)
    s = inputs["input_ids"].shape[1]
    assert cache.layers[0].get_seq_length() == s - (N_VISUAL - 4) + len(fed)
    layers = len(model.model.language_model.layers)
    for (layer, cos, *_), (_, cos0, *_) in zip(pruned[layers:], stock[layers:], strict=True):
        assert torch.equal(cos, cos0), f"decode layer {layer}"


def test_direct_forward_and_generate_find_the_same_spans(model):
    inputs = batch([make_prompt(2, 3, 5, images=2), make_prompt(4, 6, 6, images=2)], images=2)
    with vtprune.apply(model, "fastv", budget=4) as run:
        with torch.no_grad():
            model(**inputs)  # the prefill call carries image_grid_thw
        direct = run.gen.visual_index
        generate(model, inputs, max_new_tokens=1)  # generate encodes the images first (mm_encoder_outputs)
    assert torch.equal(run.gen.visual_index, direct)
    ids = inputs["input_ids"]
    assert direct.shape == (2, 2, N_VISUAL)
    assert (torch.gather(ids, 1, direct.flatten(1)) == IMAGE_TOKEN).all()


def test_mismatched_or_inconsistent_images_are_refused(model):
    # a 16 x 64 px image gives a 4 x 16 patch grid: other shape, same 16 tokens: fine
    inputs = batch(PROMPTS[:2], sizes=[(32, 32), (16, 64)])
    assert inputs["image_grid_thw"].tolist() == [list(GRID), [1, 4, 16]]
    with vtprune.apply(model, "fastv", budget=4) as run, torch.no_grad():
        model(**inputs)
        assert run.gen.visual_index.shape == (2, 1, N_VISUAL)
        grid = inputs["image_grid_thw"].clone()
        grid[1] = torch.tensor([1, 4, 8])  # 8 tokens for a prompt that holds 16
        with pytest.raises(ValueError, match=r"hold 32 tokens 250 \(image_token_id\), the 2 images give \[16, 8\] = 24"):
            model(**dict(inputs, image_grid_thw=grid))
    # a 16 x 32 px image (8 tokens) beside a 32 x 32 one (16 tokens) in one batch: a direct forward is
    # refused; generate runs the two as groups (test below)
    with vtprune.apply(model, "fastv", budget=4), pytest.raises(ValueError, match="mismatched images"), torch.no_grad():
        model(**mixed_batch())


def mixed_batch() -> dict:
    """Sample 0: a 32 x 32 px image (16 tokens, 64 patches); sample 1: 16 x 32 px (8 tokens, 32 patches)."""
    small = make_prompt(2, 3, 5)
    first = small.index(IMAGE_TOKEN)
    mixed = batch([PROMPTS[0], small[:first] + small[first + 8:]], sizes=[(32, 32), (16, 32)])
    assert mixed["image_grid_thw"].tolist() == [list(GRID), [1, 4, 8]]
    return mixed


@pytest.mark.parametrize("method,opts", [("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 4}), ("st3", {}),
                                         ("pool", {"keep_ratio": 0.5}), ("none", {})])
def test_a_batch_of_mixed_image_sizes_runs_as_groups_and_equals_one_by_one(model, method, opts):
    mixed = mixed_batch()
    rows = {0: slice(0, 64), 1: slice(64, 96)}
    with vtprune.apply(model, method, **opts) as run:
        together = generate(model, mixed)
        assert [s["visual_tokens_in"] for s in run.report()["samples"]] == [16, 8]
        for i in (0, 1):
            keep = mixed["attention_mask"][i].bool()
            one = {k: mixed[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            one.update(pixel_values=mixed["pixel_values"][rows[i]], image_grid_thw=mixed["image_grid_thw"][i:i + 1])
            assert torch.equal(generate(model, one)[0], together[i]), f"sample {i}"
    if method == "none":  # the stock model batches mixed sizes itself: the groups give its output
        assert torch.equal(generate(model, mixed), together)


def test_adapter_and_detach(model):
    adapter = adapter_for(model)
    assert adapter.family == ("qwen3_vl" if "Qwen3" in type(model).__name__ else "qwen2_vl")
    assert adapter.image_token_id == IMAGE_TOKEN
    assert adapter.decoder_layers == list(model.model.language_model.layers)
    inputs = batch(PROMPTS[:1])
    stock = generate(model, inputs)
    with vtprune.apply(model, "parvts", budget=4):
        generate(model, inputs, max_new_tokens=2)
    visual = model.model.visual
    assert not visual._forward_pre_hooks and not any(b.attn._forward_pre_hooks for b in visual.blocks)
    assert torch.equal(generate(model, inputs), stock)
    if hasattr(visual, "fullatt_block_indexes"):
        full = visual.fullatt_block_indexes
        visual.fullatt_block_indexes = []
        try:
            with pytest.raises(ValueError, match="fullatt_block_indexes is empty"):
                vtprune.apply(model, "parvts", budget=4)
            assert not visual._forward_pre_hooks and not model._forward_pre_hooks
        finally:
            visual.fullatt_block_indexes = full


def test_pool_grid_comes_from_the_images(model):
    from vtprune.adapters import adapter_for

    adapter, inputs = adapter_for(model), batch(PROMPTS[:1])
    side = int(N_VISUAL ** 0.5)
    visual = adapter.visual_index(inputs["input_ids"], inputs)
    assert adapter.visual_grid(visual, inputs) == (side, side)  # from image_grid_thw
    seen = {}
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.setdefault("kw", kw) and None, with_kwargs=True)
    try:
        generate(model, inputs)  # generate's prefill call carries M-RoPE position ids (and from 5.23 no grid)
    finally:
        handle.remove()
    without_grid = {k: v for k, v in seen["kw"].items() if k != "image_grid_thw"}
    assert adapter.visual_grid(visual, without_grid) == (side, side)  # from the position ids
    assert adapter.visual_grid(visual[..., 1:], inputs) is None  # not the grid's token count
