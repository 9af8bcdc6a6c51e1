"""PDrop: PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import Method, ceil_fraction, check_layer, resolve_budget, solve_for_budget


@dataclasses.dataclass
class PDrop(Method):
    """Staged pruning: at each stage boundary layer l in ``layers`` keep ``ceil(ratio * current)``
    visual tokens per image, ranked by the last instruction token's attention at layer l-1 (softmax
    over the whole row, mean over heads, taken beside the fused kernel).

    Options:
        layers: stage boundaries, increasing ints in [1, L-1]; default ``[L/4, L/2, 3L/4]``
            (= [8, 16, 24] for a 32-layer model, the paper's LLaVA-1.5 setting).
        ratio: lambda, the fraction kept at each boundary, in (0, 1]; default 0.5; or
        budget / keep_ratio: a target equivalent budget (visual tokens per image averaged over layers);
            lambda is solved as the smallest value whose equivalent budget is not below it.

    Source: PDrop paper, Sec. 3.2 (stages, lambda = 0.5, ranking by the last instruction token's
    attention). The budget-to-lambda solve is ours (reconstructed, to compare at equal equivalent
    budget).
    """

    name = "pdrop"
    layers: list[int] | tuple[int, ...] | None = None
    ratio: float | None = None
    budget: int | None = None
    keep_ratio: float | None = None

    def validate(self, num_layers: int) -> None:
        self.num_layers = num_layers
        if self.ratio is not None and (self.budget is not None or self.keep_ratio is not None):
            raise ValueError("pdrop: give ratio (kept per stage) or a target budget / keep_ratio, not both")
        if self.ratio is not None and not (isinstance(self.ratio, int | float) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"pdrop: ratio must be a float in (0, 1], got {self.ratio!r}")
        layers = self.layers
        if layers is None:
            layers = sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)} - {num_layers})
        if not isinstance(layers, list | tuple) or not layers:
            raise ValueError(f"pdrop: layers must be a non-empty list of ints, got {layers!r}")
        for layer in layers:
            check_layer(self.name, "layers", layer, num_layers)
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"pdrop: layers must be strictly increasing, got {list(layers)}")
        self.stage_layers = list(layers)

    def check_visual(self, n_visual: int) -> None:
        if self.budget is None and self.keep_ratio is None:
            self._ratio = 0.5 if self.ratio is None else float(self.ratio)
        else:
            target = resolve_budget(self.name, self.budget, self.keep_ratio, n_visual)
            self._ratio = solve_for_budget(
                lambda r: sum(stages(n_visual, self.num_layers, self.stage_layers, r)) / self.num_layers,
                target, lo=1e-6, hi=1.0, increasing=True)
        self.G = stages(n_visual, self.num_layers, self.stage_layers, self._ratio)

    def score_rows(self, gen) -> str | None:
        return "last" if gen.phase == "prefill" and gen.layer + 1 in self.stage_layers else None

    def on_prefill_layer(self, gen) -> None:
        if gen.layer in self.stage_layers and self.G[gen.layer] < gen.visual_count():
            gen.keep_visual(torch.topk(gen.visual_attention(gen.layer - 1), self.G[gen.layer], dim=-1).indices)

    def options(self) -> dict:
        out = dataclasses.asdict(self)
        out["layers_used"] = getattr(self, "stage_layers", None)
        out["ratio_used"] = getattr(self, "_ratio", None)
        return out


def stages(n_visual: int, num_layers: int, layers: list[int], ratio: float) -> list[int]:
    """Visual tokens per image present in each layer l = 0..L-1 (at least 1 after a stage)."""
    out, current = [], n_visual
    for layer in range(num_layers):
        if layer in layers:
            current = max(1, ceil_fraction(ratio, current))
        out.append(current)
    return out
