"""Gemma 3 past its sliding window (``engine/window.py``): the tiny Gemma 3 of ``gemma3_tiny.py`` with a window
of SHORT tokens, shorter than every prompt of the batch (33 tokens padded; 24, 25 and 33 real) and than the
answers (NEW new tokens, more than the window: the tokens fed back fall out of it too), and one of MID
tokens, longer than two of the prompts and shorter than each prompt plus its answer (the cache layers start
dropping while decoding). Every registered method: keep-all = stock token for token, a left-padded batch =
each sample alone; a method that keeps every token through every stage the engine has (packed paths longer
than the window, evictions while decoding) = stock token for token; by hand, the keys a pruned sliding
layer's queries see are exactly its kept tokens within the window, by original index.
"""

from __future__ import annotations

import dataclasses
import functools

import gemma3_tiny
import pytest
import torch
from conftest import cache_keyword, output_cache
from gemma3_tiny import LAYER_TYPES, LAYERS, batch
from sync_detector import SyncDetector
from transformers import DynamicCache

import vtprune
from vtprune.engine.decisions import KeepVisual, MergePaths, SplitPaths
from vtprune.methods.base import Method

SHORT, MID = 16, 28  # sliding windows (tokens)
NEW = 20  # new tokens: > SHORT, and every prompt + NEW > MID
METHODS = sorted(vtprune.METHODS)
SLIDING = [i for i, t in enumerate(LAYER_TYPES) if t == "sliding_attention"]

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def tiny(attn: str = "sdpa", window: int = SHORT):
    return gemma3_tiny.tiny_gemma3(attn, window=window)


def generate(model, x: dict, new: int = NEW, **kwargs) -> torch.Tensor:
    return model.generate(**x, max_new_tokens=new, do_sample=False, **kwargs)[:, -new:]


@functools.cache
def stock(attn: str, window: int, idx: tuple[int, ...]) -> torch.Tensor:
    return generate(tiny(attn, window), batch(idx))


def options(method: str, kind: str) -> dict:
    return dict(vtprune.METHODS[method].examples[kind])


def test_the_tiny_model_uses_its_window():
    """The window changes the stock answers (the tests below can see a wrong window), and every prompt and
    answer outgrows SHORT."""
    x = batch()
    assert x["input_ids"].shape[1] > SHORT and x["attention_mask"].sum(1).min() > SHORT and NEW > SHORT
    assert x["attention_mask"].sum(1).min() < MID < x["attention_mask"].sum(1).min() + NEW
    assert not torch.equal(stock("sdpa", SHORT, (0, 1, 2)), generate(tiny(window=4096), x))


@pytest.mark.parametrize("method", METHODS)
def test_keeping_every_token_equals_stock_past_the_window(method):
    m = tiny()
    for idx in ((1,), (0, 1, 2)):
        with vtprune.apply(m, method, **options(method, "keep_all")):
            assert torch.equal(generate(m, batch(idx)), stock("sdpa", SHORT, idx)), idx


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_one_by_one_past_the_window(method):
    m, idx = tiny(), (0, 1)
    with vtprune.apply(m, method, **options(method, "prune")) as run:
        together = generate(m, batch(idx))
        counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
        for i in idx:
            assert torch.equal(generate(m, batch((i,)))[0], together[i]), i
    if method != "none":
        assert min(counts) < gemma3_tiny.N  # it prunes
        assert not torch.equal(together, stock("sdpa", SHORT, idx))


@pytest.mark.parametrize("method", ["parvts", "st3"])
def test_eager_attention_past_the_window(method):
    """Eager attention takes the engine's additive masks at every layer (SDPA none where it may)."""
    m = tiny("eager")
    x = batch((0, 1))
    with vtprune.apply(m, method, **options(method, "keep_all")):
        assert torch.equal(generate(m, x), stock("eager", SHORT, (0, 1)))
    with vtprune.apply(m, method, **options(method, "prune")):
        together = generate(m, x)
        for i in (0, 1):
            assert torch.equal(generate(m, batch((i,)))[0], together[i]), i


