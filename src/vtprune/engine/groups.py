"""Batches whose samples differ in visual tokens: one ``generate`` per group of alike samples, merged.

The engine schedules a batch as ``[B, I, N_v]`` visual tokens: every sample with the same number of
images and of visual tokens per image. LLaVA-NeXT's and Qwen2-VL's counts follow each image's size, so
a batch of mixed sizes is split by the adapter (``Adapter.batch_groups``) into groups that satisfy this; each
group runs as one ``generate`` (its own left padding trimmed), and the outputs are merged back into
the caller's order: the caller's ``input_ids`` followed by each row's new tokens, right-padded with the
pad token where a group stopped earlier. Greedy outputs therefore equal one-by-one generation (tested);
the groups run one after the other, so a mixed batch is slower than a uniform one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def generate_in_groups(generate: Callable, adapter, groups: list, kwargs: dict, pad_token_id: int):
    """Run ``generate(**sub_kwargs)`` for each group of samples and merge the sequences.

    Args:
        generate: the stock ``generate`` (with the engine's hooks attached).
        adapter: the model's adapter (``select_samples``).
        groups: the adapter's :class:`~vtprune.adapters.base.SampleGroup` s, whose samples cover ``range(B)``.
        kwargs: the caller's keyword arguments (``input_ids`` [B, S] among them).
        pad_token_id: fills the rows of groups that stopped before the longest.

    Returns:
        LongTensor [B * R, S + T], R the sequences per sample (``num_return_sequences``), T the most new
        tokens of any group; the groups run in the order given.

    Raises:
        ValueError: ``return_dict_in_generate`` (the merged output is a tensor of sequences only).
    """
    refused = ValueError("a batch whose images give different numbers of visual tokens runs as several generate "
                         "calls; return_dict_in_generate is not supported then: batch images of one size together")
    if kwargs.get("return_dict_in_generate") or getattr(kwargs.get("generation_config"), "return_dict_in_generate", False):
        raise refused
    input_ids = kwargs["input_ids"]
    batch, length = input_ids.shape
    outputs = []
    for group in groups:
        sub = trim_left_padding(adapter.select_samples(kwargs, group))
        out = generate(**sub)
        if not torch.is_tensor(out):  # e.g. return_dict_in_generate set in the model's generation_config
            raise refused
        outputs.append((group.samples, sub["input_ids"].shape[1], out))
    rows = outputs[0][2].shape[0] // len(outputs[0][0])  # sequences per sample
    new = max(out.shape[1] - prompt for _, prompt, out in outputs)
    merged = torch.full((batch * rows, length + new), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    merged[:, :length] = input_ids.repeat_interleave(rows, dim=0)
    for samples, prompt, out in outputs:
        index = torch.tensor([b * rows + r for b in samples for r in range(rows)], device=merged.device)
        merged[index, length:length + out.shape[1] - prompt] = out[:, prompt:].to(merged.device)
    return merged


def trim_left_padding(kwargs: dict) -> dict:
    """Drop the columns every row pads (``attention_mask`` 0) from every per-token tensor of the call
    (those shaped like ``input_ids``: ``attention_mask``, Qwen's ``mm_token_type_ids``, ...)."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return kwargs
    used = mask.bool().any(0).nonzero()
    first = int(used[0]) if used.numel() else 0
    if first == 0:
        return kwargs
    shape = kwargs["input_ids"].shape
    return {k: v[:, first:] if torch.is_tensor(v) and v.shape == shape else v for k, v in kwargs.items()}

