"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import PerImageBudget, check_layer


@dataclasses.dataclass
class FastV(PerImageBudget):
    """At layer ``layer`` (K), keep the top ``budget`` visual tokens per image ranked by the last
    query's attention at layer K-1 (softmax over the whole row, mean over heads); static afterwards.

    Options:
        budget: visual tokens kept per image (int), or
        keep_ratio: fraction kept per image (float in (0, 1]); exactly one of the two. Default
            ``keep_ratio=0.25`` (FastV's R = 75 %).
        layer: K, default 2 (paper default).

    Source: FastV paper, Sec. 4 (K = 2, R = 50-75 %). Scores are taken beside the fused kernel
    (no eager attention), which the original code needed.
    """

    name = "fastv"
    layer: int = 2

    def validate(self, num_layers: int) -> None:
        check_layer(self.name, "layer", self.layer, num_layers)

    def score_rows(self, gen) -> str | None:
        return "last" if gen.phase == "prefill" and gen.layer == self.layer - 1 else None

    def on_prefill_layer(self, gen) -> None:
        if gen.layer == self.layer and self.keep < gen.visual_count():
            gen.keep_visual(torch.topk(gen.visual_attention(self.layer - 1), self.keep, dim=-1).indices)
