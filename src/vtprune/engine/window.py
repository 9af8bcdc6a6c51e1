"""Sliding-window layers under pruning: what each one's KV cache holds, and what its queries may see.

A sliding-window layer (``adapter.sliding_window(layer)`` = W, Gemma 3's ``sliding_attention`` layers) lets
the query at index p attend to the keys at indices > p - W (transformers' ``sliding_window_overlay``, on the
indices of the padded input, which are the engine's index space, ``engine/layout.py``); its cache layer
(``DynamicSlidingWindowLayer``) keeps the last W - 1 entries after each update and hands attention those
plus the new ones. Under pruning a layer's cache holds fewer entries than the stock one, and the two rules
part: its last W - 1 entries may reach further back than W positions. The stock semantics is the one kept:

* masks apply the window by original index (``build_mask(window=)``), in the prefill and while decoding,
  so the older entries a pruned cache still holds are hidden;
* what the cache layer dropped is gone, and no later query could have seen it: its entries are distinct
  tokens in increasing index order, so after an update whose last token has index p the W - 1 kept ones
  lie at indices <= p and every dropped one at an index <= p - W + 1, outside the window of every later
  query (index >= p + 1 sees indices >= p - W + 2).

Bookkeeping. Layer l's list of cached tokens is ``Generation.cache_prompt_index(l)`` followed by the tokens
fed back (indices S, S + 1, ...); :attr:`SlidingWindows.dropped` [l] of them, from the front, are no longer
in the cache: read off the cache layer before each decode step of that layer (its entry count, a shape,
no host sync), so the engine drops exactly what the cache layer dropped, by entries, from the front.
``cache_index`` / ``cache_visual`` stay what the method kept (also what fell out of the window), so that
their counts stay the same for every sample and image: the window drops a different number of visual
tokens per sample (left padding moves them) and per image. A visual token the cache layer dropped is not
among the layer's keys (``Generation.key_index``): its attention is -inf for the methods; one outside the
window that the layer still holds is masked: its attention is 0.

Evicting while decoding (``Generation.keep_visual``) from a sliding layer whose cache layer has dropped
entries: the evicted entries are hidden (masked as padding slots, group ``PAD``) rather than removed.
Removing them cannot keep one entry count for every sample (some of the evicted tokens may already be
dropped, a different number per sample) without removing entries a later query sees; a hidden entry
stays until the cache layer drops it, and the layer holds at most W - 1 entries either way. Before the
cache layer drops anything, evictions remove entries as on every other layer.

Packed paths (``engine/paths.py``) are longer than the prompt, in slot order that is not index order; the
cache layer would keep the last W - 1 slots of the packed sequence, which are not the entries the merge
keeps. A sliding layer whose prefill sequence is packed records its whole sequence instead
(``activate_past_recording``, transformers' own switch for keeping a sliding layer's past), and after the
prefill, the paths merged, keeps the last W - 1 entries of its merged sequence, as its cache layer would
have kept of that sequence.

Source: the semantics is transformers' (Gemma 3's ``create_masks_for_vision_model``: sliding layers
AND(window, OR(causal, block)); ``DynamicSlidingWindowLayer``); following it under pruning, hiding evicted
entries and recording packed paths are this project's (reconstructed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtprune.engine.layout import PAD

# the generation whose sliding layers this follows (engine/state.py's Generation, which holds a SlidingWindows:
# named here without importing it, so that the two modules do not import each other)
Generation = Any


class SlidingWindows:
    """The sliding-window layers of one generation (module docstring). Created by the run with the
    generation, read by :class:`~vtprune.engine.state.Generation` and the per-layer rewrite.

    Attributes:
        windows: per layer, its window W (tokens) or None for a full-attention layer.
        dropped: per layer, tokens dropped by its cache layer from the front of its list of cached tokens
            (prompt tokens, then the tokens fed back), as of that layer's last decode step.
        hidden: per layer, None or BoolTensor [B, n_l] aligned with ``Generation.cache_prompt_index(l)``:
            True at an evicted token whose entry the layer still holds (hidden by its masks).
    """

    def __init__(self, windows: Sequence[int | None]):
        self.windows = list(windows)
        self.dropped = [0] * len(self.windows)
        self.hidden: list[torch.Tensor | None] = [None] * len(self.windows)
        self._recording: list[int] = []

    # ------------------------------------------------------------------ prefill
    def record_packed(self, gen: Generation) -> None:
        """Before prefill layer ``gen.layer``: if it is a sliding layer and its sequence is packed, make its
        cache layer (a ``DynamicSlidingWindowLayer``; other kinds are left as they are) keep every entry of
        it (module docstring)."""
        layer, cache = gen.layer, gen.cache
        if self.windows[layer] is None or gen.layout.group is None or cache is None or layer >= len(cache.layers):
            return  # a cache that makes its layers on first use makes full (keep-all) ones
        cache_layer = cache.layers[layer]
        if hasattr(cache_layer, "activate_past_recording"):
            cache_layer.activate_past_recording()
            self._recording.append(layer)

    def end_prefill(self, gen: Generation) -> None:
        """After the prefill call: the layers that recorded their packed sequence keep its last W - 1
        entries (of the merged sequence, in index order) and record no more."""
        for layer in self._recording:
            window = self.windows[layer]
            assert window is not None  # only sliding layers record
            cache_layer, keep = gen.cache.layers[layer], window - 1
            cache_layer.record_past = False
            start = max(cache_layer.keys.shape[-2] - keep, 0)
            cache_layer.keys = cache_layer.keys[:, :, start:]
            cache_layer.values = cache_layer.values[:, :, start:]
        self._recording = []

    # ------------------------------------------------------------------ decode
    def follow(self, gen: Generation, layer: int) -> None:
        """Before decode layer ``layer`` (before the method acts): set ``dropped[layer]`` from its cache
        layer's entry count (the tokens it held after its last update: the prompt entries and the
        ``step - 1`` tokens fed back before this step).

        Raises:
            RuntimeError: the cache layer holds more entries than the engine's list (a cache the engine
                cannot follow).
        """
        if self.windows[layer] is None:
            return
        listed = gen.cache_prompt_index(layer).shape[1] + gen.step - 1
        held = gen.cache.layers[layer].keys.shape[-2]
        if held > listed:
            raise RuntimeError(f"vtprune: the KV cache of sliding-window layer {layer} holds {held} entries, more "
                               f"than the {listed} tokens vtprune kept there")
        self.dropped[layer] = listed - held

    def keys(self, layer: int, listed: torch.Tensor) -> torch.Tensor:
        """The tokens still in ``layer``'s cache: ``listed`` [B, n] (its list of cached tokens, this step's
        included) without the ``dropped[layer]`` first ones."""
        return listed[:, self.dropped[layer]:]

    def key_group(self, gen: Generation, layer: int) -> torch.Tensor | None:
        """Groups of ``layer``'s keys at this decode step, LongTensor [B, k] aligned with
        ``gen.key_index(layer)``: ``PAD`` at a hidden entry, 0 elsewhere; None when none is hidden."""
        hidden = self.hidden[layer]
        if hidden is None:
            return None
        fed = torch.zeros(gen.batch_size, gen.total_length() - gen.prompt_length, dtype=torch.bool,
                          device=hidden.device)
        listed = torch.cat([hidden, fed], dim=1)[:, self.dropped[layer]:]
        return torch.where(listed, PAD, 0)

    def window(self, gen: Generation, layer: int) -> int | None:
        """``layer``'s window when it can hide a key from a query of the current call (the index space
        holds more than W tokens), else None."""
        w = self.windows[layer]
        return w if w is not None and gen.total_length() > w else None

    def hide(self, gen: Generation, layer: int, new_vis: torch.Tensor) -> bool:
        """Evict, while decoding, the visual tokens of ``layer``'s cache not in ``new_vis`` ([B, I, n]
        original indices) by hiding their entries, when the layer is a sliding one whose cache layer has
        dropped entries (or already hides some); sets ``cache_visual[layer]``. Returns False, changing
        nothing, when the entries are to be removed instead (every other layer)."""
        if self.windows[layer] is None or (self.dropped[layer] == 0 and self.hidden[layer] is None):
            return False
        listed = gen.cache_prompt_index(layer)
        kept = torch.zeros(gen.batch_size, gen.prompt_length, dtype=torch.bool, device=listed.device)
        kept.scatter_(1, gen.with_prior(layer, gen.index_with(new_vis)).to(listed.device), True)
        self.hidden[layer] = ~torch.gather(kept, 1, listed)
        gen.cache_visual[layer] = new_vis
        return True

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow beam search's reordering of the cache's rows (``Generation.reorder``)."""
        self.hidden = [h if h is None else h[rows.to(h.device)] for h in self.hidden]

    def mask_key(self, layer: int, window: int | None) -> tuple[Any, ...]:
        """What, besides the list of cached tokens, makes ``layer``'s decode mask differ from another's."""
        return self.dropped[layer], window, id(self.hidden[layer])
