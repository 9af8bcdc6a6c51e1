"""Draw which visual tokens a method kept, over the image the model saw (``vtprune show``).

One panel per layer at which the kept set changes (progressive methods: ST³, PDrop), or one panel for
a static selection; for ParVTS the subject tokens (path A, kept to the end) and the non-subject tokens
(path B, run in parallel up to the discard layer, then dropped) in two colours. The image is the
processed ``pixel_values`` (un-normalised), so the token grid lines up with what the encoder saw.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

MAX_PANELS = 6


def model_image(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    """The first image of ``pixel_values`` [B, 3, H, W] as FloatTensor [H, W, 3] in [0, 1], with the
    processor's normalisation undone."""
    ip = getattr(processor, "image_processor", processor)
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
    return (pixel_values[0].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def panels(kept: list[list[int]], n_visual: int) -> list[tuple[str, list[int]]]:
    """(title, kept positions) at the layers where the kept set changes (layer 0 included), at most
    :data:`MAX_PANELS` of them, evenly spread (the first and the last change always included)."""
    changes = [(0, kept[0])] + [(layer, k) for layer, k in enumerate(kept) if layer and k != kept[layer - 1]]
    if len(changes) > MAX_PANELS:
        step = (len(changes) - 1) / (MAX_PANELS - 1)
        changes = [changes[round(i * step)] for i in range(MAX_PANELS)]
    return [(f"from layer {layer}: {len(k)}/{n_visual} tokens", k) for layer, k in changes]


def draw(image: torch.Tensor, grid: tuple[int, int], kept: list[list[int]], path: str | Path, title: str,
         subject: list[int] | None = None, discard_layer: int | None = None) -> Path:
    """Write a PNG: the image with kept tokens outlined per panel and the others dimmed.

    Args:
        image: [H, W, 3] in [0, 1]. grid: (rows, cols) of the visual tokens over the image.
        kept: per layer, positions among the N_v tokens (``Run.kept_visual``).
        subject: ParVTS: the subject positions (drawn as the one panel, non-subject tokens in blue).
        discard_layer: ParVTS: the layer where the non-subject path ends (for the caption).

    Raises:
        ImportError: matplotlib missing (``pip install 'vtprune[eval]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows, cols = grid
    n = rows * cols
    h, w = image.shape[:2]
    ch, cw = h / rows, w / cols
    if subject is not None:
        parts = [(f"subject {len(subject)} (outlined) / non-subject {n - len(subject)} (blue)\n"
                  f"non-subject path dropped at layer {discard_layer}", subject)]
    else:
        parts = panels(kept, n)
    fig, axes = plt.subplots(1, len(parts), figsize=(4 * len(parts), 4.4), squeeze=False)
    for ax, (caption, keep) in zip(axes[0], parts, strict=True):
        ax.imshow(image.numpy())
        keep_set = set(keep)
        for p in range(n):
            r, c = divmod(p, cols)
            if p in keep_set:
                ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=False, ec="yellow", lw=1.2))
            elif subject is not None:
                ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, color="tab:blue", alpha=0.35, lw=0))
            else:
                ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, color="black", alpha=0.6, lw=0))
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(textwrap.fill(title, 40 * len(parts)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
