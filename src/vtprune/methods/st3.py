"""ST³: Spatial-Temporal Visual Token Trimming (Zhuang et al., AAAI 2025, arXiv 2412.20105)."""

from __future__ import annotations

import dataclasses
import functools
import math

from vtprune.methods.base import (
    ceil_fraction,
    check_amount,
    check_choice,
    check_int,
    check_layer,
    check_ratio,
    resolve_budget,
    solve_for_budget,
)
from vtprune.methods.registry import register_method
from vtprune.methods.stages import LayerPlan, RankByAttention

DEFAULT_RATIO = 0.2


@dataclasses.dataclass(frozen=True)
class ST3Plan(LayerPlan):
    """ST³'s plan: ``ratio`` (R, given or solved for the target budget), ``per_layer`` = G(l) of PVTP."""

    ratio: float


@register_method
@dataclasses.dataclass(frozen=True)
class ST3(RankByAttention):
    """Progressive visual token pruning (PVTP) across layers plus visual token annealing (VTA) of the
    visual KV cache during decoding.

    PVTP (prefill): at layers ``start_layer, start_layer + stride, ...`` keep
    ``ceil((1 - ratio) * current)`` visual tokens per image, ranked by the last query's attention at
    the previous layer ("QK heredity": taken beside the fused kernel). Given ``budget`` (tokens per
    image) or ``keep_ratio`` instead, ``ratio`` is solved so that the equivalent budget (mean over
    layers of visual tokens present) is the closest one not below it.

    VTA (decode step t, t = tokens generated so far): layer l keeps
    ``G(l,t) = G_min(l) + (G(l) - G_min(l)) * 0.5 * (1 + cos(pi * min(t, T) / T))`` visual entries in its
    KV cache (rounded up), ``G(l)`` from PVTP, ``G_min(l) = ceil(floor_ratio * G(l))``, evicting the
    lowest-scored by the current token's attention at layer l-1. Text, prefix and generated tokens
    are never evicted. With ``anneal_every = k > 1`` (the default is 8) the evictions are batched: they
    happen only at steps t = k, 2k, 3k, ..., each evicting down to the schedule's ``G(l, t)``; between
    them a layer keeps what it holds (at most k - 1 steps behind the schedule), and scoring and cache
    copies run k times less often (fewer small kernels per decode step). ``k = 1`` is the paper's
    per-step annealing.

    Options: ratio (R, default 0.2), stride (S, 2), start_layer (2), budget / keep_ratio (solve R),
    anneal ("cosine" | "linear" | "none", default "cosine"), anneal_steps (T; default None =
    ``max_new_tokens`` of the generate call), floor_ratio (0.1), anneal_every (k, decode steps between
    evictions, default 8; 1 = every step, as the paper).

    Source: ST³ paper (PVTP, VTA, cosine decay, lazy layers, QK heredity: abstract and figure
    captions); scores, schedule, rounding and T are reconstructed (METHODS.md, ST³). Layer 0 is never
    annealed: it has no previous layer to be scored by (reconstructed). ``anneal_every`` is this
    project's speed option, not the paper's; its default 8 was chosen by measurement (README, Speed and
    Accuracy): on the bundled model per-step evictions made a decode step 0.85x of stock's and every 8
    steps 0.96x (not resolved from 1). An earlier form that evicted at steps 1, 1 + k, ... straight down to the count k - 1
    steps ahead cost 12.5 points on 12-token answers (imagenet-naming, 200 photos: 25.0 % against
    37.5 % per step); batching behind the schedule instead never evicts before the per-step schedule.
    """

    name = "st3"
    # the conformance answers are 4-10 tokens long: evict every 2 steps so that their decode steps evict
    examples = {"prune": {"anneal_every": 2}, "keep_all": {"keep_ratio": 1.0, "anneal": "none"}}
    ratio: float | None = None
    stride: int = 2
    start_layer: int = 2
    budget: int | None = None
    keep_ratio: float | None = None
    anneal: str = "cosine"
    anneal_steps: int | None = None
    floor_ratio: float = 0.1
    anneal_every: int = 8

    def validate(self) -> None:
        if self.ratio is not None and (self.budget is not None or self.keep_ratio is not None):
            raise ValueError("st3: give ratio (per pruning step) or a target budget / keep_ratio, not both")
        if self.ratio is not None:
            check_ratio(self.name, "ratio", self.ratio, lo_open=False, hi_open=True)
        check_amount(self.name, self.budget, self.keep_ratio)
        check_int(self.name, "start_layer", self.start_layer, 1)
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"st3: stride must be an int >= 1, got {self.stride!r}")
        check_choice(self.name, "anneal", self.anneal, ("cosine", "linear", "none"))
        if self.anneal_steps is not None and (not isinstance(self.anneal_steps, int) or self.anneal_steps < 1):
            raise ValueError(f"st3: anneal_steps must be an int >= 1 or None, got {self.anneal_steps!r}")
        if isinstance(self.anneal_every, bool) or not isinstance(self.anneal_every, int) or self.anneal_every < 1:
            raise ValueError(f"st3: anneal_every must be an int >= 1 (decode steps between evictions), got {self.anneal_every!r}")
        check_ratio(self.name, "floor_ratio", self.floor_ratio, lo_open=False, hi_open=False)

    def check_layers(self, num_layers: int) -> None:
        check_layer(self.name, "start_layer", self.start_layer, num_layers)

    def plan(self, num_layers: int, n_visual: int) -> ST3Plan:
        self.check_layers(num_layers)
        if self.budget is None and self.keep_ratio is None:
            ratio = DEFAULT_RATIO if self.ratio is None else float(self.ratio)
        else:
            target = resolve_budget(self.name, self.budget, self.keep_ratio, n_visual)
            ratio = solve_ratio(target, n_visual, num_layers, self.start_layer, self.stride)
        per_layer = tuple(schedule(n_visual, num_layers, ratio, self.start_layer, self.stride))
        return ST3Plan(num_layers, n_visual, per_layer, ratio)

    def decode_target(self, view, plan: LayerPlan, layer: int) -> int | None:
        """VTA: visual entries per image ``layer`` keeps at the current decode step (with
        ``anneal_every = k``: what it holds, except at eviction steps k, 2k, ..., where it is the
        schedule's count); None with ``anneal="none"`` or for layer 0.

        Raises:
            ValueError: annealing without a number of new tokens (no ``max_new_tokens`` and no
                ``anneal_steps``).
        """
        if self.anneal == "none" or layer == 0:
            return None
        steps = self.anneal_steps or view.max_new_tokens
        if not steps:
            raise ValueError("st3: annealing needs the number of new tokens: call generate(max_new_tokens=...) or set anneal_steps")
        if not self.acts_at_decode_step(view, plan):
            return view.visual_count(layer)
        return annealed(plan.per_layer[layer], view.step, steps, self.floor_ratio, self.anneal)

    def acts_at_decode_step(self, view, plan: LayerPlan) -> bool:
        """VTA evicts at steps k, 2k, 3k, ... (``anneal_every = k``); never with ``anneal="none"``."""
        return self.anneal != "none" and view.step % self.anneal_every == 0


