"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import PerImageBudget, check_int


@dataclasses.dataclass
class VisionZip(PerImageBudget):
    """Before the LLM, keep per image ``budget - contextual`` *dominant* tokens (highest vision-side
    saliency: [CLS] attention for CLIP) plus ``contextual`` tokens that each merge a group of the
    remaining ones.

    Contextual tokens: of the remaining tokens (in patch order), every ``step``-th one is a target
    (``step = max(1, remaining // contextual)``, the first ``contextual`` of them); every remaining
    token joins the target whose embedding is most similar (cosine) and each target becomes the mean
    of its group. A merged token sits at its target's original position.

    Options: budget / keep_ratio (default keep_ratio 0.25), contextual (int, default
    ``round(budget * 10 / 64)``: the paper's 54 + 10, 108 + 20, 162 + 30 splits of 64 / 128 / 192).

    Source: VisionZip paper, Sec. 3 (dominant tokens by [CLS] attention, contextual tokens by
    similarity merging, the dominant / contextual splits). Reconstructed: the similarity is taken
    between the projected visual embeddings (the LLM's inputs) rather than the vision encoder's keys,
    so that the method needs nothing model-specific beyond the adapter's saliency.
    """

    name = "visionzip"
    needs_saliency = True
    contextual: int | None = None

    def check_visual(self, n_visual: int) -> None:
        super().check_visual(n_visual)
        if self.contextual is None:
            self.n_contextual = min(self.keep - 1, round(self.keep * 10 / 64)) if self.keep > 1 else 0
        else:
            check_int(self.name, "contextual", self.contextual, 0, self.keep)
            self.n_contextual = self.contextual

    def on_prefill_layer(self, gen) -> None:
        if gen.layer != 0 or self.keep >= gen.visual_count():
            return
        c = self.n_contextual
        dominant = torch.topk(gen.saliency.float(), self.keep - c, dim=-1).indices  # [B, I, d]
        x = gen.visual_hidden()  # [B, I, N, D]
        kept_hidden = torch.gather(x, 2, dominant[..., None].expand(-1, -1, -1, x.shape[-1]).to(x.device))
        if c == 0:
            gen.keep_visual(dominant, kept_hidden)
            return
        targets, merged = merge_contextual(x, dominant, c)
        gen.keep_visual(torch.cat([dominant, targets], dim=-1), torch.cat([kept_hidden, merged], dim=2))

    def options(self) -> dict:
        out = dataclasses.asdict(self)
        out["contextual_used"] = getattr(self, "n_contextual", None)
        return out


def merge_contextual(x: torch.Tensor, dominant: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens.

    Args:
        x: [B, I, N, D] visual embeddings of each image.
        dominant: LongTensor [B, I, d], positions (among N) of the dominant tokens.
        contextual: number of contextual tokens c (1 <= c <= N - d).

    Returns:
        (targets LongTensor [B, I, c] positions among N, merged [B, I, c, D] in x's dtype): each target's
        mean over the remaining tokens assigned to it (the most cosine-similar target; a target is in
        its own group).
    """
    bsz, imgs, n, dim = x.shape
    device = x.device
    dominant = dominant.to(device)
    is_dom = torch.zeros(bsz, imgs, n, dtype=torch.bool, device=device).scatter_(2, dominant, True)
    # the remaining tokens in patch order: sort by (dominant, position)
    order = torch.argsort(is_dom.long() * n + torch.arange(n, device=device), dim=-1)
    rest = order[..., : n - dominant.shape[-1]]  # [B, I, R]
    r = rest.shape[-1]
    step = max(1, r // contextual)
    target_slots = torch.arange(0, step * contextual, step, device=device)  # among the R remaining
    targets = rest[..., target_slots]
    xr = torch.gather(x, 2, rest[..., None].expand(-1, -1, -1, dim)).float()
    unit = torch.nn.functional.normalize(xr, dim=-1)
    sim = unit @ unit[:, :, target_slots].transpose(-1, -2)  # [B, I, R, c]
    assign = sim.argmax(-1)
    assign[..., target_slots] = torch.arange(contextual, device=device)  # a target is in its own group
    sums = torch.zeros(bsz, imgs, contextual, dim, device=device).scatter_add_(
        2, assign[..., None].expand(-1, -1, -1, dim), xr)
    counts = torch.zeros(bsz, imgs, contextual, device=device).scatter_add_(2, assign, torch.ones_like(assign, dtype=torch.float))
    return targets, (sums / counts[..., None]).to(x.dtype)
