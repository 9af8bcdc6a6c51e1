"""VTW: visual token withdrawal (Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens
Withdrawal for Rapid Inference", AAAI 2025)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import Method, check_layer, resolve_budget


@dataclasses.dataclass
class VTW(Method):
    """Withdraw every visual token at layer ``layer`` (K): layers ``0 .. K-1`` see all of them, layers
    ``K .. L-1`` (their sequences and KV caches) none.

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
    layer: int | None = None
    budget: int | None = None
    keep_ratio: float | None = None

    def validate(self, num_layers: int) -> None:
        self.num_layers = num_layers
        if self.layer is not None and (self.budget is not None or self.keep_ratio is not None):
            raise ValueError("vtw: give layer (K) or a target budget / keep_ratio, not both")
        if self.layer is not None:
            check_layer(self.name, "layer", self.layer, num_layers)

    def check_visual(self, n_visual: int) -> None:
        if self.budget is None and self.keep_ratio is None:
            self.withdraw_layer = self.num_layers // 2 if self.layer is None else self.layer
        else:
            target = resolve_budget(self.name, self.budget, self.keep_ratio, n_visual, allow_zero=True)
            self.withdraw_layer = min(self.num_layers, -(-target * self.num_layers // n_visual))  # exact ceil

    def on_prefill_layer(self, gen) -> None:
        if gen.layer == self.withdraw_layer and gen.visual_count() > 0:
            gen.keep_visual(torch.zeros(*gen.vis.shape[:2], 0, dtype=torch.long))

    def options(self) -> dict:
        out = dataclasses.asdict(self)
        out["layer_used"] = getattr(self, "withdraw_layer", None)
        return out
