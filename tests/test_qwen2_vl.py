"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through the engine (tiny random-weight models of the real classes): what
the three Qwen-ViT families share (positions, counts, saliency, spans, mixed sizes). Qwen3-VL's own
(DeepStack, interleaved M-RoPE, 4-row position ids): test_qwen3_vl.py."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from conftest import cache_keyword, output_cache
from qwen_tiny import (
    FAMILIES,
    GRID,
    IMAGE_TOKEN,
    MERGE,
    N_PATCHES,
    N_VISUAL,
    VIDEO_TOKEN,
    batch,
    make_prompt,
    sample,
    tiny_qwen,
)
from transformers.vision_utils import get_vision_window_index

import vtprune
from vtprune.adapters import adapter_for, qwen2_vl
from vtprune.methods.st3 import annealed, schedule

NEW = 8
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]
# option variants for the positions and counts tests (keep-all = stock and batched = one by one of every
# registered method: test_conformance.py)
PRUNING = [("fastv", {"budget": 4}), ("st3", {}), ("parvts", {"budget": 4}), ("vtw", {"layer": 2}),
           ("pdrop", {"layers": [1, 3]}), ("visionzip", {"budget": 4}), ("random", {"budget": 4}), ("pool", {"budget": 4})]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen(request.param)


def generate(model, inputs, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, **kw)[:, -kw["max_new_tokens"]:]


def spy_layers(model, seen: list, run=None) -> list:
    """Record (layer, cos, sin, position_ids, token indices of the layer's sequence under ``run``) each
    decoder layer receives; returns the hook handles."""
    def spy(layer, module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        pos = kwargs.get("position_ids")
        index = run.gen.layout.index.clone() if run is not None else None
        seen.append((layer, cos.clone(), sin.clone(), None if pos is None else pos.clone(), index))

    return [layer.register_forward_pre_hook(functools.partial(spy, i), with_kwargs=True)
            for i, layer in enumerate(model.model.language_model.layers)]


def remove(handles):
    for h in handles:
        h.remove()


@pytest.mark.parametrize("method,opts", PRUNING)
def test_kept_tokens_keep_stock_positions_in_prefill_and_decode(model, method, opts):
    """Every decoder layer receives the stock model's cos / sin / text positions at the kept token
    indices in the prefill, and the stock ones (prompt M-RoPE position + t) at every decode step."""
    inputs = batch(PROMPTS)
    layers = len(model.model.language_model.layers)
    stock, pruned = [], []
    handles = spy_layers(model, stock)
    try:
        generate(model, inputs)
    finally:
        remove(handles)
    with vtprune.apply(model, method, **opts) as run:
        handles = spy_layers(model, pruned, run)
        try:
            out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        finally:
            remove(handles)
    assert len(pruned) == len(stock) == layers * NEW
    for (layer, cos, sin, pos, index), (_, cos0, sin0, pos0, _) in zip(pruned[:layers], stock[:layers], strict=True):
        take = functools.partial(torch.gather, dim=1, index=index[..., None].expand(-1, -1, cos0.shape[-1]))
        assert torch.equal(cos, take(cos0)) and torch.equal(sin, take(sin0)), f"prefill layer {layer}"
        assert torch.equal(pos, torch.gather(pos0, 1, index)), f"prefill layer {layer}"
    assert any(p[4].shape[1] < inputs["input_ids"].shape[1] for p in pruned[:layers])  # some layer was pruned
    for (layer, cos, sin, pos, _), (_, cos0, sin0, pos0, _) in zip(pruned[layers:], stock[layers:], strict=True):
        assert torch.equal(cos, cos0) and torch.equal(sin, sin0) and torch.equal(pos, pos0), f"decode layer {layer}"
    # decoding continues at the prompt's last M-RoPE position + t, whatever the pruned caches hold
    mrope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])
    rotary = model.model.language_model.rotary_emb
    for t in range(1, NEW):
        cos, _ = rotary(torch.zeros(1, dtype=torch.float32), mrope[:, :, -1:] + t)
        assert torch.equal(pruned[t * layers][1], cos), f"decode step {t}"
    if method == "parvts":  # layer 0's cache (which the model reads for its length) is shorter than the stock one
        assert output_cache(out).get_seq_length() < inputs["input_ids"].shape[1] + NEW - 1


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
    assert cache.get_seq_length() == s - (N_VISUAL - 4) + len(fed)
    layers = len(model.model.language_model.layers)
    for (layer, cos, *_), (_, cos0, *_) in zip(pruned[layers:], stock[layers:], strict=True):
        assert torch.equal(cos, cos0), f"decode layer {layer}"


