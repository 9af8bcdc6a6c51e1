"""KV caches a run filled, followed beyond the call that filled them: a later call on such a cache
continues the conversation.

transformers' documented multi-turn pattern hands the cache one ``generate`` returned to the next
``generate`` with the whole conversation so far; ``generate`` feeds only the tokens the cache does not
hold yet, counting them with ``cache.get_seq_length()``. Under pruning a layer's cache holds fewer entries
than the tokens it has seen (layer 0's too, for methods that prune before the language model, and
multi-path schedules after their merge), so the engine records, for every cache it fills, a :class:`CacheRecord`: the
conversation's length in tokens (what the stock cache would hold) and, per layer, the original indices of
the entries it holds. The cache's ``get_seq_length`` is made to answer the conversation's length (the
stock model's answer), so ``generate`` slices the new tokens and the model derives their positions as
it would without pruning. A later call on the cache is then a prefill of the new tokens whose keys are
the recorded entries plus the new tokens (:class:`vtprune.engine.state.Generation`'s ``offset`` and
``prior``); nothing recorded is pruned again.

Beam search reorders the cache's batch rows between decode steps (``Cache.reorder_cache``); the engine
follows it for the generation in progress (:func:`follow_reorder`), since decode-time evictions
(ST³'s annealing) leave the rows of one sample's beams holding different entries.

Records are kept in a weak mapping: they never keep a cache alive. Source: this project's (no method
paper covers a cache across turns; LLMC+, AAAI 2026, reports that token reduction degrades in multi-turn
dialogue, which is what this makes measurable).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache


@dataclasses.dataclass
class CacheRecord:
    """What a cache a run filled holds.

    Attributes:
        owner: ``id`` of the run that filled it (a later call under another run is refused).
        method: that run's method name (for messages).
        batch: the batch rows of the cache (B).
        length: tokens of the conversation the cache has seen (the stock cache's length), updated after
            every call on it.
        index: per layer, LongTensor [B, n_l] of the original token indices of its entries, ascending; None
            for a layer that holds every token (set when the filling call ends).
    """

    owner: int
    method: str
    batch: int
    length: int
    index: list[torch.Tensor | None]


_RECORDS: weakref.WeakKeyDictionary[Cache, CacheRecord] = weakref.WeakKeyDictionary()


def record_of(cache: Cache | None) -> CacheRecord | None:
    """The record of a cache a run filled, or None."""
    return _RECORDS.get(cache) if cache is not None else None


def keep(cache: Cache, record: CacheRecord) -> None:
    """Record ``cache`` and make its ``get_seq_length`` answer ``record.length`` (see the module docstring).
    The override refers to the cache weakly, so it keeps nothing alive; it outlives the run, as the cache
    does (a cache vtprune filled reports the length of the conversation it has seen)."""
    first = cache not in _RECORDS
    _RECORDS[cache] = record
    if first:
        ref = weakref.ref(cache)

        def get_seq_length(layer_idx: int = 0) -> int:
            owner = ref()
            rec = _RECORDS.get(owner) if owner is not None else None
            return rec.length if rec is not None else 0

        cache.get_seq_length = get_seq_length  # type: ignore[method-assign]


def follow_reorder(cache: Cache, on_reorder: Callable[[torch.Tensor], None]) -> Callable[[], None]:
    """Call ``on_reorder(beam_idx)`` after each ``cache.reorder_cache(beam_idx)``; returns the undo.

    The wrapper refers to ``on_reorder``'s owner strongly only while installed; the undo removes it."""
    if "reorder_cache" in vars(cache):
        raise RuntimeError("vtprune: this cache's reorder_cache is already followed by a generation in progress")
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.LongTensor) -> None:
        original(beam_idx)
        on_reorder(beam_idx)

    cache.reorder_cache = reorder_cache  # type: ignore[method-assign]

    def undo() -> None:
        vars(cache).pop("reorder_cache", None)

    return undo


def continuation_error(record: CacheRecord | None, run_id: int, method: str) -> ValueError | None:
    """The error for a later call on a cache (whose record is ``record``, None when no run filled it) that the
    run ``run_id`` (method ``method``) cannot continue, or None."""
    if record is None:
        return ValueError(
            "vtprune: this KV cache already holds tokens but no vtprune run filled it (the model filled it "
            "without vtprune, or it was built by hand), so vtprune cannot tell which tokens each layer holds. "
            "Start the conversation under the run (its first generate with no cache), or continue without vtprune")
    if record.owner != run_id:
        return ValueError(
            f"vtprune: this KV cache was filled under another vtprune run (method {record.method!r}); a run "
            f"(here {method!r}) continues only the caches it filled itself: continue under the run that filled it, "
            "or start a new conversation under this one")
    return None


__all__ = ["CacheRecord", "record_of", "keep", "follow_reorder", "continuation_error"]
