"""Gemma 3 through the engine (a tiny random-weight ``Gemma3ForConditionalGeneration`` with its real
processor, ``gemma3_tiny.py``): the bidirectional image blocks kept in the masks after pruning, the
sliding-window layers inside their window (past it: test_gemma3_window.py), ``query_pre_attn_scalar`` scaling
in the scores, pan-and-scan crops. The positions of both rotary types, counts and KV lengths and the
[CLS]-free saliency: test_family_invariants.py. Keep-all = stock and batched = one by one for every method:
test_conformance.py.
"""

from __future__ import annotations

import functools

import gemma3_tiny
import pytest
import torch
from family_checks import LayerSpy
from gemma3_tiny import (
    IMAGE_TOKEN,
    LAYER_TYPES,
    LAYERS,
    PROMPTS,
    SCALAR,
    WINDOW,
    N,
    batch,
    image,
    inputs,
    prompt,
)
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

import vtprune
from vtprune.adapters import adapter_for, gemma3
from vtprune.engine import attention

NEW = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def tiny(attn: str = "sdpa", window: int = WINDOW):
    return gemma3_tiny.tiny_gemma3(attn, window=window)


@pytest.fixture(scope="module")
def model():
    return tiny()


def generate(model, x, new: int = NEW) -> torch.Tensor:
    return model.generate(**x, max_new_tokens=new, do_sample=False)[:, -new:]


# ---------------------------------------------------------------- the adapter's answers
def test_adapter_reads_the_config_and_the_processor(model):
    adapter = adapter_for(model)
    assert isinstance(adapter, gemma3.Gemma3Adapter) and adapter.family == "gemma3"
    assert adapter.image_token_id == IMAGE_TOKEN and adapter.tokens_per_image() == N
    assert adapter.decoder_layers == list(model.model.language_model.layers)
    assert [adapter.sliding_window(i) for i in range(LAYERS)] == [
        WINDOW if t == "sliding_attention" else None for t in LAYER_TYPES]
    x = inputs([prompt(2, 3, 5, images=2), prompt(4, 6, 6, images=2)], [[image(1), image(2)], [image(3), image(4)]])
    visual = adapter.visual_index(x["input_ids"], x)
    assert visual.shape == (2, 2, N) and (torch.gather(x["input_ids"], 1, visual.flatten(1)) == IMAGE_TOKEN).all()
    assert adapter.visual_grid(visual, x) == (4, 4) and adapter.visual_grid(visual[..., 1:], x) is None
    # the model's own block ids: one block per image, -1 outside
    blocks = adapter.attention_blocks(x["input_ids"], x)
    assert torch.equal(blocks, get_block_sequence_ids_for_mask(x["token_type_ids"]))
    assert torch.equal(blocks.gather(1, visual.flatten(1)).view(2, 2, N), torch.arange(2)[None, :, None].expand(2, 2, N))
    assert adapter.attention_blocks(x["input_ids"], {k: v for k, v in x.items() if k != "token_type_ids"}) is None


def test_bidirectional_text_attention_is_refused():
    m = gemma3_tiny.tiny_gemma3()
    m.config.text_config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        vtprune.apply(m, "none")


