"""VTW: visual token withdrawal (Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens
Withdrawal for Rapid Inference", AAAI 2025)."""

from __future__ import annotations

import dataclasses

from vtprune.methods.base import check_amount, check_int, check_layer, resolve_budget
from vtprune.methods.registry import register_method
from vtprune.methods.stages import LayerPlan, RankByAttention


@dataclasses.dataclass(frozen=True)
class VTWPlan(LayerPlan):
    """VTW's plan: every visual token withdrawn at ``layer`` (K; L when nothing is withdrawn)."""

    layer: int


@register_method
@dataclasses.dataclass(frozen=True)
class VTW(RankByAttention):
    """Withdraw every visual token at layer ``layer`` (K): layers ``0 .. K-1`` see all of them, layers
    ``K .. L-1`` (their sequences and KV caches) none. A ranked stage that keeps k = 0, so it needs no
    attention scores.

    Options (at most one of the two ways):
        layer: K, an int in [1, L-1]; default (neither option given) ``L // 2``.
        budget / keep_ratio: a target equivalent budget (visual tokens per image averaged over layers,
            int, or a fraction of N_v); K is the smallest layer with ``K * N_v / L >= target`` (K = L,
            nothing withdrawn, when the target is N_v).

    Source: VTW paper, Sec. 3 (withdraw all visual tokens after layer K; K chosen where the KL
    divergence of the output distribution stays small; ``vtprune calibrate --method vtw`` does that
    sweep). The default K = L / 2 and the budget-to-K rule are reconstructed (the paper's K comes from
    calibration per model).
    """

    name = "vtw"
    examples = {"prune": {}, "keep_all": {"keep_ratio": 1.0}}
    layer: int | None = None
    budget: int | None = None
    keep_ratio: float | None = None

    def validate(self) -> None:
        if self.layer is not None and (self.budget is not None or self.keep_ratio is not None):
            raise ValueError("vtw: give layer (K) or a target budget / keep_ratio, not both")
        if self.layer is not None:
            check_int(self.name, "layer", self.layer, 1)
        check_amount(self.name, self.budget, self.keep_ratio, allow_zero=True)

    def check_layers(self, num_layers: int) -> None:
        if self.layer is not None:
            check_layer(self.name, "layer", self.layer, num_layers)

    def plan(self, num_layers: int, n_visual: int) -> VTWPlan:
        self.check_layers(num_layers)
        if self.budget is None and self.keep_ratio is None:
            k = num_layers // 2 if self.layer is None else self.layer
        else:
            target = resolve_budget(self.name, self.budget, self.keep_ratio, n_visual, allow_zero=True)
            k = min(num_layers, -(-target * num_layers // n_visual))  # exact ceil of target * L / N_v
        return VTWPlan(num_layers, n_visual, tuple(n_visual if layer < k else 0 for layer in range(num_layers)), k)
