"""``pool``: 2-D average pooling of each image's patch grid, before the LLM (a strong baseline)."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import torch
import torch.nn.functional as F

from vtprune.engine.decisions import KeepVisual
from vtprune.methods.registry import register_method
from vtprune.methods.stages import SelectBeforeLLM


@register_method
@dataclasses.dataclass(frozen=True)
class Pool(SelectBeforeLLM):
    """Average-pool each image's grid of visual embeddings (the projector's output, i.e. layer 0's
    input) to an ``a x b`` grid, before layer 0.

    ``a x b`` is the largest product not above ``budget`` whose aspect stays within 2x of the patch
    grid's (``pooled_grid``); e.g. 64 of 24x24 -> 8x8, 192 -> 12x16, 13 of 14x14 -> 3x4. Windows are
    those of ``adaptive_avg_pool2d``. Each pooled token takes the original position (RoPE) of the patch
    at its window's centre, so positions stay original.

    A video's grid (``frames x rows x cols``: its frames, or Qwen's temporal patches) is pooled in time and
    space with ``adaptive_avg_pool3d`` to ``c x a x b`` (:func:`pooled_shape`: both shrink by the same
    factor); each pooled token sits at its window's centre frame, row and column.

    Images made of several grids (LLaVA-NeXT: the base tile, then the high-resolution grid whose rows
    each end with a newline token): the budget is split over the grids in proportion to the tokens
    each spans (each first gets the least it can be pooled to), every grid is pooled on its own, and a
    grid with separators keeps one per pooled row (the newline closing the window's centre row, at its
    own position and unchanged), counted in the budget, so the pooled grid keeps LLaVA-NeXT's
    row-and-newline form. Tokens of an image that lie in no grid (LLaVA-OneVision's newline closing an
    image of a multi-image prompt) are kept unchanged at their positions, also counted in the budget.

    Options: budget / keep_ratio (default keep_ratio 0.25). Needs the adapter's patch grids
    (``Adapter.visual_grids``: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL / 2.5-VL, InternVL (one
    grid per tile), the bundled model).

    Raises (at the prefill): ValueError when the visual tokens form no known grids, or the budget is
    below the least the grids pool to (one token per grid, plus its separator, plus the tokens in no grid).

    Source: the pooling baseline of METHODS.md (Baselines); the window-to-position rule and the
    multi-grid rule (budget split, one newline per pooled row, as LLaVA-NeXT-Video pools its
    frames) are reconstructed.
    """

    name = "pool"

    def select(self, view, plan) -> KeepVisual:
        grids = patch_grids(view)
        x = view.visual_hidden()  # [B, I, N, d]
        bsz, imgs, n, d = x.shape
        loose = outside_grids(grids, n)
        keeps, values = [loose], [x[:, :, loose.to(x.device)]]
        for g, share in zip(grids, split_budget(plan.keep, grids, loose.numel()), strict=True):
            c, a, b = pooled_shape(share, g)
            frames, rows, cols = torch.meshgrid(torch.arange(g.frames), torch.arange(g.rows), torch.arange(g.cols),
                                                indexing="ij")
            cells = x[:, :, g.token(rows, cols, frames).flatten().to(x.device)]  # [B, I, F * rows * cols, d]
            grid = cells.float().reshape(bsz * imgs, g.frames, g.rows, g.cols, d).permute(0, 4, 1, 2, 3)
            pooled = F.adaptive_avg_pool3d(grid, (c, a, b)).permute(0, 2, 3, 4, 1).reshape(bsz, imgs, c * a * b, d)
            centre = window_centres(g.rows, g.cols, a, b)  # [a * b] among one frame's patches
            frame = torch.tensor(axis_centres(g.frames, c)).repeat_interleave(a * b)
            keeps.append(g.token(centre.repeat(c) // g.cols, centre.repeat(c) % g.cols, frame))
            values.append(pooled.to(x.dtype))
            if g.separators:  # the newline closing each pooled row's centre row
                newline = g.token(centre[::b].repeat(c) // g.cols, g.cols, frame[::b])
                keeps.append(newline)
                values.append(x[:, :, newline.to(x.device)])
        keep = torch.cat(keeps).to(view.visual_index.device).expand(bsz, imgs, -1)
        return KeepVisual(keep, torch.cat(values, 2))


def patch_grids(view) -> tuple:
    """Each image's patch grids, from the model adapter (ValueError when it has none)."""
    if not view.visual_grids:
        raise ValueError(f"pool: the model's {view.n_visual} visual tokens per image do not form known patch grids "
                         "(or the images of this call differ in shape); use another method")
    return view.visual_grids


def outside_grids(grids, n_visual: int) -> torch.Tensor:
    """The image's visual tokens (of ``n_visual``) that lie in none of ``grids`` (patches or separators),
    LongTensor [n_loose] ascending."""
    inside = torch.zeros(n_visual, dtype=torch.bool)
    for g in grids:
        inside[g.start:g.start + g.tokens] = True
    return (~inside).nonzero().flatten()


