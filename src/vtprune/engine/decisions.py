"""What a method can ask of the engine and decide, as typed values.

A method never mutates the generation. At each stage it returns

* a **score request** (:class:`ScoreRequest`): which query rows of the current layer's attention to score
  beside the fused kernel (:func:`vtprune.engine.attention.row_logits`); and
* **actions** (:class:`Action`): what to do to the sequence or the KV cache before the current layer.

The engine applies each action to its state (``action.apply(state)``), so a new kind of action or of
score row is a new class here, not a new branch in the run. Shapes: B samples, I images per sample,
k kept tokens per image, d hidden size, Q question tokens.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

import torch

from vtprune.engine import paths

if TYPE_CHECKING:
    from vtprune.engine.state import Generation


class ScoreRequest(Protocol):
    """Rows of the current layer's queries whose attention logits the engine computes against every key."""

    def rows(self, state: Generation, query: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, r] of query rows of ``query`` ([B, H, q, d]) to score."""
        ...


@dataclasses.dataclass(frozen=True)
class LastQuery:
    """The last query of the layer: the last prompt token (prefill) or the token being decoded."""

    def rows(self, state: Generation, query: torch.Tensor) -> torch.Tensor:
        return torch.full((query.shape[0], 1), query.shape[2] - 1, dtype=torch.long, device=query.device)


@dataclasses.dataclass(frozen=True)
class PathQuestions:
    """The question tokens of every path, path by path (:func:`vtprune.engine.paths.question_rows`);
    only while paths run."""

    def rows(self, state: Generation, query: torch.Tensor) -> torch.Tensor:
        return paths.question_rows(state.paths_state()).to(query.device)


class Action(Protocol):
    """A change to the generation before the current layer."""

    def apply(self, state: Generation) -> None:
        """Apply the change (raises as the state method it calls)."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class KeepVisual:
    """Keep only the visual tokens at ``keep`` (LongTensor [B, I, k] of positions among the current
    ``visual_count()`` tokens of each image; any order; k may be 0).

    Prefill: this and every later layer's sequence holds only those visual tokens (plus all text).
    ``hidden`` (optional, [B, I, k, d], in the order of ``keep``) replaces their hidden states: a merged
    token sits at the original position of the token it replaces. Decode: the current layer's KV cache
    keeps only those visual entries (text, prefix and generated tokens are never evicted); ``hidden``
    is refused (ValueError).
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None

    def apply(self, state: Generation) -> None:
        state.keep_visual(self.keep, self.hidden)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitPaths:
    """Before layer 0: pack two paths into one sequence (:func:`vtprune.engine.paths.split`): path 1
    holds the visual tokens ``first`` (LongTensor [B, I, k], positions among each image's N_v tokens),
    path 2 the other N_v - k; the text before the first image is shared, every later text token is
    copied into each path named in ``question_in``."""

    first: torch.Tensor
    question_in: tuple[int, ...] = (1, 2)

    def apply(self, state: Generation) -> None:
        paths.split(state, self.first, self.question_in)


@dataclasses.dataclass(frozen=True, eq=False)
class FuseQuestions:
    """Set the question hidden states of the paths ``into`` to ``w h_1 + (1 - w) h_2`` per token
    (``weight_first``: FloatTensor [B, Q] in [0, 1]; :func:`vtprune.engine.paths.fuse`)."""

    weight_first: torch.Tensor
    into: tuple[int, ...] = (1, 2)

    def apply(self, state: Generation) -> None:
        paths.fuse(state, self.weight_first, self.into)


@dataclasses.dataclass(frozen=True)
class MergePaths:
    """End the paths before the current layer (:func:`vtprune.engine.paths.merge`): keep the shared
    prefix, the visual tokens of path ``keep_path`` and the question tokens of path ``question_from``;
    the other path leaves the hidden states and every earlier layer's KV cache."""

    keep_path: int
    question_from: int

    def apply(self, state: Generation) -> None:
        paths.merge(state, self.keep_path, self.question_from)
