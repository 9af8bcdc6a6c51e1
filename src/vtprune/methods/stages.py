"""The stage bases: where in the model a method acts, written once.

* :class:`SelectBeforeLLM`: select or merge visual tokens from the projected embeddings before layer 0
  (random, pool, VisionZip); every layer then sees the selection. The base owns the layer-0 gate.
* :class:`RankByAttention`: before layer l, keep the top-k visual tokens by the last query's attention at
  layer l-1, with k per layer from the plan (FastV, PDrop, ST³'s PVTP, VTW with k = 0) and optionally
  per decode step from the KV cache (ST³'s VTA). The base owns the score requests and the top-k.
* :class:`ParallelPaths`: a multi-path schedule: before layer 0 the visual tokens split into two paths
  packed in one sequence, whose question tokens may be fused, until one path continues (ParVTS).

Shapes: B samples, I images, n visual tokens per image present, Q question tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vtprune.engine.decisions import (
    Action,
    FuseQuestions,
    KeepVisual,
    LastQuery,
    MergePaths,
    PathQuestions,
    SplitPaths,
)
from vtprune.engine.interface import Plan
from vtprune.engine.view import GenerationView
from vtprune.methods.base import BudgetPlan, Method, PerImageBudget

LAST_QUERY = LastQuery()
PATH_QUESTIONS = PathQuestions()


@dataclasses.dataclass(frozen=True)
class SelectBeforeLLM(PerImageBudget):
    """Stage base: before layer 0, when the plan keeps fewer than the image's visual tokens, replace them
    by :meth:`select`'s choice (a :class:`~vtprune.engine.decisions.KeepVisual`, possibly with merged
    hidden states at the kept positions). Subclasses implement :meth:`select` only."""

    def select(self, view: GenerationView, plan: BudgetPlan) -> KeepVisual:
        """The visual tokens to keep (``plan.keep`` per image) from layer 0's input."""
        raise NotImplementedError

    def on_prefill_layer(self, view: GenerationView, plan: BudgetPlan) -> Sequence[Action]:
        if view.layer != 0 or plan.keep >= view.visual_count():
            return ()
        return (self.select(view, plan),)


@dataclasses.dataclass(frozen=True)
class LayerPlan(Plan):
    """Visual tokens per image present in each decoder layer of the prefill, ``per_layer[l]`` for
    l = 0..L-1 (non-increasing; layer 0 holds all N_v, or none)."""

    per_layer: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RankByAttention(Method):
    """Stage base: rank by attention at a layer / step.

    Prefill: before layer l, when ``plan.per_layer[l]`` is below the visual tokens present, keep that many:
    the top by the last query's attention at layer l-1 (scored beside the fused kernel; softmax over the
    whole row, mean over heads), or none when it is 0 (no score needed). Decode: before layer l >= 1 of a
    step, when :meth:`decode_target` is below the visual entries in l's KV cache, evict down to it the
    same way, by the current token's attention at layer l-1. Layer l-1 is scored only when layer l will
    prune. Subclasses give the plan (:meth:`Method.plan` returning a :class:`LayerPlan`) and, to anneal
    the cache while decoding, :meth:`decode_target`.
    """

    def decode_target(self, view: GenerationView, plan: LayerPlan, layer: int) -> int | None:
        """Visual entries per image that ``layer``'s KV cache may keep at this decode step (None: no
        eviction). Default None."""
        return None

    def acts_at_decode_step(self, view: GenerationView, plan: LayerPlan) -> bool:
        """True on every step when a subclass gives :meth:`decode_target` (it may evict at any step)."""
        return type(self).decode_target is not RankByAttention.decode_target

    def _target(self, view: GenerationView, plan: LayerPlan, layer: int) -> int | None:
        return plan.per_layer[layer] if view.phase == "prefill" else self.decode_target(view, plan, layer)

    def score_request(self, view: GenerationView, plan: LayerPlan):
        nxt = view.layer + 1
        if nxt >= view.num_layers:
            return None
        target = self._target(view, plan, nxt)
        current = view.visual_count() if view.phase == "prefill" else view.visual_count(nxt)
        return LAST_QUERY if target is not None and 0 < target < current else None

    def on_prefill_layer(self, view: GenerationView, plan: LayerPlan) -> Sequence[Action]:
        return keep_top(view, view.layer, plan.per_layer[view.layer])

    def on_decode_layer(self, view: GenerationView, plan: LayerPlan) -> Sequence[Action]:
        if view.layer == 0:  # nothing scores layer 0 (reconstructed)
            return ()
        return keep_top(view, view.layer, self.decode_target(view, plan, view.layer))


