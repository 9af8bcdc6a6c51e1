"""Reading a model call's arguments by what they are, not by the keyword transformers gives them.

``generate`` and the model classes rename their keywords between releases: transformers 5.24 passes the
KV cache as ``cache=`` where 5.17-5.23 passed ``past_key_values=``, and hands the vision features over as
``mm_encoder_outputs=`` (computed before the prefill call) instead of ``pixel_values=``. The engine
therefore finds the cache by its type (a :class:`transformers.Cache`) among the call's arguments, and
raises a clear error when a call of a running generation carries none, so the next rename fails loudly
instead of silently re-running the prefill.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def without_cache(kwargs: dict) -> dict:
    """A copy of ``kwargs`` without its KV cache (found by type, as :func:`find_cache` finds it): for
    whatever the engine keeps of a call beyond it, which must not keep the caller's cache alive."""
    return {k: v for k, v in kwargs.items() if not isinstance(v, Cache)}


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The KV cache passed to a forward call, found by type among its positional and keyword arguments.

    Returns:
        The :class:`~transformers.Cache` instance, or None when the call carries none.

    Raises:
        ValueError: more than one cache object among the arguments (the engine could not tell which
            the model writes to).
    """
    found = [(name, v) for name, v in (*((f"args[{i}]", a) for i, a in enumerate(args)), *kwargs.items())
             if isinstance(v, Cache)]
    if len(found) > 1:
        raise ValueError(f"vtprune: the call carries several KV caches ({[n for n, _ in found]}); pass one")
    return found[0][1] if found else None


def input_ids_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``input_ids`` of a model call (keyword, or the first positional argument), or None."""
    ids = kwargs.get("input_ids")
    if ids is None and args and torch.is_tensor(args[0]) and not torch.is_floating_point(args[0]):
        ids = args[0]
    return ids


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called with (first positional argument or ``hidden_states``).

    Raises:
        ValueError: the call carries neither.
    """
    if args:
        return args[0]
    if "hidden_states" not in kwargs:
        raise ValueError(f"vtprune: a decoder layer was called without hidden states (keywords {sorted(kwargs)})")
    return kwargs["hidden_states"]


def missing_cache_error(kwargs: dict) -> ValueError:
    """The error for a decode-looking call of a running generation that carries no KV cache."""
    return ValueError(
        "vtprune: a model call inside generate carries no KV cache (no transformers Cache among its "
        f"arguments; keywords {sorted(kwargs)}), so vtprune cannot tell a decode step from a new prefill. "
        "Generate with use_cache=True; if this transformers release passes the cache in a new form, "
        "vtprune does not support it yet")
