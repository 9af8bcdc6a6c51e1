"""``none``: the stock model, through the same engine (the reference every comparison uses)."""

from __future__ import annotations

import dataclasses

from vtprune.methods.base import Method
from vtprune.methods.registry import register_method


@register_method
@dataclasses.dataclass(frozen=True)
class NoPruning(Method):
    """Keeps every visual token in every layer. Outputs equal the unmodified model's exactly."""

    name = "none"
