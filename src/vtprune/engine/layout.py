"""Sequence layouts: which original tokens sit in which slot of a layer's sequence, and the surgery
that follows from a layout (gather hidden states / position embeddings, build the attention mask).

Index space. Every prompt token is identified by its index ``i`` in the padded input of the prefill
call (``0 <= i < S``); the ``j``-th token fed back during decoding has index ``S + j``. Position ids and
RoPE / M-RoPE embeddings are never recomputed: they are gathered from the stock model's own tensors at
the original index, so kept tokens keep their original positions (METHODS.md, shared conventions).

Groups. A slot belongs to group 0 (shared by every path), to a path ``g >= 1`` (a multi-path method runs
two groups of visual tokens as paths 1 and 2 packed in one sequence, :mod:`vtprune.engine.paths`) or to ``PAD`` (a filler slot
that nothing attends to, used to give every sample of a batch the same packed length). Slot ``q``
attends to slot ``k`` iff ``index[k] <= index[q]``, ``k`` is not padding, and ``group[k]`` is 0 or equals
``group[q]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD = -1


@dataclass
class Layout:
    """Slots of one layer's sequence.

    Attributes:
        index: LongTensor [B, n], the original token index of each slot (see module docstring).
        group: LongTensor [B, n] of group ids, or None when every slot is in group 0 (a plain, pruned or
            not, single-path sequence sorted by index).
    """

    index: torch.Tensor
    group: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Slots per sample (tokens in this layer's sequence, padding included)."""
        return self.index.shape[1]


def take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The entries of ``x`` at positions ``index[b]`` along ``dim``, per batch row b, every other dim
    whole: the values ``torch.gather`` gives with ``index`` expanded over the other dims, by one
    ``index_select`` instead (the CPU gather kernel reads an int64 index per element: on a [1, 16, 520, 64]
    bf16 KV cache, keeping 390 entries took 590 µs with gather and 56 µs with take on the 2-core VM,
    2026-12-02, ``scripts/bench_kv_select.py``).

    Args:
        x: [B or 1, ..., N, ...] with the N axis at ``dim`` >= 1 (a batch dim of 1 is broadcast).
        index: LongTensor [B, m] of positions in [0, N).

    Returns:
        [B, ..., m, ...], a new tensor in ``x``'s dtype and device.
    """
    batch, m = index.shape
    idx = index.to(x.device)
    if batch == 1 and x.shape[0] == 1:
        return x.index_select(dim, idx[0])
    lead, n, tail = x.shape[1:dim], x.shape[dim], x.shape[dim + 1:]
    pre = math.prod(lead)
    base = torch.arange(pre, device=x.device) * n  # [pre]: the first row of each (batch, lead) block
    if x.shape[0] != 1:
        base = base + torch.arange(batch, device=x.device)[:, None] * (pre * n)  # [B, pre]
    flat = (base.expand(batch, pre)[..., None] + idx[:, None, :]).reshape(-1)
    rows = x.reshape(x.shape[0] * pre * n, math.prod(tail))
    return rows.index_select(0, flat).view(batch, *lead, m, *tail)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the token dimension.

    Args:
        x: [B or 1, S, ...] (hidden states, cos / sin) or [B or 1, S] (position ids).
        index: LongTensor [B, n] of token indices into dim 1 of ``x``.

    Returns:
        [B, n, ...], the rows of ``x`` at ``index`` (``x`` is broadcast over a batch dim of 1).
    """
    if x.dim() == 2:
        idx = index.to(x.device)
        return torch.gather(x.expand(index.shape[0], -1) if x.shape[0] != index.shape[0] else x, 1, idx)
    return take(x, index, 1)


def gather_position_embeddings(pe, index: torch.Tensor):
    """Gather a model's position embeddings (a (cos, sin) tuple of [B|1, S, d] tensors, or one tensor)
    at the original token ``index`` [B, n]."""
    if isinstance(pe, tuple):
        return tuple(gather_position_embeddings(t, index) for t in pe)
    return gather_tokens(pe, index)


