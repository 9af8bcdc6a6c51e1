"""The per-layer rewrite: a decoder layer's call arguments for the sequence and KV cache the generation
holds at that layer.

Before a prefill layer whose sequence is not the stock one, the layer gets the position embeddings and
position ids gathered at its tokens' **original** indices (RoPE / M-RoPE is never recomputed for a
shortened sequence) and a mask built for that sequence; before a decode layer whose cache is not the
stock one, a mask for its cache. Masks per attention implementation:

* SDPA: None where its causal kernel is exact (single sequence, no padding), else a [B, 1, q, k] boolean
  mask;
* eager: always an additive float mask;
* FlashAttention (``flash_attention_2`` / ``_3``): None or a [B, k] padding mask of the layer's keys
  (left padding), and a [B, 1, q, k] boolean mask only on layers that hold packed paths, which the scoring
  entry runs with SDPA instead (FlashAttention takes no arbitrary mask; :mod:`vtprune.engine.attention`).

A sliding-window layer's mask also applies its window by original index once the tokens outnumber it, and
hides the entries evicted while decoding that its cache still holds (:mod:`vtprune.engine.window`).
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.engine.attention import FLASH
from vtprune.engine.layout import Layout, build_mask, gather_position_embeddings, gather_tokens, padding_mask
from vtprune.engine.state import Generation


class LayerRewrite:
    """Call arguments of the decoder layers of one model with attention implementation ``impl``; caches
    what stays the same between layers (a layout's positions and mask, a cache index's decode mask)."""

    def __init__(self, impl: str, dtype: torch.dtype):
        self.impl = impl
        self.flash = impl in FLASH
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget the cached positions and masks (a new generation)."""
        # keyed by object ids; each value keeps its layout alive, so an id is never reused within a generation
        self._positions: dict[tuple, tuple[Any, Any, Layout]] = {}
        self._masks: dict[tuple, tuple[torch.Tensor | None, Layout, Any]] = {}
        self._decode: dict[tuple, torch.Tensor | None] = {}

    def new_step(self) -> None:
        """A decode step starts: the keys have grown, cached decode masks are stale."""
        self._decode = {}

    def prefill(self, gen: Generation, kwargs: dict) -> None:
        """Set ``position_embeddings``, ``position_ids`` (when the layer takes them) and
        ``attention_mask`` of a prefill layer's call to those of ``gen.layout``. The position embeddings
        and ids are gathered from the ones the language model hands this layer: the stock, full-length
        ones (models whose layers differ in type, as Gemma 3's sliding and full layers, hand each type
        its own). Layouts stay alive in ``gen.layouts`` for the generation, so their ids key the caches."""
        lay = gen.layout
        pe_in, pos_in = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        key = (id(lay), _identity(pe_in), _identity(pos_in))
        if key not in self._positions:
            at = lay.index - gen.offset  # the inputs cover this call's tokens only (offset .. S-1)
            self._positions[key] = (gather_position_embeddings(pe_in, at) if pe_in is not None else None,
                                    gather_tokens(pos_in, at) if pos_in is not None else None, lay)
        prior = gen.prior[gen.layer] if gen.offset else None
        window = gen.windows.window(gen, gen.layer) if gen.windows is not None else None
        mask_key = (id(lay), id(prior), window)
        if mask_key not in self._masks:
            self._masks[mask_key] = (self.mask(gen, lay, gen.prefill_keys(gen.layer, lay), window), lay, prior)
        pe, pos, _ = self._positions[key]
        kwargs["position_embeddings"] = pe
        if "position_ids" in kwargs:
            kwargs["position_ids"] = pos
        kwargs["attention_mask"] = self._masks[mask_key][0]

    def decode_mask_needed(self, gen: Generation) -> bool:
        """Whether a decode layer whose cache is not the stock one needs a mask of the engine's: with
        padding, or eager attention (additive masks); SDPA and FlashAttention need none for one query."""
        return gen.has_padding or self.impl == "eager"

    def decode(self, gen: Generation, layer: int, kwargs: dict) -> None:
        """Set ``attention_mask`` of a decode layer's call whose cache is not the stock one."""
        mask, windows = None, gen.windows
        window = windows.window(gen, layer) if windows is not None else None
        group = windows.key_group(gen, layer) if windows is not None else None
        if self.decode_mask_needed(gen) or window is not None or group is not None:
            key = (id(gen.cache_index[layer]), *(windows.mask_key(layer, window) if windows is not None else ()))
            if key not in self._decode:
                keys = Layout(gen.key_index(layer), group)
                query = Layout(torch.full((gen.batch_size, 1), gen.total_length() - 1, device=keys.index.device))
                self._decode[key] = self.mask(gen, query, keys, window)
            mask = self._decode[key]
        kwargs["attention_mask"] = mask

    def mask(self, gen: Generation, query: Layout, keys: Layout, window: int | None = None) -> torch.Tensor | None:
        """The attention mask of a layer whose queries / keys are ``query`` / ``keys`` (module docstring):
        None, a [B, n_k] padding mask (FlashAttention) or a [B, 1, n_q, n_k] mask (boolean, or additive
        in the model dtype for eager). Prompt tokens that attend to each other in both directions
        (``gen.blocks``, Gemma 3's image tokens) need the full mask in the prefill, as packed paths and a
        sliding ``window`` (tokens, by original index) do."""
        packed = query.group is not None or keys.group is not None
        blocks = gen.blocks if gen.phase == "prefill" else None
        full = packed or blocks is not None or window is not None
        if self.flash and not full:
            return padding_mask(keys.index, gen.valid) if gen.has_padding else None
        # SDPA's causal kernel aligns queries to the first keys: exact only when they are the same tokens
        behind = gen.phase == "prefill" and keys.length != query.length  # earlier turns' entries first
        if full or gen.has_padding or behind or self.impl != "sdpa":
            return build_mask(query, keys, gen.valid, self.dtype if self.impl == "eager" else None, blocks, window)
        return None


def _identity(x: Any) -> Any:
    """What identifies a layer input for the cache: the tensor objects (a tuple's members), or None."""
    if isinstance(x, tuple):
        return tuple(id(t) for t in x)
    return None if x is None else id(x)