@pytest.mark.parametrize("method,opts", [("st3", {"anneal_every": 1}), ("fastv", {"budget": 4})])
def test_prompts_inside_the_window_whose_answers_outgrow_it(method, opts):
    """MID: the cache layers start dropping while decoding (ST3 first removes evicted entries, then hides
    them); the batch is padded past the window, its shorter samples alone are not."""
    m = tiny(window=MID)
    with vtprune.apply(m, "none"):
        assert torch.equal(generate(m, batch()), stock("sdpa", MID, (0, 1, 2)))
    with vtprune.apply(m, method, **opts):
        together = generate(m, batch())
        for i in range(3):
            assert torch.equal(generate(m, batch((i,)))[0], together[i]), i


@dataclasses.dataclass(frozen=True)
class KeepAllTheHardWay(Method):
    """Keeps every visual token, through every stage that makes the engine's sequences and caches differ from
    the stock ones: before layer 0 two packed paths (path 1: every visual token and the question; path 2: no
    visual token and a copy of the question; longer than the prompt), merged into path 1 before layer 2;
    every decode step, every layer "evicts" down to all the visual tokens it holds."""

    name = "keep-all-the-hard-way"

    def on_prefill_layer(self, view, plan):
        if view.layer == 0:
            return (SplitPaths(self._all(view), (1, 2)),)
        return (MergePaths(1, 1),) if view.layer == 2 else ()

    def on_decode_layer(self, view, plan):
        return (KeepVisual(self._all(view)),)

    @staticmethod
    def _all(view) -> torch.Tensor:
        return torch.arange(view.visual_count()).expand(view.batch_size, view.n_images, -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [SHORT, MID])