def test_per_layer_visual_counts(model):
    inputs = batch(PROMPTS)
    s = inputs["input_ids"].shape[1]
    with vtprune.apply(model, "fastv", budget=5, layer=3) as run:
        generate(model, inputs)
    sample0 = run.report()["samples"][0]
    assert sample0["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 3 + [5] * 3
    assert sample0["visual_tokens_per_layer_last_decode"] == [N_VISUAL] * 3 + [5] * 3
    assert run.report()["kv_cache"]["entries_per_layer"] == [s + NEW - 1] * 3 + [s - N_VISUAL + 5 + NEW - 1] * 3

    with vtprune.apply(model, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=1) as run:
        generate(model, inputs)
    g = schedule(N_VISUAL, 6, 0.3, 1, 2)
    assert g == [16, 12, 12, 9, 9, 7]
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == g
    history = run.ledger.decode_history
    assert len(history) == NEW - 1
    for t, counts in enumerate(history, start=1):
        assert counts == [g[0]] + [annealed(g[layer], t, NEW, 0.25) for layer in range(1, 6)], f"step {t}"

    with vtprune.apply(model, "parvts", budget=4, discard_layer=3) as run:
        generate(model, inputs)
    r = run.report()
    assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 3 + [4] * 3
    assert r["kv_cache"]["entries_per_layer"] == [s - N_VISUAL + 4 + NEW - 1] * 6
    top = torch.topk(run.gen.saliency, 4, dim=-1).indices.sort(-1).values  # subjects: the most salient tokens
    assert torch.equal(run.gen.cache_visual[5], torch.gather(run.gen.visual_index, 2, top))


def test_two_images_in_one_prompt_each_pruned_separately(model):
    prompts = [make_prompt(2, 3, 5, images=2), make_prompt(4, 6, 6, images=2)]
    inputs = batch(prompts, images=2)
    stock = generate(model, inputs)
    with vtprune.apply(model, "none"):
        assert torch.equal(generate(model, inputs), stock)
    for method in ("fastv", "parvts"):
        with vtprune.apply(model, method, budget=3) as run:
            together = generate(model, inputs)
            gen, report = run.gen, run.report()
            for i in range(2):
                assert torch.equal(generate(model, sample(inputs, i, images=2))[0], together[i]), (method, i)
        first = gen.visual_index[:, 1, 0]
        assert (gen.visual_index[:, 0, -1] < first).all()  # two spans, in prompt order
        full = 2 if method == "fastv" else 3  # FastV prunes at layer 2, ParVTS discards at layer 3
        assert report["samples"][1]["visual_tokens_per_layer_prefill"] == [2 * N_VISUAL] * full + [6] * (6 - full)
        kept = gen.cache_visual[5]
        assert kept.shape == (2, 2, 3)
        assert (kept[:, 0] < first[:, None]).all() and (kept[:, 1] >= first[:, None]).all()  # three from each image


@pytest.mark.parametrize("rows", [None, 5], ids=["one-chunk", "chunks-of-5-query-rows"])
def test_saliency_equals_eager_attention_received_in_last_full_block(model, monkeypatch, rows):
    if rows is not None:
        heads = model.config.vision_config.num_heads
        monkeypatch.setattr(qwen2_vl, "attention_received", functools.partial(
            qwen2_vl.attention_received, max_elements=heads * N_PATCHES * rows))
    inputs = batch(PROMPTS)
    with vtprune.apply(model, "parvts", budget=4) as run:
        generate(model, inputs, max_new_tokens=1)
    visual = model.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    block = len(visual.blocks) - 1 if full is None else max(full)
    # the tower's own eager attention weights, per block and image
    modeling = sys.modules[type(visual.blocks[0].attn).__module__]
    eager, weights, current = modeling.eager_attention_forward, {}, {}

    def recording(module, *args, **kwargs):
        out, w = eager(module, *args, **kwargs)
        weights.setdefault(current["block"], []).append(w)
        return out, w

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: current.update(block=i)) for i, b in enumerate(visual.blocks)]
    impl = visual.config._attn_implementation
    visual.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        visual.config._attn_implementation = impl
        remove(handles)
    per_image = weights[block]
    assert len(per_image) == 3 and all(w.shape[-1] == N_PATCHES for w in per_image)
    received = torch.cat([w[0].float().mean(0).mean(0) for w in per_image])  # mean over heads and queries
    tokens = received.view(-1, MERGE * MERGE).sum(-1)  # the merger's groups of 2 x 2 patches
    if full is not None:  # Qwen2.5-VL: back from window order to the visual tokens' order
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], MERGE, visual.window_size, visual.patch_size)
        assert not torch.equal(window_index, torch.arange(len(window_index)))
        tokens = tokens[torch.argsort(window_index)]
    expected = tokens.view(3, 1, N_VISUAL)
    assert torch.allclose(run.gen.saliency, expected, atol=1e-6)
    assert torch.allclose(run.gen.saliency.sum(-1), torch.ones(3, 1))


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


def test_video_inputs_are_refused(model):
    inputs = batch(PROMPTS[:1])
    videos = dict(inputs, pixel_values_videos=torch.randn(2 * N_PATCHES, inputs["pixel_values"].shape[1]),
                  video_grid_thw=torch.tensor([[2, 8, 8]]))
    with vtprune.apply(model, "fastv", budget=4):
        with pytest.raises(ValueError, match="video inputs are not supported"):
            model(**videos)
        ids = inputs["input_ids"].clone()
        ids[0, -1] = VIDEO_TOKEN
        with pytest.raises(ValueError, match="video tokens"):
            model(**dict(inputs, input_ids=ids))


def test_mismatched_or_inconsistent_images_are_refused(model):
    # a 16 x 64 px image gives a 4 x 16 patch grid: other shape, same 16 tokens: fine
    inputs = batch(PROMPTS[:2], sizes=[(32, 32), (16, 64)])
    assert inputs["image_grid_thw"].tolist() == [list(GRID), [1, 4, 16]]
    with vtprune.apply(model, "fastv", budget=4) as run, torch.no_grad():
        model(**inputs)
        assert run.gen.visual_index.shape == (2, 1, N_VISUAL)
        grid = inputs["image_grid_thw"].clone()
        grid[1] = torch.tensor([1, 4, 8])  # 8 tokens for a prompt that holds 16
        with pytest.raises(ValueError, match=r"holds 32 image tokens .* but its images give 24"):
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