def keep_top(view: GenerationView, layer: int, target: int | None) -> tuple[Action, ...]:
    """Keep the ``target`` visual tokens per image with the most attention at ``layer - 1`` (none for 0;
    nothing to do for None or a target not below what is present)."""
    if target is None or target >= view.visual_count():
        return ()
    if target == 0:
        return (KeepVisual(torch.zeros(view.batch_size, view.n_images, 0, dtype=torch.long)),)
    if layer == 0:
        raise ValueError("a ranked selection before layer 0 has no attention to rank by")
    return (KeepVisual(torch.topk(view.visual_attention(layer - 1), target, dim=-1).indices),)


@dataclasses.dataclass(frozen=True)
class PathsPlan(BudgetPlan):
    """A two-path schedule: ``keep`` visual tokens per image in path 1, the rest in path 2, until
    ``merge_layer``; ``question_in`` (paths holding a copy of the question), ``keep_path`` (whose visual
    tokens continue) and ``question_from`` (whose question tokens continue)."""

    merge_layer: int
    question_in: tuple[int, ...]
    keep_path: int
    question_from: int


@dataclasses.dataclass(frozen=True)
class ParallelPaths(PerImageBudget):
    """Stage base: a multi-path schedule. Before layer 0 the visual tokens split into path 1
    (:meth:`first_path`) and path 2 (the rest), packed in one sequence (:mod:`vtprune.engine.paths`);
    before layers < ``plan.merge_layer`` the question tokens may be fused across the paths
    (:meth:`fusion_weights`, into both paths when :meth:`fuse_before_merge` says so); before the merge
    layer they are fused into path 1 (when the plan's question is in both paths) and the paths merge.
    With ``plan.keep`` equal to every visual token, nothing is done. Subclasses give the plan
    (:class:`PathsPlan`), :meth:`first_path` and :meth:`fusion_weights`."""

    def first_path(self, view: GenerationView, plan: PathsPlan) -> torch.Tensor:
        """Path 1's visual tokens, LongTensor [B, I, plan.keep] of positions among each image's N_v."""
        raise NotImplementedError

    def fusion_weights(self, view: GenerationView, plan: PathsPlan, layer: int) -> torch.Tensor:
        """Weight of path 1 per question token, FloatTensor [B, Q] in [0, 1], from layer ``layer``."""
        raise NotImplementedError

    def needs_question_scores(self, plan: PathsPlan) -> bool:
        """Whether :meth:`fusion_weights` reads the question rows' attention (then they are scored at
        every layer it fuses from). Default True."""
        return True

    def fuse_before_merge(self, plan: PathsPlan) -> bool:
        """Whether the question is fused into both paths before every layer < the merge layer. Default False."""
        return False

    def _active(self, plan: PathsPlan) -> bool:
        return plan.keep < plan.n_visual

    def _fuses(self, plan: PathsPlan) -> bool:
        return len(plan.question_in) > 1

    def score_request(self, view: GenerationView, plan: PathsPlan):
        if view.phase != "prefill" or not self._active(plan) or not self._fuses(plan):
            return None
        if not self.needs_question_scores(plan):
            return None
        last = view.layer == plan.merge_layer - 1
        early = self.fuse_before_merge(plan) and view.layer < plan.merge_layer - 1
        return PATH_QUESTIONS if last or early else None

    def on_prefill_layer(self, view: GenerationView, plan: PathsPlan) -> Sequence[Action]:
        if not self._active(plan):
            return ()
        actions: list[Action]
        layer, actions = view.layer, []
        if layer == 0:
            actions.append(SplitPaths(self.first_path(view, plan), plan.question_in))
        elif self._fuses(plan) and self.fuse_before_merge(plan) and layer < plan.merge_layer:
            actions.append(FuseQuestions(self.fusion_weights(view, plan, layer - 1), into=(1, 2)))
        if layer == plan.merge_layer:
            if self._fuses(plan):
                actions.append(FuseQuestions(self.fusion_weights(view, plan, layer - 1), into=(1,)))
            actions.append(MergePaths(plan.keep_path, plan.question_from))
        return actions