def test_keeping_every_token_through_every_stage_equals_stock(attn, window):
    """Nothing of the engine's is the stock sequence or cache, and the answers are the stock ones: the
    masks apply the window by original index in the packed and merged prefill and while decoding, the
    packed sliding layers keep the merged sequence's last entries, and the engine follows what the cache
    layers drop."""
    m = tiny(attn, window)
    for idx in ((1,), (0, 1, 2)):
        x = batch(idx)
        with vtprune.apply(m, KeepAllTheHardWay()) as run:
            out = m.generate(**x, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        assert torch.equal(out.sequences[:, -NEW:], stock(attn, window, idx)), idx
        assert not run.gen.stock
        # layer 0 (sliding) counts every token it was fed: the packed paths were longer than the prompt
        assert output_cache(out).layers[0].get_seq_length() > x["input_ids"].shape[1] + NEW - 1


class Keys:
    """Per decode step, the keys each sliding layer's queries see, as token indices: the KV cache's update
    is wrapped (a token's keys are recorded when it enters the cache: the prefill sequence of that layer,
    ``run.gen.layouts[layer].index``, then one token per step), and an entry counts as seen where the
    layer's attention weights are not zero (eager)."""

    def __init__(self, model, run, cache: DynamicCache):
        self.run, self.cache = run, cache
        self.entered: dict[int, list[torch.Tensor]] = {layer: [] for layer in SLIDING}  # [B, H, n, d] per update
        self.seen: list[dict] = []  # per decode step and sliding layer: its keys, which it saw, its visual tokens
        self._full: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer in SLIDING:
            cache_layer = cache.layers[layer]
            cache_layer.update = functools.partial(self._update, layer, cache_layer.update)
            self.handles.append(model.model.language_model.layers[layer].self_attn.register_forward_hook(
                functools.partial(self._attended, layer)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _update(self, layer, update, keys, values, *args, **kwargs):
        self.entered[layer].append(keys.clone())
        full_keys, full_values = update(keys, values, *args, **kwargs)
        self._full[layer] = full_keys
        return full_keys, full_values

    def _attended(self, layer, module, args, output):
        gen = self.run.gen
        if gen.phase != "decode":
            return
        weights = output[1]  # [B, H, 1, k] (eager)
        assert gen.key_index(layer).shape[1] == weights.shape[-1] == self._full[layer].shape[2]
        self.seen.append(dict(layer=layer, step=gen.step, keys=self._full[layer].clone(), listed=gen.key_index(layer),
                              seen=weights[:, :, 0].sum(1) > 0, visual=gen.cache_visual[layer].clone()))

    def token_keys(self, layer) -> dict[tuple[int, int], torch.Tensor]:
        """(sample, token index) -> its keys [H, d] at ``layer``."""
        gen = self.run.gen
        prefill, *fed = self.entered[layer]
        out = {}
        index = gen.layouts[layer].index
        for b in range(gen.batch_size):
            for slot, i in enumerate(index[b].tolist()):
                out[b, i] = prefill[b, :, slot]
            for t, k in enumerate(fed):
                out[b, gen.prompt_length + t] = k[b, :, 0]
        return out


@pytest.mark.parametrize("method,opts,window", [("fastv", {"budget": 4, "layer": 2}, SHORT),
                                                ("st3", {"anneal_every": 1}, MID)])
def test_a_pruned_sliding_layer_sees_exactly_its_kept_tokens_within_the_window(method, opts, window):
    """At every decode step and sliding layer past the pruning layer, the entries the queries attend to
    carry exactly the keys of the tokens the layer kept (its prefill sequence, less what the method evicted
    while decoding, plus the tokens fed back) that are real and within the window by ORIGINAL index
    (i > p - W for the query at p), in order; and the engine's list of the layer's keys has the cache's
    length at each step. (ST3 with MID: it evicts visual tokens inside the window from layers whose cache
    layer has dropped entries, which hides them.)"""
    m, x = tiny("eager", window), batch((0, 1))
    cache = DynamicCache(config=m.config)
    with vtprune.apply(m, method, **opts) as run, Keys(m, run, cache) as keys:
        generate(m, x, **{cache_keyword(m): cache})
    gen, valid = run.gen, x["attention_mask"].bool()
    s, checked = gen.prompt_length, 0
    for layer in SLIDING:
        by_token = keys.token_keys(layer)
        pruned = gen.layouts[layer].index.shape[1] < s
        for call in (c for c in keys.seen if c["layer"] == layer):
            p = s + call["step"] - 1  # the query's index
            for b in range(2):
                listed = set(gen.text_index[b].tolist()) | set(call["visual"][b].flatten().tolist())
                kept = sorted(set(gen.layouts[layer].index[b].tolist()) & listed)
                want = [i for i in kept + list(range(s, p + 1)) if i > p - window and (i >= s or valid[b, i])]
                got = call["keys"][b][:, call["seen"][b]].transpose(0, 1)  # [n, H, d]
                assert torch.equal(got, torch.stack([by_token[b, i] for i in want])), (layer, call["step"], b)
                assert call["listed"][b][call["seen"][b]].tolist() == want  # the engine's list, entry for entry
            checked += pruned
    assert checked  # pruned sliding layers were checked
    if method == "st3":  # it evicted from sliding layers whose cache layer had dropped entries: hidden entries
        assert any(h is not None for h in gen.windows.hidden)


def test_packed_paths_longer_than_the_window_keep_the_last_entries_of_the_merged_sequence():
    """ParVTS's packed paths are longer than the window: their sliding layers record the whole packed
    sequence, and after the merge keep its last window - 1 entries, as the cache layer keeps of any
    sequence; the engine's lists of those layers' keys follow."""
    m, x = tiny(), batch((0, 1))
    with vtprune.apply(m, "parvts", budget=4, discard_layer=2) as run:
        out = m.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    gen = run.gen
    assert gen.layouts[0].index.shape[1] > SHORT  # the merged sequence outgrows the window
    cache = output_cache(out)
    for layer in range(LAYERS):
        held = cache.layers[layer].keys.shape[2]
        listed = gen.layouts[layer].index.shape[1] + 2  # + the tokens fed back (3 new: 2 cached)
        assert held == (min(listed, SHORT - 1) if layer in SLIDING else listed), layer
        assert not getattr(cache.layers[layer], "record_past", False)


def test_no_host_sync_past_the_window():
    """Following the cache layers, applying the window and hiding evicted entries (ST3 evicts while
    decoding) sync nothing while decoding."""
    m, new = tiny(), 12  # the padded prompt outgrows the window: the cache layers drop from the first step
    with vtprune.apply(m, "st3", **options("st3", "prune")) as run, torch.no_grad(), SyncDetector(m) as det:
        m.generate(**batch(), max_new_tokens=new, do_sample=False)
    assert det.decode_calls == new - 1
    assert not det.of("decode"), "vtprune synced in the decode loop:\n" + "\n".join(map(str, det.of("decode")))
    assert any(h is not None for h in run.gen.windows.hidden)