def schedule(n_visual: int, num_layers: int, ratio: float, start_layer: int, stride: int) -> list[int]:
    """PVTP: visual tokens per image present in each layer, G(l), l = 0..L-1."""
    out, current = [], n_visual
    for layer in range(num_layers):
        if layer >= start_layer and (layer - start_layer) % stride == 0:
            current = max(1, ceil_fraction(1.0 - ratio, current))
        out.append(current)
    return out


@functools.lru_cache(maxsize=4096)
def annealed(g: int, step: int, steps: int, floor_ratio: float, kind: str = "cosine") -> int:
    """VTA: visual entries a layer with PVTP count ``g`` keeps at decode step ``step`` of ``steps``
    (memoized: asked twice per layer and decode step, and the exact ceiling is a Fraction product)."""
    g_min = ceil_fraction(floor_ratio, g)
    frac = min(step, steps) / steps
    decay = 0.5 * (1.0 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac if kind == "linear" else 1.0
    return max(1, math.ceil(g_min + (g - g_min) * decay - 1e-9))


def solve_ratio(target: float, n_visual: int, num_layers: int, start_layer: int, stride: int) -> float:
    """The largest PVTP ratio R whose equivalent budget (mean of the schedule) is >= ``target``."""
    return solve_for_budget(lambda r: sum(schedule(n_visual, num_layers, r, start_layer, stride)) / num_layers,
                            target, lo=0.0, hi=0.999999, increasing=False)
