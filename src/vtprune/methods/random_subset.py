"""``random``: a uniform random subset of the visual tokens, chosen before the LLM (a strong baseline)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.engine.decisions import KeepVisual
from vtprune.methods.base import check_int, seeded_scores
from vtprune.methods.registry import register_method
from vtprune.methods.stages import SelectBeforeLLM


@register_method
@dataclasses.dataclass(frozen=True)
class RandomSubset(SelectBeforeLLM):
    """Keep ``budget`` visual tokens per image drawn uniformly at random (seeded), before layer 0; every
    layer then sees the same subset.

    Options: budget / keep_ratio (default keep_ratio 0.25), seed (0). The draw depends only on the seed
    and the image's slot in the prompt, not on the batch, so batched equals one by one.

    Source: the random-selection baseline reported by VisionZip (Table 1) and others (METHODS.md,
    Baselines).
    """

    name = "random"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "seed", self.seed, 0)

    def select(self, view, plan) -> KeepVisual:
        return KeepVisual(torch.topk(seeded_scores(view, self.seed), plan.keep, dim=-1).indices)
