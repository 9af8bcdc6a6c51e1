"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024)."""

from __future__ import annotations

import dataclasses

from vtprune.methods.base import PerImageBudget, check_int, check_layer
from vtprune.methods.registry import register_method
from vtprune.methods.stages import LayerPlan, RankByAttention


@dataclasses.dataclass(frozen=True)
class FastVPlan(LayerPlan):
    """FastV's plan: ``keep`` visual tokens per image from layer ``layer`` on."""

    keep: int
    layer: int


@register_method
@dataclasses.dataclass(frozen=True)
class FastV(RankByAttention, PerImageBudget):
    """At layer ``layer`` (K), keep the top ``budget`` visual tokens per image ranked by the last
    query's attention at layer K-1 (softmax over the whole row, mean over heads); static afterwards.

    Options:
        budget: visual tokens kept per image (int), or
        keep_ratio: fraction kept per image (float in (0, 1]); at most one of the two. Default
            ``keep_ratio=0.25`` (FastV's R = 75 %).
        layer: K, default 2 (paper default); an int in [1, L-1].

    Source: FastV paper, Sec. 4 (K = 2, R = 50-75 %). Scores are taken beside the fused kernel
    (no eager attention), which the original code needed.
    """

    name = "fastv"
    layer: int = 2

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "layer", self.layer, 1)

    def check_layers(self, num_layers: int) -> None:
        check_layer(self.name, "layer", self.layer, num_layers)

    # FastVPlan is RankByAttention's LayerPlan with a keep count; it is not also PerImageBudget's BudgetPlan
    def plan(self, num_layers: int, n_visual: int) -> FastVPlan:  # type: ignore[override]
        self.check_layers(num_layers)
        keep = self.keep(n_visual)
        per_layer = tuple(n_visual if layer < self.layer else keep for layer in range(num_layers))
        return FastVPlan(num_layers, n_visual, per_layer, keep, self.layer)