def least_pooled(g) -> int:
    """The fewest tokens grid ``g`` pools to: the smallest ``a * (b + 1 if separators else b)`` that
    :func:`pooled_grid` accepts (a video's frames pool down to one)."""
    extra = min(g.separators, 1)
    return min(a * (b + extra) for a in range(1, g.rows + 1) for b in range(1, g.cols + 1)
               if aspect_fits(a, b, g.rows, g.cols))


def aspect_fits(a: int, b: int, h: int, w: int) -> bool:
    """Whether an ``a x b`` pooled grid keeps the ``h x w`` grid's aspect within a factor of 2."""
    return 0.5 <= (a / b) / (h / w) <= 2.0


def split_budget(keep: int, grids, reserved: int = 0) -> list[int]:
    """Split ``keep - reserved`` tokens over ``grids`` (``reserved``: the tokens kept outside them): each
    gets :func:`least_pooled`, the rest goes in proportion to the tokens each grid spans (largest
    remainder; ties to the earlier grid).

    Raises:
        ValueError: ``keep - reserved`` below the sum of the grids' least pooled sizes.
    """
    least = [least_pooled(g) for g in grids]
    if keep - reserved < sum(least):
        outside = f" and the {reserved} token(s) outside them" if reserved else ""
        raise ValueError(f"pool: a budget of {keep} visual tokens per image is below the {sum(least) + reserved} that "
                         f"this image's {len(grids)} patch grid(s) pool to at least{outside}; raise the budget")
    spare = keep - reserved - sum(least)
    total = sum(g.tokens for g in grids)
    exact = [Fraction(spare * g.tokens, total) for g in grids]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(grids)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: spare - sum(shares)]:
        shares[i] += 1
    return [lo + s for lo, s in zip(least, shares, strict=True)]


def pooled_grid(budget: int, h: int, w: int, row_extra: int = 0) -> tuple[int, int]:
    """The pooled grid (a, b): the largest ``a * b`` with ``a * (b + row_extra) <= budget`` (``row_extra``
    tokens kept per pooled row, e.g. a newline), a <= h, b <= w and ``(a / b) / (h / w)`` in [1/2, 2]
    (ties: the closer aspect, then more columns). Raises ValueError if none exists."""
    best = None
    for a in range(1, h + 1):
        for b in range(1, w + 1):
            if a * (b + row_extra) > budget or not aspect_fits(a, b, h, w):
                continue
            aw, bh = a * w, b * h  # exact aspect distance, so ties break the same way everywhere
            key = (a * b, -Fraction(max(aw, bh), min(aw, bh)), b)
            if best is None or key > best[0]:
                best = (key, (a, b))
    if best is None:
        raise ValueError(f"pool: no pooled grid of at most {budget} tokens fits the {h}x{w} patch grid")
    return best[1]


def pooled_shape(budget: int, g) -> tuple[int, int, int]:
    """The pooled (frames, rows, cols) of grid ``g`` within ``budget`` tokens (separators counted).

    An image (``g.frames == 1``): ``(1, *pooled_grid(...))``. A video of F frames: the c in 1 .. F whose
    ``c x a x b`` (``(a, b)`` :func:`pooled_grid` within ``budget // c``) keeps the most tokens, ties to the c
    nearest ``F * r``, ``r = (budget / (F * rows * cols)) ** (1/3)`` (time and space shrunk by the same
    factor). Source: reconstructed (the pooling baseline of METHODS.md is 2-D; pooling every frame alone
    would spend the budget on repeated content, and LLaVA-NeXT-Video pools space only, at a fixed stride).

    Raises:
        ValueError: a budget below the grid's least pooled size.
    """
    extra = min(g.separators, 1)
    if g.frames == 1:
        return (1, *pooled_grid(budget, g.rows, g.cols, extra))
    balanced = g.frames * (budget / (g.frames * g.rows * g.stride)) ** (1 / 3)
    best = None
    for c in range(1, g.frames + 1):
        if budget // c < least_pooled(g):
            break
        a, b = pooled_grid(budget // c, g.rows, g.cols, extra)
        key = (c * a * b, -abs(c - balanced))
        if best is None or key > best[0]:
            best = (key, (c, a, b))
    if best is None:
        raise ValueError(f"pool: no pooled grid of at most {budget} tokens fits the {g.rows}x{g.cols} frames")
    return best[1]


def axis_centres(n: int, m: int) -> list[int]:
    """The centre index of each of the ``m`` windows that adaptive average pooling cuts ``n`` cells into."""
    return [((i * n) // m + -(-((i + 1) * n) // m) - 1) // 2 for i in range(m)]


def window_centres(h: int, w: int, a: int, b: int) -> torch.Tensor:
    """Token positions (row-major among the h x w patches) of the centre patch of each
    ``adaptive_avg_pool2d`` window for an (a, b) output, LongTensor [a * b]."""
    rows, cols = axis_centres(h, a), axis_centres(w, b)
    return torch.tensor([r * w + c for r in rows for c in cols], dtype=torch.long)
