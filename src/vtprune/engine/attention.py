"""Partial attention scores computed beside the fused attention kernel.

The model keeps its own attention implementation (SDPA, FlashAttention-2 / -3 or eager). While a vtprune
run is attached, the language model's config names ``vtprune_<impl>``, an entry registered in
transformers' ``AttentionInterface`` that calls the original kernel unchanged and, only on the layers a
method asked for, also computes the attention logits of a few query rows against every key in the
cache: O(rows x keys) per scored layer, never the full attention matrix, never eager.

FlashAttention (``flash_attention_2`` / ``flash_attention_3``, see :data:`FLASH`). The kernel computes
causal attention aligned bottom-right and accepts no mask but a 2-D padding mask ``[B, k_len]`` (True / 1
= a real key), so the engine gives a flash layer None (single path, no padding) or that 2-D mask (left
padding; transformers' glue then unpads and calls the varlen kernel). The wrapper calls transformers' own
glue (``integrations/flash_attention.py``) with three adjustments:

- it drops ``position_ids`` from the call: RoPE is applied before the kernel, and with no mask at batch 1
  the glue reads position ids that are not one contiguous range (the original, gapped positions of a
  pruned layer) as packed sequences (``_is_packed_sequence``, a host sync per layer) and splits them at
  every occurrence of the smallest position into separately attended segments;
- the glue loads its kernels by ``module.config._attn_implementation``, which names ``vtprune_<impl>`` while
  a run is attached; during the call the config names the original implementation again;
- a 4-D mask (the engine builds one only for layers that hold several paths packed in one
  sequence, where a path must not see the other, and for sliding-window layers whose window, by original
  position, hides keys: not "causal + padding") goes to transformers' SDPA
  kernel (``sdpa_attention_forward``) with that boolean mask instead, for that call only. FlashAttention
  has no arbitrary masks; the fallback is ours (reconstructed), not part of any method.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "vtprune_"
FLASH = ("flash_attention_2", "flash_attention_3")  # kernels taking None or a 2-D padding mask (module docstring)

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
        mask: as passed to the attention kernel: None (causal, aligned to the end of the keys), a
            [B, k] padding mask (bool / int, True or 1 = a real key; FlashAttention: causal aligned to the
            end of the keys, and only those keys), or a [B, 1, q, k] bool (True = attend) or additive
            float mask.
        scaling: the softmax scale (1 / sqrt(d) for these models).

    Returns:
        [B, H, r, k] fp32 logits; softmax over the last dim gives the attention row.

    Source: METHODS.md, shared conventions (scores from post-RoPE query rows against the cache).
    """
    b, h, q_len, d = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    idx = rows.to(query.device)[:, None, :, None].expand(-1, h, -1, d)
    r = rows.shape[1]
    # GQA: query head j reads key head j // (h / kv_heads); group the query heads by their key head so that
    # one matmul per key head scores them all, instead of copying every key h / kv_heads times
    q = torch.gather(query, 2, idx).float().reshape(b, kv_heads, (h // kv_heads) * r, d)
    logits = (torch.matmul(q, key.float().transpose(-1, -2)) * scaling).view(b, h, r, k_len)
    if mask is None and q_len == 1:  # a decode step's one query sees every key (no padding)
        return logits
    if mask is None or mask.dim() == 2:
        # causal with queries at the end of the keys: row i sees keys [0, k_len - q_len + i]
        last_visible = rows.to(query.device) + (k_len - q_len)
        allowed = torch.arange(k_len, device=query.device)[None, None, :] <= last_visible[:, :, None]
        if mask is not None:  # a 2-D padding mask covers the last k_len keys (as transformers slices it)
            allowed = allowed & mask[:, -k_len:].to(query.device, torch.bool)[:, None, :]
        allowed = allowed[:, None]
    else:
        m = torch.gather(mask, 2, rows.to(mask.device)[:, None, :, None].expand(-1, mask.shape[1], -1, k_len))
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return logits.masked_fill(~allowed, float("-inf"))


def _flash_attention(original: str, module, query, key, value, attention_mask, *args, **kwargs):
    """Call FlashAttention ``original`` through transformers' glue as the module docstring says.

    Args:
        query: [B, H, q, d]; key / value: [B, H_kv, k, d] (post-RoPE, the whole cache after this step).
        attention_mask: None or [B, k] padding mask for the kernel; a [B, 1, q, k] bool mask sends this
            call to SDPA.

    Returns:
        The kernel's (output [B, q, H, d], None).
    """
    kwargs.pop("position_ids", None)  # gapped positions of a pruned layer must not read as packed sequences
    if attention_mask is not None and attention_mask.dim() == 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    config = module.config
    name = config._attn_implementation
    config._attn_implementation = original  # the glue loads its kernels by this name
    try:
        return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        config._attn_implementation = name


def _make_wrapper(original: str) -> Callable:
    def vtprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        if original == "eager":  # eager lives in each modeling file, next to the attention class
            out = sys.modules[type(module).__module__].eager_attention_forward(
                module, query, key, value, attention_mask, *args, **kwargs)
        elif original in FLASH:
            out = _flash_attention(original, module, query, key, value, attention_mask, *args, **kwargs)
        else:
            out = ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, *args, **kwargs)
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
