"""``pool``: 2-D average pooling of each image's patch grid, before the LLM (a strong baseline)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import torch
import torch.nn.functional as F

from vtprune.methods.base import PerImageBudget


@dataclasses.dataclass
class Pool(PerImageBudget):
    """Average-pool each image's grid of visual embeddings (the projector's output, i.e. layer 0's
    input) to an ``a x b`` grid, before layer 0.

    ``a x b`` is the largest product not above ``budget`` whose aspect stays within 2x of the patch
    grid's (``pooled_grid``); e.g. 64 of 24x24 -> 8x8, 192 -> 12x16, 13 of 14x14 -> 3x4. Windows are
    those of ``adaptive_avg_pool2d``. Each pooled token takes the original position (RoPE) of the patch
    at its window's centre, so positions stay original.

    Options: budget / keep_ratio (default keep_ratio 0.25). Needs the adapter's patch grid
    (``Adapter.visual_grid``: LLaVA-1.5 and the bundled model; ValueError otherwise).

    Source: the pooling baseline of METHODS.md (Baselines); window-to-position rule reconstructed.
    """

    name = "pool"

    def on_prefill_layer(self, gen) -> None:
        if gen.layer != 0 or self.keep >= gen.visual_count():
            return
        h, w = patch_grid(gen)
        a, b = pooled_grid(self.keep, h, w)
        x = gen.visual_hidden()  # [B, I, N, d]
        bsz, imgs, n, d = x.shape
        grid = x.float().reshape(bsz * imgs, h, w, d).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, (a, b)).permute(0, 2, 3, 1).reshape(bsz, imgs, a * b, d)
        keep = window_centres(h, w, a, b).to(gen.vis.device).expand(bsz, imgs, -1)
        gen.keep_visual(keep, pooled.to(x.dtype))


def patch_grid(gen) -> tuple[int, int]:
    """(rows, cols) of each image's patch grid, from the model adapter (ValueError when it has none)."""
    if gen.visual_grid is None:
        raise ValueError(f"pool: the model's {gen.n_visual} visual tokens per image do not form one patch grid "
                         "(e.g. LLaVA-NeXT tiles with newline tokens); use another method")
    return gen.visual_grid


def pooled_grid(budget: int, h: int, w: int) -> tuple[int, int]:
    """The pooled grid (a, b): the largest ``a * b <= budget`` with a <= h, b <= w and
    ``(a / b) / (h / w)`` in [1/2, 2] (ties: the closer aspect, then more columns). Raises ValueError if none exists."""
    best = None
    for a in range(1, h + 1):
        for b in range(1, w + 1):
            if a * b > budget or not (0.5 <= (a / b) / (h / w) <= 2.0):
                continue
            aw, bh = a * w, b * h  # exact aspect distance, so ties break the same way everywhere
            key = (a * b, -Fraction(max(aw, bh), min(aw, bh)), b)
            if best is None or key > best[0]:
                best = (key, (a, b))
    if best is None:
        raise ValueError(f"pool: no pooled grid of at most {budget} tokens fits the {h}x{w} patch grid")
    return best[1]


def window_centres(h: int, w: int, a: int, b: int) -> torch.Tensor:
    """Token positions (row-major among the h x w patches) of the centre patch of each
    ``adaptive_avg_pool2d`` window for an (a, b) output, LongTensor [a * b]."""
    def centres(n, m):
        return [((i * n) // m + -(-((i + 1) * n) // m) - 1) // 2 for i in range(m)]

    rows, cols = centres(h, a), centres(w, b)
    return torch.tensor([r * w + c for r in rows for c in cols], dtype=torch.long)
