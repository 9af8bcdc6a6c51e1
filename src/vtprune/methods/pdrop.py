"""PDrop: PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025)."""

from __future__ import annotations

import dataclasses
import warnings

from vtprune.methods.base import (
    ceil_fraction,
    check_amount,
    check_layer,
    check_ratio,
    resolve_budget,
    solve_for_budget,
)
from vtprune.methods.registry import register_method
from vtprune.methods.stages import LayerPlan, RankByAttention

DEFAULT_RATIO = 0.5


@dataclasses.dataclass(frozen=True)
class PDropPlan(LayerPlan):
    """PDrop's plan: the stage boundary ``layers`` and ``ratio`` (lambda, given or solved)."""

    layers: tuple[int, ...]
    ratio: float


@register_method
@dataclasses.dataclass(frozen=True)
class PDrop(RankByAttention):
    """Staged pruning: at each stage boundary layer l in ``layers`` keep ``ceil(ratio * current)``
    visual tokens per image, ranked by the last instruction token's attention at layer l-1 (softmax
    over the whole row, mean over heads, taken beside the fused kernel).

    Options:
        layers: stage boundaries, increasing ints in [1, L-1]; default ``[L/4, L/2, 3L/4]``
            (= [8, 16, 24] for a 32-layer model, the paper's LLaVA-1.5 setting).
        ratio: lambda, the fraction kept at each boundary, in (0, 1]; default 0.5; or
        budget / keep_ratio: a target equivalent budget (visual tokens per image averaged over layers);
            lambda is solved as the smallest value whose equivalent budget is not below it.
            A target below what the stages can reach (every visual token up to the first stage, then 1) runs
            at that floor with a UserWarning (the default stages of a 30-layer model: 52.9 of 196 tokens,
            27.0 %).

    Source: PDrop paper, Sec. 3.2 (stages, lambda = 0.5, ranking by the last instruction token's
    attention). The budget-to-lambda solve is ours (reconstructed, to compare at equal equivalent
    budget).
    """

    name = "pdrop"
    examples = {"prune": {}, "keep_all": {"keep_ratio": 1.0}}
    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    budget: int | None = None
    keep_ratio: float | None = None

    def validate(self) -> None:
        if self.ratio is not None and (self.budget is not None or self.keep_ratio is not None):
            raise ValueError("pdrop: give ratio (kept per stage) or a target budget / keep_ratio, not both")
        if self.ratio is not None:
            check_ratio(self.name, "ratio", self.ratio, lo_open=True, hi_open=False)
        check_amount(self.name, self.budget, self.keep_ratio)
        if self.layers is not None:
            if not isinstance(self.layers, list | tuple) or not self.layers:
                raise ValueError(f"pdrop: layers must be a non-empty list of ints, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"pdrop: layers must be strictly increasing, got {list(self.layers)}")

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """The stage boundaries for a ``num_layers``-layer model (``layers``, or the default)."""
        if self.layers is not None:
            return tuple(self.layers)
        return tuple(sorted({max(1, round(num_layers * f)) for f in (0.25, 0.5, 0.75)} - {num_layers}))

    def check_layers(self, num_layers: int) -> None:
        for layer in self.stage_layers(num_layers):
            check_layer(self.name, "layers", layer, num_layers)

    def plan(self, num_layers: int, n_visual: int) -> PDropPlan:
        self.check_layers(num_layers)
        layers = self.stage_layers(num_layers)
        if self.budget is None and self.keep_ratio is None:
            ratio = DEFAULT_RATIO if self.ratio is None else float(self.ratio)
        else:
            target = resolve_budget(self.name, self.budget, self.keep_ratio, n_visual)
            def mean(r: float) -> float:  # the equivalent budget of lambda = r
                return sum(stages(n_visual, num_layers, layers, r)) / num_layers

            floor = mean(0.0)  # 1 token after the first stage
            if floor > target:
                warnings.warn(f"pdrop: with stages at layers {list(layers)} of {num_layers}, the smallest equivalent "
                              f"budget is {floor:.1f} visual tokens per image ({100 * floor / n_visual:.1f} %), above "
                              f"the {target} asked: running at {floor:.1f} (1 visual token after layer {layers[0]}); "
                              "give earlier layers=[...] to reach it", UserWarning, stacklevel=2)
            ratio = solve_for_budget(mean, target, lo=1e-6, hi=1.0, increasing=True)
        return PDropPlan(num_layers, n_visual, tuple(stages(n_visual, num_layers, layers, ratio)), layers, ratio)


def stages(n_visual: int, num_layers: int, layers, ratio: float) -> list[int]:
    """Visual tokens per image present in each layer l = 0..L-1 (at least 1 after a stage)."""
    out, current = [], n_visual
    for layer in range(num_layers):
        if layer in layers:
            current = max(1, ceil_fraction(ratio, current))
        out.append(current)
    return out
