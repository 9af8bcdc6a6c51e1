"""Partial attention scores computed beside the fused attention kernel.

The model keeps its own attention implementation (SDPA, FlashAttention-2 or eager). While a vtprune
run is attached, the language model's config names ``vtprune_<impl>``, an entry registered in
transformers' ``AttentionInterface`` that calls the original kernel unchanged and, only on the layers a
method asked for, also computes the attention logits of a few query rows against every key in the
cache: O(rows x keys) per scored layer, never the full attention matrix, never eager.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "vtprune_"

# attention module -> callback(module, query, key, mask) deciding whether to score this call.
_LISTENERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def row_logits(
    query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention logits of selected query rows against all keys, in fp32, masked entries at -inf.

    Args:
        query: [B, H, q, d] post-RoPE queries of the layer.
        key: [B, H_kv, k, d] post-RoPE keys (the whole cache after this step's update); GQA-aware:
            H must be a multiple of H_kv.
        rows: LongTensor [B, r] query rows to score.
        mask: None (causal, aligned to the end of the keys), or [B, 1, q, k] bool (True = attend) or
            additive float mask, as passed to the attention kernel.
        scaling: the softmax scale (1 / sqrt(d) for these models).

    Returns:
        [B, H, r, k] fp32 logits; softmax over the last dim gives the attention row.

    Source: METHODS.md, shared conventions (scores from post-RoPE query rows against the cache).
    """
    b, h, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    idx = rows.to(query.device)[:, None, :, None].expand(-1, h, -1, d)
    q = torch.gather(query, 2, idx).float()
    k = key.float().repeat_interleave(h // kv_heads, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is None:
        # causal with queries at the end of the keys: row i sees keys [0, k_len - q_len + i]
        last_visible = rows.to(query.device) + (k_len - q_len)
        allowed = torch.arange(k_len, device=query.device)[None, None, :] <= last_visible[:, :, None]
        allowed = allowed[:, None]
    else:
        m = torch.gather(mask, 2, rows.to(mask.device)[:, None, :, None].expand(-1, mask.shape[1], -1, k_len))
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return logits.masked_fill(~allowed, float("-inf"))


def _make_wrapper(original: str) -> Callable:
    def vtprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        if original == "eager":  # eager lives in each modeling file, next to the attention class
            kernel = sys.modules[type(module).__module__].eager_attention_forward
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[original]
        out = kernel(module, query, key, value, attention_mask, *args, **kwargs)
        listener = _LISTENERS.get(module)
        if listener is not None:
            listener(module, query, key, attention_mask, kwargs.get("scaling", module.scaling))
        return out

    vtprune_attention.__name__ = f"{PREFIX}{original}"
    return vtprune_attention


def register(original: str) -> str:
    """Register (once per process) the scoring wrapper of attention implementation ``original``.

    Returns the registered name, ``vtprune_<original>``. Raises ValueError for an implementation
    transformers does not know.
    """
    name = PREFIX + original
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if original not in ALL_ATTENTION_FUNCTIONS and original != "eager":
        raise ValueError(
            f"attention implementation {original!r} is not supported; use one of "
            f"{sorted(k for k in ALL_ATTENTION_FUNCTIONS.keys() if not k.startswith(PREFIX))} or 'eager'"
        )
    AttentionInterface.register(name, _make_wrapper(original))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def listen(module: torch.nn.Module, callback: Callable) -> None:
    """Call ``callback(module, query, key, mask, scaling)`` after each attention call of ``module``."""
    _LISTENERS[module] = callback


def unlisten(module: torch.nn.Module) -> None:
    """Stop listening to ``module`` (no error if it was not listened to)."""
    _LISTENERS.pop(module, None)
