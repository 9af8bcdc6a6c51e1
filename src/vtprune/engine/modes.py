"""Which ``generate`` modes run under vtprune, and a clear refusal, before anything runs, of those that do not.

Works (tested in ``tests/test_generate_modes.py`` and the conformance matrix): greedy and sampling,
``num_beams`` (beam search; the engine follows the cache's reordering), ``num_return_sequences``,
a later turn from the cache an earlier call returned (:mod:`vtprune.engine.conversation`), text-only
prompts (run as stock), left-padded batches, batches of mixed image sizes (as groups).

Refused (each feeds several new tokens per step, or keeps its cache in a form whose entries the engine
cannot select):

* assisted / speculative decoding (``assistant_model``, ``prompt_lookup_num_tokens``,
  ``assistant_early_exit``): several candidate tokens are verified per step and the rejected ones are
  cropped from the cache;
* DoLa (``dola_layers``) and contrastive search (``penalty_alpha``), and any ``custom_generate`` loop:
  in transformers v5 these run from the Hub as custom generation code, whose calls the engine cannot
  vouch for;
* chunked prefill (``prefill_chunk_size``): the prompt arrives in pieces, so the visual tokens of one
  image may straddle two calls;
* static, offloaded and quantized caches (``cache_implementation`` other than ``"dynamic"``): the engine
  shortens each layer's K / V tensors, which a preallocated or quantized cache does not allow. Gemma 3's
  released generation config names ``"hybrid"`` (a static cache): pass ``cache_implementation="dynamic"``.
"""

from __future__ import annotations

from typing import Any

# generation option -> (what it turns on, what to do instead)
REFUSED: dict[str, tuple[str, str]] = {
    "assistant_model": ("assisted (speculative) decoding", "generate without an assistant"),
    "prompt_lookup_num_tokens": ("prompt-lookup (speculative) decoding", "leave prompt_lookup_num_tokens unset"),
    "assistant_early_exit": ("self-speculative (early-exit) decoding", "leave assistant_early_exit unset"),
    "dola_layers": ("DoLa decoding", "leave dola_layers unset"),
    "penalty_alpha": ("contrastive search", "use greedy, sampling or beam search"),
    "custom_generate": ("a custom generation loop", "use generate's own greedy, sampling or beam search"),
    "prefill_chunk_size": ("chunked prefill", "leave prefill_chunk_size unset (prefill in one call)"),
}
CACHES = (None, "dynamic")  # cache implementations whose layers the engine can select entries of


def refuse_unsupported_modes(kwargs: dict, config: Any) -> None:
    """Raise ValueError naming the option and what to do instead when a ``generate`` call (its keyword
    arguments ``kwargs`` over the generation config ``config``) asks for a mode vtprune cannot run (module
    docstring). Nothing has run when it raises."""
    for name, (what, instead) in REFUSED.items():
        value = kwargs.get(name, getattr(config, name, None))
        if value is None or value is False or (name == "penalty_alpha" and not value):
            continue
        raise ValueError(f"vtprune: {name} turns on {what}, which vtprune does not support (it feeds several "
                         f"new tokens per step or runs code vtprune cannot follow): {instead}")
    cache = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if cache not in CACHES:
        raise ValueError(f"vtprune: cache_implementation={cache!r} keeps the KV cache preallocated, offloaded or "
                         "quantized, and vtprune selects entries of each layer's cache: pass "
                         "cache_implementation='dynamic' (Gemma 3's released generation config names 'hybrid')")
    if kwargs.get("static_cache") is not None:
        raise ValueError("vtprune: a static cache cannot be pruned; generate with the default dynamic cache")


__all__ = ["refuse_unsupported_modes", "REFUSED", "CACHES"]
