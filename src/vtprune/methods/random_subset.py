"""``random``: a uniform random subset of the visual tokens, chosen before the LLM (a strong baseline)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import PerImageBudget, seeded_scores


@dataclasses.dataclass
class RandomSubset(PerImageBudget):
    """Keep ``budget`` visual tokens per image drawn uniformly at random (seeded), before layer 0; every
    layer then sees the same subset.

    Options: budget / keep_ratio (default keep_ratio 0.25), seed (0). The draw depends only on the seed
    and the image's slot in the prompt, not on the batch, so batched equals one by one.

    Source: the random-selection baseline reported by VisionZip (Table 1) and others (METHODS.md,
    Baselines).
    """

    name = "random"
    seed: int = 0

    def on_prefill_layer(self, gen) -> None:
        if gen.layer == 0 and self.keep < gen.visual_count():
            gen.keep_visual(torch.topk(seeded_scores(gen, self.seed), self.keep, dim=-1).indices)