def build_mask(
    q: Layout, k: Layout, valid: torch.Tensor, dtype: torch.dtype | None = None, blocks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention mask between the query slots ``q`` and key slots ``k``.

    Args:
        q: query layout, index [B, nq].
        k: key layout, index [B, nk] (the layer's KV cache contents, in cache order).
        valid: BoolTensor [B, S_total], False at the model's padding tokens (the 2-D attention mask).
        dtype: None for a boolean mask (True = attend; SDPA), or a float dtype for an additive mask
            (0 / finfo.min; eager attention).
        blocks: LongTensor [B, S] of block ids of the prompt's tokens (>= 0: the tokens of one block attend
            to each other in both directions, as Gemma 3's image tokens; -1: causal only), or None;
            tokens past the prompt are causal.
        window: a sliding window W (tokens): a query at index p sees only keys at indices > p - W, by
            original index, as transformers' ``sliding_window_overlay`` (applied to the blocks too); None:
            no window.

    Returns:
        [B, 1, nq, nk] mask: (causal or same block) and not padding (and, with groups, the same group or
        group 0) (and, with a window, within it). Rows of padding queries are all False, as in
        transformers' own masks.
    """
    qi, ki = q.index.to(valid.device), k.index.to(valid.device)
    allowed = ki[:, None, :] <= qi[:, :, None]
    if blocks is not None:
        full = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
        full[:, : blocks.shape[1]] = blocks.to(valid.device)
        bq, bk = torch.gather(full, 1, qi), torch.gather(full, 1, ki)
        allowed |= (bq[:, :, None] >= 0) & (bq[:, :, None] == bk[:, None, :])
    if window is not None:
        allowed &= ki[:, None, :] > qi[:, :, None] - window
    allowed &= torch.gather(valid, 1, ki)[:, None, :]
    if k.group is not None or q.group is not None:
        kg = k.group if k.group is not None else torch.zeros_like(ki)
        qg = q.group if q.group is not None else torch.zeros_like(qi)
        kg, qg = kg.to(valid.device), qg.to(valid.device)
        allowed &= (kg[:, None, :] == 0) | (kg[:, None, :] == qg[:, :, None])
        allowed &= (kg != PAD)[:, None, :]
        allowed &= (qg != PAD)[:, :, None]
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def padding_mask(index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The 2-D padding mask FlashAttention takes, for a single-path layer whose keys are the tokens
    ``index`` (LongTensor [B, n], ascending per row, so padding tokens come first: left padding).

    Args:
        index: key token indices [B, n] (a layer's prefill sequence, or its KV cache in cache order).
        valid: BoolTensor [B, S_total], False at the model's padding tokens.

    Returns:
        BoolTensor [B, n], True at real keys. The kernel adds causality (aligned to the end of the keys).
    """
    return torch.gather(valid, 1, index.to(valid.device))


def locate(sorted_index: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Slots of ``wanted`` token indices in a layout whose ``index`` is sorted per row.

    Args:
        sorted_index: LongTensor [B, n], ascending per row.
        wanted: LongTensor [B, m] of indices present in the corresponding row.

    Returns:
        LongTensor [B, m] of slot numbers.
    """
    return torch.searchsorted(sorted_index.contiguous(), wanted.to(sorted_index.device))


def select_kv(layer_cache, slots: torch.Tensor) -> None:
    """Keep only the cache entries at ``slots`` (LongTensor [B, m]) of one layer's KV cache, in place.

    ``layer_cache`` is a transformers cache layer with ``keys`` / ``values`` of shape
    [B, kv_heads, n, head_dim] (``DynamicLayer``).
    """
    layer_cache.keys = take(layer_cache.keys, slots, 2)
    layer_cache.values = take(layer_cache.values, slots, 2)
