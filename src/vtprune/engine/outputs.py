"""A pruned prefill's output at the original token positions.

After a prefill whose last decoder layer holds fewer tokens than the prompt, the language model returns a
hidden state per slot of that layer's sequence only ([B, n, d], :class:`~vtprune.engine.layout.Layout`),
so the model's head gives logits for those n slots, not for the S prompt positions. ``generate`` reads the
last slot only, which is the last prompt token (text is never pruned), but a forward call that scores a
continuation (a log-likelihood: lmms-eval's ``loglikelihood``, ``model(**inputs, labels=...)``) reads
every position. For such calls the run puts the language model's last hidden state back at the original
positions, [B, S, d], before the model's head runs (:func:`restore_lm_output`, a forward hook on the
language model), so that the logits, the loss the model computes from ``labels`` and ``hidden_states[-1]``
are the stock model's, position for position, at every token the last layer kept.

A token the method pruned has no output: its row is NaN (and so are its logits). Only visual tokens are
ever pruned, and nobody scores a visual position: a continuation is text, and the logits that predict its
first token sit at the last context token, also text. A loss over labels that include a pruned position
is NaN, which says so rather than scoring something made up.

Only the last hidden state is put back: the other entries of ``hidden_states`` (``output_hidden_states``)
keep each layer's own sequence, as under ``generate``.
"""

from __future__ import annotations

from typing import Any

import torch

from vtprune.engine.layout import Layout


def restore_positions(x: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Values of a sequence's slots put back at their original token positions.

    Args:
        x: [B, n, ...] float, one row per slot of a single-path layout.
        index: LongTensor [B, n], the original token index of each slot (distinct within a row, each in
            [0, length)).
        length: S, the number of original positions.

    Returns:
        [B, S, ...] in ``x``'s dtype and device: position ``index[b, j]`` holds ``x[b, j]``; a position that
        no slot holds (a pruned token) is NaN.
    """
    out = x.new_full((x.shape[0], length, *x.shape[2:]), float("nan"))
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    out[rows, index.to(x.device)] = x
    return out


def restore_lm_output(output: Any, layout: Layout, length: int) -> Any:
    """The language model's output of a prefill with its last hidden state at the original positions.

    Args:
        output: what the language model returned: a ``ModelOutput`` with ``last_hidden_state`` [B, n, d]
            (and, when it was asked for, ``hidden_states`` whose last entry is that same tensor), or a tuple
            whose first element is it.
        layout: the last decoder layer's layout (its ``index`` is [B, n]).
        length: S, the prompt length of the call.

    Returns:
        None when ``layout`` holds every prompt token in order (nothing was pruned by the last layer: the
        output is the stock one as it is); else ``output`` with ``last_hidden_state`` (and the last entry of
        ``hidden_states`` when it is that tensor) replaced by :func:`restore_positions` of it, [B, S, d].

    Raises:
        RuntimeError: the layout still holds packed paths after the last layer (a slot per path: no single
            output per position), or the output's sequence length is not the layout's.
    """
    if layout.group is not None:
        raise RuntimeError("vtprune: the last decoder layer still holds packed paths (one slot per path for some "
                           "tokens), so the prefill has no single output per position; merge the paths before the "
                           "last layer")
    if layout.length == length:  # a sorted set of all S indices: the stock order
        return None
    is_tuple = isinstance(output, tuple)
    hidden = output[0] if is_tuple else output.last_hidden_state
    if hidden.shape[1] != layout.length:
        raise RuntimeError(f"vtprune: the language model returned {hidden.shape[1]} positions but its last decoder "
                           f"layer held {layout.length} tokens")
    restored = restore_positions(hidden, layout.index, length)
    if is_tuple:
        return (restored, *output[1:])
    states = getattr(output, "hidden_states", None)
    if states is not None and len(states) and states[-1] is hidden:
        output.hidden_states = (*states[:-1], restored)
    output.last_hidden_state = restored
    return output


__all__ = ["restore_positions", "restore_lm_output"]
