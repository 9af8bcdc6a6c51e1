"""The method interface: an immutable options dataclass, its plan against a model, and its decisions.

A method never sees a model class and never changes the generation: at each stage it reads a
:class:`~vtprune.engine.view.GenerationView` and returns a score request or actions
(:mod:`vtprune.engine.decisions`) that the engine applies. Its options are a frozen dataclass validated
at construction (ValueError / TypeError naming the option and what is accepted); what depends on the
model (kept counts, per-layer targets, a solved ratio or layer) is a separate :class:`Plan`
(:meth:`Method.plan`), which the run holds and the report shows. The stages a method implements are
those of its stage base (:mod:`vtprune.methods.stages`), visible in its class line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vtprune.engine.interface import Plan

if TYPE_CHECKING:
    from vtprune.engine.decisions import Action, ScoreRequest
    from vtprune.engine.view import GenerationView


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class. Subclasses are frozen dataclasses whose fields are the method's options.

    Class attributes: ``name`` (the registry name), ``needs_saliency`` (the adapter's per-patch saliency
    is wanted), ``examples`` (options for the conformance tests and docs: ``"prune"`` prunes on a small
    model, ``"keep_all"`` keeps every visual token in every layer and every decode step).

    Subclass contract: :meth:`validate` (model-independent checks, called at construction),
    :meth:`check_layers` (the checks that need only the depth), :meth:`plan`, and the stages.
    """

    name: ClassVar[str] = "base"
    needs_saliency: ClassVar[bool] = False
    examples: ClassVar[dict[str, dict[str, Any]]] = {"prune": {}, "keep_all": {}}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the options that need no model (raise ValueError / TypeError naming the option)."""

    def check_layers(self, num_layers: int) -> None:
        """Check the options against the model's depth (ValueError naming the option and its range)."""

    def plan(self, num_layers: int, n_visual: int) -> Plan:
        """The options resolved for a model with ``num_layers`` decoder layers and ``n_visual`` visual
        tokens per image. Raises ValueError for what this model cannot take."""
        self.check_layers(num_layers)
        return Plan(num_layers, n_visual)

    # ------------------------------------------------------------------ stages (default: do nothing)
    def score_request(self, view: GenerationView, plan: Any) -> ScoreRequest | None:
        """Which query rows of the current layer to score beside the fused kernel, or None."""
        return None

    def on_prefill_layer(self, view: GenerationView, plan: Any) -> Sequence[Action]:
        """Actions before decoder layer ``view.layer`` of the prefill."""
        return ()

    def on_decode_layer(self, view: GenerationView, plan: Any) -> Sequence[Action]:
        """Actions before decoder layer ``view.layer`` of decode step ``view.step``."""
        return ()

    def acts_at_decode_step(self, view: GenerationView, plan: Any) -> bool:
        """Whether decode step ``view.step`` may score or act at any layer. On a step that does not, the
        engine runs the decoder layers without its per-layer hooks (the stock call path). Default: True
        when the subclass overrides :meth:`on_decode_layer`, else False; a method that scores rows while
        decoding without overriding it must override this."""
        return type(self).on_decode_layer is not Method.on_decode_layer

    def options(self) -> dict[str, Any]:
        """The method's options as a JSON-serialisable dict (exactly its fields)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class BudgetPlan(Plan):
    """A plan that keeps ``keep`` visual tokens per image (of ``n_visual``)."""

    keep: int


@dataclasses.dataclass(frozen=True)
class PerImageBudget(Method):
    """Mixin of methods that keep a number of visual tokens per image.

    Options: ``budget`` (int, visual tokens kept per image) or ``keep_ratio`` (float in (0, 1]); at most
    one; neither gives ``keep_ratio = default_keep_ratio``. The plan's ``keep`` is the resolved count.
    """

    default_keep_ratio: ClassVar[float] = 0.25
    examples: ClassVar[dict[str, dict[str, Any]]] = {"prune": {"keep_ratio": 0.25}, "keep_all": {"keep_ratio": 1.0}}
    budget: int | None = None
    keep_ratio: float | None = None

    def validate(self) -> None:
        if self.budget is None and self.keep_ratio is None:
            object.__setattr__(self, "keep_ratio", self.default_keep_ratio)
        check_amount(self.name, self.budget, self.keep_ratio)

    def keep(self, n_visual: int) -> int:
        """Visual tokens kept per image of ``n_visual`` (:func:`resolve_budget`)."""
        return resolve_budget(self.name, self.budget, self.keep_ratio, n_visual)

    def plan(self, num_layers: int, n_visual: int) -> BudgetPlan:
        self.check_layers(num_layers)
        return BudgetPlan(num_layers, n_visual, self.keep(n_visual))


def check_amount(name: str, budget: Any, keep_ratio: Any, allow_zero: bool = False) -> None:
    """The model-independent checks of a ``budget`` / ``keep_ratio`` pair: at most one; an int budget
    >= 1 (>= 0 with ``allow_zero``); a ratio in (0, 1]. Raises ValueError naming what is accepted."""
    if budget is not None and keep_ratio is not None:
        raise ValueError(f"{name}: give one of budget (int tokens per image) or keep_ratio (float in (0, 1]), not both")
    lo = 0 if allow_zero else 1
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < lo):
        raise ValueError(f"{name}: budget must be an int >= {lo} (visual tokens per image), got {budget!r}")
    if keep_ratio is not None and (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float)
                                   or not 0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(f"{name}: keep_ratio must be in (0, 1], got {keep_ratio!r}")


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


def check_int(name: str, option: str, value, lo: int, hi: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int in [lo, hi] (no upper bound when ``hi`` is None)."""
    bad = isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi)
    if bad:
        upper = "" if hi is None else f", {hi}]"
        raise ValueError(f"{name}: {option} must be an int in [{lo}{upper or ', inf)'}, got {value!r}")


def check_ratio(name: str, option: str, value, lo_open: bool, hi_open: bool) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1] (ends open as asked)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if lo_open else value >= 0) and (value < 1 if hi_open else value <= 1)
    if not ok:
        interval = f"{'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
        raise ValueError(f"{name}: {option} must be a float in {interval}, got {value!r}")


def seeded_scores(view: GenerationView, seed: int) -> torch.Tensor:
    """Uniform random scores, FloatTensor [B, I, N_v]: one seeded draw per image slot, shared by all
    samples of the batch, so a sample's selection does not depend on the batch it runs in."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(view.visual_index.shape[1:], generator=g).expand(view.batch_size, -1, -1)


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
