"""What the engine asks of a method (the contract of ``vtprune.methods``; the engine imports no method).

A method is an immutable options object with

* ``plan(num_layers, n_visual) -> Plan``: its options resolved against a model (kept counts, per-layer
  targets, a solved ratio or layer), raising ValueError for what this model cannot take;
* stages, each called with a read-only :class:`~vtprune.engine.view.GenerationView` and the plan:
  ``score_request`` (which attention rows of the current layer to score beside the fused kernel, or
  None), ``on_prefill_layer`` / ``on_decode_layer`` (the :mod:`~vtprune.engine.decisions` actions to
  apply before the current decoder layer); ``acts_at_decode_step`` (whether a decode step may score or
  act at all: on the steps that do not, the decoder layers run without the engine's per-layer hooks);
* ``needs_saliency``: whether the adapter must hook the vision tower for a per-patch saliency.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from vtprune.engine.decisions import Action, ScoreRequest
    from vtprune.engine.view import GenerationView


@dataclasses.dataclass(frozen=True)
class Plan:
    """A method's options resolved against one model and image size.

    Attributes:
        num_layers: L, the decoder layers.
        n_visual: N_v, the visual tokens per image it was resolved for.
    """

    num_layers: int
    n_visual: int

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-serialisable dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@runtime_checkable
class MethodLike(Protocol):
    """The interface the engine runs (implemented by :class:`vtprune.methods.base.Method`)."""

    name: ClassVar[str]
    needs_saliency: ClassVar[bool]

    def plan(self, num_layers: int, n_visual: int) -> Plan: ...

    def check_layers(self, num_layers: int) -> None: ...

    def score_request(self, view: GenerationView, plan: Any) -> ScoreRequest | None: ...

    def on_prefill_layer(self, view: GenerationView, plan: Any) -> Sequence[Action]: ...

    def on_decode_layer(self, view: GenerationView, plan: Any) -> Sequence[Action]: ...

    def acts_at_decode_step(self, view: GenerationView, plan: Any) -> bool: ...

    def options(self) -> dict[str, Any]: ...
