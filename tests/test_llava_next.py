"""LLaVA-NeXT (any-resolution tiles) on a tiny random-weight ``LlavaNextForConditionalGeneration``
(models and inputs: ``next_tiny.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import IMAGE_TOKEN
from family_checks import eager_tower_attentions, layer0_input
from next_tiny import COUNTS, LAYERS, MIXED, NEW, SIZE, N, batch, inputs, prompt, tiny_llava_next

import vtprune
from vtprune.adapters import PatchGrid, adapter_for
from vtprune.adapters.llava_next import LlavaNextAdapter
from vtprune.methods.st3 import annealed


def generate(model, x, **kw):
    kw.setdefault("max_new_tokens", NEW)
    return model.generate(**x, do_sample=False, **kw)[:, -kw["max_new_tokens"]:]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def stock(model):
    """The unmodified model's greedy outputs on the single and the batched input."""
    return {"single": generate(model, batch((0,))), "batched": generate(model, batch())}


# ---------------------------------------------------------------- token counts and positions
@pytest.mark.parametrize("size", list(COUNTS))
def test_visual_tokens_per_image_follow_image_size(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaNextAdapter) and adapter.tokens_per_image() is None
    visual = adapter.visual_index(x["input_ids"], x)
    start = int((x["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    assert visual.tolist() == [[list(range(start, start + COUNTS[size]))]]  # hand count = processor's
    with torch.no_grad():  # = the model's own packed feature length
        feats = model.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
    assert [f.shape[0] for f in feats] == [COUNTS[size]]
    source, _ = adapter.packing(size)
    assert source.tolist()[:16] == list(range(16))  # the base tile first
    cols = {(20, 40): 8, (16, 64): 8, (64, 48): 6, (64, 64): 8}[size]
    newlines = (source == -1).nonzero().flatten().tolist()
    assert newlines == list(range(16 + cols, COUNTS[size], cols + 1))  # one after every grid row


def test_token_count_disagreement_raises(model):
    x = batch((0,))
    ids = x["input_ids"]
    first = int((ids[0] == IMAGE_TOKEN).nonzero()[0])
    x["input_ids"] = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)  # one image token short
    x["attention_mask"] = x["attention_mask"][:, 1:]
    with vtprune.apply(model, "fastv", budget=4):
        with pytest.raises(ValueError, match=r"disagree with the images: input_ids hold 51 .* need \[52\]"):
            model(**x)
        with pytest.raises(ValueError, match="disagree with the images"):
            generate(model, x)
    x = batch((0,))
    x.pop("image_sizes")
    with pytest.raises(ValueError, match="needs image_sizes"):
        adapter_for(model).visual_index(x["input_ids"], x)


def test_kept_tokens_keep_original_positions(model):
    x = batch()
    seen = {}

    def spy(module, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0].clone()
        seen["pos"] = kwargs["position_ids"].clone()

    with vtprune.apply(model, "fastv", budget=6, layer=2) as run:
        handle = model.model.language_model.layers[4].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**x)
        finally:
            handle.remove()
    index = run.gen.layouts[4].index
    assert index.shape[1] == x["input_ids"].shape[1] - N + 6
    full_pos = torch.arange(x["input_ids"].shape[1])[None].expand(3, -1)
    cos, _ = model.model.language_model.rotary_emb(torch.zeros(1, 1, 64), full_pos)
    assert torch.equal(seen["pos"], torch.gather(full_pos, 1, index))
    assert torch.allclose(seen["cos"], torch.gather(cos, 1, index[..., None].expand(-1, -1, cos.shape[-1])))


# ---------------------------------------------------------------- counts (keep-all = stock and batched = one by one: test_conformance.py)
PRUNING = [("none", {}), ("fastv", {"budget": 8}), ("st3", {}), ("parvts", {"budget": 8}), ("vtw", {"layer": 3}),
           ("pdrop", {"layers": [2, 4]}), ("visionzip", {"budget": 8}), ("random", {"budget": 8}), ("pool", {"budget": 12})]
FINAL = {"none": N, "fastv": 8, "parvts": 8, "visionzip": 8, "random": 8, "vtw": 0, "pool": 12}


@pytest.mark.parametrize("method,opts", PRUNING)
def test_final_budget_of_each_method_in_a_padded_batch(model, method, opts):
    x = batch()
    assert x["attention_mask"][0, 0] == 0  # left padding
    with vtprune.apply(model, method, **opts) as run:
        generate(model, x)
    final = FINAL[method] if method in FINAL else run.plan.per_layer[-1]
    assert [s["final_budget"] for s in run.report()["samples"]] == [final] * 3


# ---------------------------------------------------------------- pool: base grid + high-resolution grid
GRIDS = {(20, 40): (4, 8), (16, 64): (2, 8), (64, 48): (8, 6), (64, 64): (8, 8)}  # unpadded rows x cols (docstring)


@pytest.mark.parametrize("size", list(GRIDS))
def test_grids_are_the_base_tile_and_the_unpadded_grid(model, size):
    x = inputs([prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(model)
    visual = adapter.visual_index(x["input_ids"], x)
    rows, cols = GRIDS[size]
    expected = (PatchGrid(4, 4), PatchGrid(rows, cols, start=16, stride=cols + 1))
    assert adapter.visual_grids(visual, x) == expected
    # generate consumes image_sizes before the prefill: the engine hands its kwargs on
    assert adapter.visual_grids(visual, {"generate_kwargs": {"image_sizes": x["image_sizes"]}}) == expected
    assert adapter.visual_grids(visual, {}) is None
    assert adapter.visual_grid(visual, x) is None  # not one grid


def test_pool_pools_each_grid_and_keeps_one_newline_per_pooled_row(model):
    x = batch((0,))
    stock_h = layer0_input(model, x)
    with vtprune.apply(model, "pool", budget=12) as run:
        pooled_h = layer0_input(model, x)  # the spy runs after the engine's own layer-0 hook
    # 52 = base 4x4 + 4x8 grid with a newline per row; least 1 + 2, spare 9 split 16:36 -> base 4, high-res 8
    # base 4x4 -> 2x2; high-res: a * (b + 1) <= 8 -> 2x3 + 2 newlines
    start = int(run.gen.visual_index[0, 0, 0])
    base = [0, 2, 8, 10]  # 2x2 windows of 2x2 patches: centre = top-left
    hires_rows, hires_cols = [0, 2], [1, 3, 6]  # adaptive windows of 8 cols into 3: [0,3) [2,6) [5,8)
    hires = [16 + r * 9 + c for r in hires_rows for c in hires_cols]
    newlines = [16 + r * 9 + 8 for r in hires_rows]
    kept = sorted(base + hires + newlines)
    assert run.gen.visual[0, 0].tolist() == [start + k for k in kept]
    index = run.gen.layouts[0].index[0].tolist()
    vis = stock_h[0, start:start + N]
    got = {k: pooled_h[0, index.index(start + k)] for k in kept}
    torch.testing.assert_close(got[0], vis[[0, 1, 4, 5]].mean(0))
    torch.testing.assert_close(got[16 + 2 * 9 + 3], vis[[16 + r * 9 + c for r in (2, 3) for c in (2, 3, 4, 5)]].mean(0))
    for k in newlines:
        assert torch.equal(got[k], vis[k])  # the newline embedding itself
    r = run.report()["samples"][0]
    assert r["visual_tokens_per_layer_prefill"] == [12] * LAYERS


def test_pool_budget_below_the_grids_least_is_refused(model):
    with pytest.raises(ValueError, match="budget of 2 visual tokens per image is below the 3"):
        with vtprune.apply(model, "pool", budget=2):
            generate(model, batch((0,)), max_new_tokens=2)
    assert "generate" not in model.__dict__


# ---------------------------------------------------------------- per-layer counts (METHODS.md)
def test_fastv_counts_and_kv_lengths(model):
    x = batch()
    s = x["input_ids"].shape[1]
    with vtprune.apply(model, "fastv", budget=10, layer=3) as run:
        generate(model, x)
    sample = run.report()["samples"][0]
    assert sample["visual_tokens_per_layer_prefill"] == [N] * 3 + [10] * 3
    assert sample["visual_tokens_per_layer_last_decode"] == [N] * 3 + [10] * 3
    fed = NEW - 1
    assert run.report()["kv_cache"]["entries_per_layer"] == [s + fed] * 3 + [s - N + 10 + fed] * 3


def test_st3_pvtp_and_vta_counts(model):
    x = batch()
    with vtprune.apply(model, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=1) as run:
        generate(model, x)
    g = [52, 37, 37, 26, 26, 19]  # ceil(0.7 * 52) = 37, ceil(0.7 * 37) = 26, ceil(0.7 * 26) = 19
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == g
    history = run.ledger.decode_history
    assert len(history) == NEW - 1
    for t, counts in enumerate(history, start=1):
        assert counts == [g[0]] + [annealed(g[layer], t, NEW, 0.25) for layer in range(1, LAYERS)], f"step {t}"
    assert history[-1][5] < g[5]


def test_parvts_counts_and_subjects(model):
    x = batch()
    s = x["input_ids"].shape[1]
    with vtprune.apply(model, "parvts", budget=10, discard_layer=3) as run:
        generate(model, x)
    r = run.report()
    assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [N] * 3 + [10] * 3
    assert r["kv_cache"]["entries_per_layer"] == [s - N + 10 + NEW - 1] * LAYERS
    top = torch.topk(run.gen.saliency, 10, dim=-1).indices.sort(-1).values
    assert torch.equal(run.gen.cache_visual[5], torch.gather(run.gen.visual_index, 2, top))
    source, _ = adapter_for(model).packing(SIZE)
    assert (source[top.flatten()] >= 0).all()  # subjects are patches, never newline tokens


# ---------------------------------------------------------------- several images, several sizes
def test_two_adjacent_images_each_pruned_separately(model):
    x = inputs([prompt(2, 3, 5, images=2), prompt(4, 6, 6, images=2)], [[SIZE, SIZE], [SIZE, SIZE]])
    ids = x["input_ids"]
    runs = (ids == IMAGE_TOKEN).long().diff(dim=1).eq(1).sum(1)
    assert runs.tolist() == [1, 1]  # "<image> <image>": one run of 2 N tokens; only the counts split it
    stock = generate(model, x, max_new_tokens=6)
    with vtprune.apply(model, "none") as run:
        assert torch.equal(generate(model, x, max_new_tokens=6), stock)
    assert run.gen.visual_index.shape == (2, 2, N)
    assert torch.equal(run.gen.visual_index[:, 1, 0], run.gen.visual_index[:, 0, -1] + 1)
    with vtprune.apply(model, "fastv", budget=3) as run:
        generate(model, x, max_new_tokens=6)
    assert run.report()["samples"][1]["visual_tokens_per_layer_prefill"] == [2 * N] * 2 + [6] * 4
    kept = run.gen.cache_visual[5]
    assert kept.shape == (2, 2, 3)
    assert torch.all(kept[:, 0] < run.gen.visual_index[:, 1, :1])  # three from each image
    with vtprune.apply(model, "parvts", budget=5) as run:
        generate(model, x, max_new_tokens=6)
    top = torch.topk(run.gen.saliency, 5, dim=-1).indices.sort(-1).values  # per image
    assert torch.equal(run.gen.cache_visual[5], torch.gather(run.gen.visual_index, 2, top))


def test_images_of_different_sizes_in_one_prompt_raise(model):
    x = inputs([prompt(2, 3, 5, images=2)], [[SIZE, (16, 64)]])
    with pytest.raises(ValueError, match=r"mismatched images.*\[\[52, 34\]\]"):
        with vtprune.apply(model, "fastv", budget=4):
            generate(model, x, max_new_tokens=2)
    assert "get_image_features" not in model.model.__dict__




@pytest.mark.parametrize("method,opts", [("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 8}), ("st3", {}),
                                         ("pool", {"keep_ratio": 0.25}), ("none", {})])
def test_a_batch_of_mixed_image_sizes_runs_as_groups_and_equals_one_by_one(model, method, opts):
    prompts = [prompt(2 + b, 3 + 2 * b, 20 + b) for b in range(len(MIXED))]
    x = inputs(prompts, MIXED)
    with vtprune.apply(model, method, **opts) as run:
        together = generate(model, x, max_new_tokens=4)
        report = run.report()
        assert [s["visual_tokens_in"] for s in report["samples"]] == [52, 34, 52, 72]
        assert report["timing"]["groups"] == [[0, 2], [1], [3]]
        with pytest.raises(RuntimeError, match="ran as groups"):
            run.kept_visual(1)
        for b in range(len(MIXED)):
            one = inputs([prompts[b]], [MIXED[b]], seed=10 * b)  # the same image as in the batch
            assert torch.equal(generate(model, one, max_new_tokens=4)[0], together[b]), f"sample {b}"
    if method == "none":  # the stock model batches mixed sizes itself: the groups give its output
        assert torch.equal(generate(model, x, max_new_tokens=4), together)
    full = vtprune.apply(model, method, **opts)
    with full:
        out = model.generate(**x, do_sample=False, max_new_tokens=4)
    assert torch.equal(out[:, :x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt, then new tokens
    with pytest.raises(ValueError, match="return_dict_in_generate is not supported"), full:
        model.generate(**x, do_sample=False, max_new_tokens=2, return_dict_in_generate=True)
    model.generation_config.return_dict_in_generate = True  # the model's own default, not the call's
    try:
        with pytest.raises(ValueError, match="return_dict_in_generate is not supported"), full:
            model.generate(**x, do_sample=False, max_new_tokens=2)
    finally:
        model.generation_config.return_dict_in_generate = False


@pytest.mark.parametrize("method", ["fastv", "parvts"])
def test_keep_ratio_is_per_image_for_each_size(model, method):
    with vtprune.apply(model, method, keep_ratio=0.25) as run:
        for size in [(20, 40), (16, 64), (64, 64)]:
            generate(model, inputs([prompt(3, 4, 0)], [[size]]), max_new_tokens=2)
            sample = run.report()["samples"][0]
            assert sample["visual_tokens_in"] == COUNTS[size]
            assert sample["final_budget"] == math.ceil(0.25 * COUNTS[size])  # 13, 9, 22


# ---------------------------------------------------------------- saliency
def hand_packed_cls_attention(model, pixel_values, n_tiles, grid, rows, cols) -> torch.Tensor:
    """[CLS] attention of every tile from the tower run eagerly (output_attentions), packed by hand:
    base tile, then the (grid[0] * 4) x (grid[1] * 4) patch map cropped to ``rows`` x ``cols``, -inf
    after each row."""
    attn = eager_tower_attentions(model, pixel_values[:n_tiles])
    cls = attn[1][:, :, 0, 1:].sum(1)  # feature layer -2 of 3 = output of encoder layer 1; drop [CLS]
    out = cls[0].tolist()
    for r in rows:
        for c in cols:
            tile = 1 + (r // 4) * grid[1] + c // 4
            out.append(float(cls[tile, (r % 4) * 4 + c % 4]))
        out.append(float("-inf"))
    return torch.tensor(out)


@pytest.mark.parametrize("size,n_tiles,grid,rows,cols", [
    ((16, 64), 3, (1, 2), range(1, 3), range(8)),   # wide: rows unpadded
    ((64, 48), 5, (2, 2), range(8), range(1, 7)),   # tall: columns unpadded
])
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_saliency_is_eager_cls_attention_packed_like_the_features(model, size, n_tiles, grid, rows, cols, call):
    x = inputs([prompt(2, 3, 1), prompt(4, 2, 2)], [[size], [size]])
    calls = []
    spy = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with vtprune.apply(model, "parvts", budget=6) as run:
            if call == "generate":
                generate(model, x, max_new_tokens=1)
            else:
                with torch.no_grad():
                    model(**x)
    finally:
        spy.remove()
    # a direct forward passes pixel_values and image_sizes; generate passes them too (transformers < 5.23)
    # or encodes the images before the prefill (through the wrapped get_image_features, whose signature
    # it inspects) and passes mm_encoder_outputs instead: the saliency must come out the same either way
    encoded = "image" in (calls[0].get("mm_encoder_outputs") or {})
    assert (calls[0].get("pixel_values") is None) == encoded
    assert not encoded or call == "generate"
    assert run.gen.saliency.shape == (2, 1, COUNTS[size])
    for b in range(2):
        expected = hand_packed_cls_attention(model, x["pixel_values"][b], n_tiles, grid, rows, cols)
        ours = run.gen.saliency[b, 0]
        assert torch.equal(torch.isinf(ours), torch.isinf(expected))
        assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)], atol=1e-5)


def test_model_is_stock_after_exit_and_after_exception(model, stock):
    x = batch()
    with vtprune.apply(model, "parvts", budget=8):
        assert "get_image_features" in model.model.__dict__
        generate(model, x, max_new_tokens=2)
    assert "get_image_features" not in model.model.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.apply(model, "parvts", budget=8):
            raise RuntimeError("boom")
    assert "get_image_features" not in model.model.__dict__
    saliency_layer = model.model.vision_tower.encoder.layers[1].self_attn
    assert not saliency_layer._forward_pre_hooks and not model._forward_pre_hooks
    assert torch.equal(generate(model, x), stock["batched"])