# ---------------------------------------------------------------- bidirectional image blocks after pruning
def stock_on_kept_tokens(model, x: dict, index: torch.Tensor, blocks: bool = True) -> torch.Tensor:
    """The stock model's logits [B, n, V] on the prompt tokens ``index`` [B, n] alone: their input embeddings
    (image features scattered in as the model does), their original position ids and ``token_type_ids``
    (so the model's own masks make the kept image tokens of each image one bidirectional block), and their
    padding mask."""
    ids = x["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(x["pixel_values"]).pooler_output
        embeds[ids == IMAGE_TOKEN] = features.flatten(0, 1).to(embeds.dtype)
        gather = functools.partial(torch.gather, dim=1, index=index)
        kept = torch.gather(embeds, 1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        extra = {"token_type_ids": gather(x["token_type_ids"])} if blocks else {}
        return model(inputs_embeds=kept, attention_mask=gather(x["attention_mask"]),
                     position_ids=gather(positions(x)), **extra).logits


def positions(x: dict) -> torch.Tensor:
    """The position ids ``generate`` gives a left-padded prompt."""
    mask = x["attention_mask"]
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("images", [1, 2])
def test_pruned_before_layer_0_equals_the_stock_model_on_the_kept_tokens(attn, images):
    """Random pruning before layer 0 keeps 5 of each image's tokens: every layer's output then equals the
    stock model's on those tokens alone, which builds its own masks (each image's kept tokens one
    bidirectional block, causal elsewhere; sliding layers inside their window) and rotary embeddings of
    both layer types at the original positions. Without the blocks the logits differ."""
    m = tiny(attn)
    x = inputs([prompt(2, 4, 1, images), prompt(5, 9, 2, images), prompt(3, 2, 3, images)],
               [[image(10 * b + i) for i in range(images)] for b in range(3)])
    with vtprune.apply(m, "random", budget=5, seed=1) as run, torch.no_grad():
        logits = m(**x, position_ids=positions(x)).logits  # [B, S, V] at the original positions
    index = run.gen.layouts[0].index
    pruned = torch.gather(logits, 1, index[..., None].expand(-1, -1, logits.shape[-1]))
    assert index.shape[1] == x["input_ids"].shape[1] - images * (N - 5)
    valid = torch.gather(x["attention_mask"], 1, index).bool()
    stock = stock_on_kept_tokens(m, x, index)
    assert torch.allclose(pruned[valid], stock[valid], atol=1e-4)
    causal = stock_on_kept_tokens(m, x, index, blocks=False)
    assert not torch.allclose(pruned[valid], causal[valid], atol=1e-2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masks_of_pruned_layers_are_the_stock_masks_at_the_kept_tokens(attn):
    """FastV prunes before layer 2: each later layer's mask is the stock model's mask of that layer type
    (full: OR(causal, block); sliding: AND(window, OR(causal, block))) at the kept queries and keys, for
    every real query of the left-padded batch."""
    m, x = tiny(attn), batch()
    with LayerSpy(m) as stock:
        generate(m, x)
    with vtprune.apply(m, "fastv", budget=5, layer=2) as run, LayerSpy(m, run) as spy:
        generate(m, x)
    allowed = (lambda mask: mask) if attn == "sdpa" else (lambda mask: mask == 0)
    for layer in range(2, LAYERS):
        want, got = stock.prefill()[layer], spy.prefill()[layer]
        index = got["index"]
        assert index.shape[1] < x["input_ids"].shape[1]
        full = allowed(want["mask"])[:, 0]
        at_kept = torch.stack([full[b][index[b]][:, index[b]] for b in range(3)])
        real = torch.gather(x["attention_mask"], 1, index).bool()
        assert torch.equal(allowed(got["mask"])[:, 0][real], at_kept[real]), layer
    # the kept image tokens of a sample attend forward to each other (the block), not to later text
    kept = run.gen.layer_visual[2][0, 0]
    slots = torch.searchsorted(spy.prefill()[2]["index"][0], kept)
    mask = allowed(spy.prefill()[2]["mask"])[0, 0]
    assert mask[slots[0], slots[-1]] and mask[slots[-1], slots[0]]
    assert not mask[slots[0], slots[-1] + 2]


def test_the_tiny_model_uses_its_image_blocks(model):
    """Without ``token_type_ids`` (no blocks) the tiny model generates something else: the tests above can
    see a lost block."""
    x = batch()
    causal = {k: v for k, v in x.items() if k != "token_type_ids"}
    assert not torch.equal(generate(model, x, new=8), generate(model, causal, new=8))


# ---------------------------------------------------------------- sliding-window layers
@pytest.mark.parametrize("method,opts", [("fastv", {"budget": 4}), ("parvts", {"budget": 4}), ("st3", {})])
def test_inside_the_window_the_sliding_layers_change_nothing(model, method, opts):
    """The same weights with a window far beyond the generation give the same pruned output: inside the
    window the engine's causal-or-block masks are the sliding layers' masks."""
    x = batch()
    wide = tiny(window=4096)
    outs = []
    for m in (model, wide):
        with vtprune.apply(m, method, **opts):
            outs.append(generate(m, x, new=8))
    assert torch.equal(*outs)


# ---------------------------------------------------------------- scaling
def test_scores_use_query_pre_attn_scalar(model, monkeypatch):
    """The scoring entry receives the scale Gemma 3's attention passes, ``query_pre_attn_scalar ** -0.5``."""
    seen = []

    def recording(query, key, rows, mask, scaling):
        seen.append(scaling)
        return row_logits(query, key, rows, mask, scaling)

    row_logits = attention.row_logits
    monkeypatch.setattr(attention, "row_logits", recording)
    with vtprune.apply(model, "fastv", budget=4):
        generate(model, batch(), new=2)
    head_dim = model.config.text_config.head_dim
    assert seen and set(seen) == {SCALAR**-0.5} and SCALAR**-0.5 != head_dim**-0.5


# ---------------------------------------------------------------- pan-and-scan crops
def pan_and_scan_batch() -> dict:
    """Sample 0: a square image (no crop: 1 image of N tokens); sample 1: a 32 x 96 px one (the original and
    3 crops: 4 images)."""
    return inputs(PROMPTS[:2], [[image(0)], [image(1, (32, 96))]], do_pan_and_scan=True, pan_and_scan_min_crop_size=8)


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"budget": 4}), ("visionzip", {"budget": 4})])
def test_pan_and_scan_crops_run_as_groups_and_equal_one_by_one(method, opts):
    m, x = tiny(window=512), pan_and_scan_batch()
    assert x["pixel_values"].shape[0] == 5
    with vtprune.apply(m, method, **opts) as run:
        together = generate(m, x)
        assert [s["visual_tokens_in"] for s in run.report()["samples"]] == [N, 4 * N]
        for i, rows in ((0, slice(0, 1)), (1, slice(1, 5))):
            keep = x["attention_mask"][i].bool()
            one = {k: x[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "token_type_ids")}
            assert torch.equal(generate(m, dict(one, pixel_values=x["pixel_values"][rows]))[0], together[i]), i
    if method == "none":  # the stock model batches them itself: the groups give its output
        assert torch.equal(generate(m, x), together)
