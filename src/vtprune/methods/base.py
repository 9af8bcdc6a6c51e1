"""The method interface: a config dataclass plus the decisions it makes at the stages it declares.

A method never sees a model class. The engine calls it with a :class:`~vtprune.engine.state.Generation`
(one ``generate`` call: prefill + decode steps), through which it reads scores / saliency and acts
(keep visual tokens, split or merge ParVTS paths, evict from a layer's KV cache).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vtprune.engine.state import Generation


@dataclasses.dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options.

    Stages (all optional): ``on_prefill_layer`` before each decoder layer of the prefill,
    ``on_decode_layer`` before each decoder layer of each decode step, ``score_rows`` to ask for
    attention rows of a layer (computed beside the fused kernel), ``needs_saliency`` for a per-patch
    saliency from the vision side (adapter-defined).
    """

    name: ClassVar[str] = "base"
    needs_saliency: ClassVar[bool] = False

    def validate(self, num_layers: int) -> None:
        """Check the options against the model (raise ValueError naming the option and its range)."""

    def check_visual(self, n_visual: int) -> None:
        """Check the options against the number of visual tokens per image (ValueError if out of range)."""

    def score_rows(self, gen: Generation) -> str | None:
        """Which query rows of the current layer to score: None, ``"last"`` (the last query, or the
        token being decoded) or ``"question"`` (ParVTS: the question tokens of both paths)."""
        return None

    def on_prefill_layer(self, gen: Generation) -> None:
        """Called before decoder layer ``gen.layer`` of the prefill."""

    def on_decode_layer(self, gen: Generation) -> None:
        """Called before decoder layer ``gen.layer`` of decode step ``gen.step``."""

    def options(self) -> dict:
        """The method's options as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PerImageBudget(Method):
    """Base of methods that keep a fixed number of visual tokens per image.

    Options: ``budget`` (int, visual tokens kept per image) or ``keep_ratio`` (float in (0, 1]);
    exactly one; neither gives ``keep_ratio = default_keep_ratio``. After :meth:`check_visual`,
    ``self.keep`` is the resolved count and ``self.n_visual`` the model's tokens per image.
    """

    default_keep_ratio: ClassVar[float] = 0.25
    budget: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self):
        if self.budget is None and self.keep_ratio is None:
            self.keep_ratio = self.default_keep_ratio

    def check_visual(self, n_visual: int) -> None:
        self.keep = resolve_budget(self.name, self.budget, self.keep_ratio, n_visual)
        self.n_visual = n_visual


def resolve_budget(name: str, budget: int | None, keep_ratio: float | None, n_visual: int,
                   allow_zero: bool = False) -> int:
    """Visual tokens to keep per image, from ``budget`` (int) or ``keep_ratio`` (float in (0, 1]).

    Returns ``ceil(keep_ratio * n_visual)`` for a ratio, computed exactly by :func:`ceil_fraction` (the
    ratio read as the decimal it prints as: ``keep_ratio=0.07`` of 100 tokens keeps 7, not the 8 that the
    float product 7.000000000000001 would round up to), at least 1. Raises ValueError if both or neither
    are given, or the result is outside [1, n_visual] ([0, n_visual] with ``allow_zero``).
    """
    if (budget is None) == (keep_ratio is None):
        raise ValueError(f"{name}: give exactly one of budget (int tokens per image) or keep_ratio (float in (0, 1])")
    if keep_ratio is not None:
        if not (0.0 < float(keep_ratio) <= 1.0):
            raise ValueError(f"{name}: keep_ratio must be in (0, 1], got {keep_ratio}")
        return max(1, ceil_fraction(keep_ratio, n_visual))
    lo = 0 if allow_zero else 1
    if isinstance(budget, bool) or not isinstance(budget, int) or not (lo <= budget <= n_visual):
        raise ValueError(
            f"{name}: budget must be an int in [{lo}, {n_visual}] (visual tokens per image of this model), got {budget!r}"
        )
    return budget


def ceil_fraction(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` without float error: the ratio is taken as the shortest decimal that prints as
    it (``repr``), so an exact product stays whole (0.07 x 100 = 7, 0.14 x 100 = 14, 0.125 x 64 = 8)
    and any other is rounded up (0.125 x 196 = 24.5 -> 25)."""
    return math.ceil(Fraction(repr(float(ratio))) * n)


def check_choice(name: str, option: str, value, choices) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: {option} must be one of {list(choices)}, got {value!r}")


def check_layer(name: str, option: str, value, num_layers: int, lo: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int layer in [lo, num_layers - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= num_layers - 1):
        raise ValueError(f"{name}: {option} must be an int in [{lo}, {num_layers - 1}] for this {num_layers}-layer model, got {value!r}")


def seeded_scores(gen: Generation, seed: int) -> torch.Tensor:
    """Uniform random scores, FloatTensor [B, I, N_v]: one seeded draw per image slot, shared by all
    samples of the batch, so a sample's selection does not depend on the batch it runs in."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(gen.visual_index.shape[1:], generator=g).expand(gen.batch_size, -1, -1)


def check_int(name: str, option: str, value, lo: int, hi: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int in [lo, hi] (no upper bound when ``hi`` is None)."""
    bad = isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi)
    if bad:
        upper = "" if hi is None else f", {hi}]"
        raise ValueError(f"{name}: {option} must be an int in [{lo}{upper or ', inf)'}, got {value!r}")


def solve_for_budget(mean: Callable[[float], float], target: float, lo: float, hi: float, increasing: bool,
                     iters: int = 60) -> float:
    """Solve a schedule parameter for a target equivalent budget by bisection.

    ``mean(x)`` is the equivalent budget (visual tokens per image averaged over layers) of parameter
    ``x``, monotone on [lo, hi] (``increasing`` or decreasing). Returns the parameter nearest the
    crossing on the side where ``mean(x) >= target`` (the most pruning that still meets the target), or
    the end of the range that prunes most when even it meets the target.
    """
    ok, bad = (hi, lo) if increasing else (lo, hi)
    if mean(bad) >= target:
        return bad
    for _ in range(iters):
        mid = (ok + bad) / 2
        ok, bad = (mid, bad) if mean(mid) >= target else (ok, mid)
    return ok
