"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.engine.decisions import KeepVisual
from vtprune.methods.base import BudgetPlan, check_int
from vtprune.methods.registry import register_method
from vtprune.methods.stages import SelectBeforeLLM


@dataclasses.dataclass(frozen=True)
class VisionZipPlan(BudgetPlan):
    """VisionZip's plan: ``keep`` tokens per image, ``contextual`` of them merged (the rest dominant)."""

    contextual: int


@register_method
@dataclasses.dataclass(frozen=True)
class VisionZip(SelectBeforeLLM):
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

    def validate(self) -> None:
        super().validate()
        if self.contextual is not None:
            check_int(self.name, "contextual", self.contextual, 0)

    def plan(self, num_layers: int, n_visual: int) -> VisionZipPlan:
        keep = self.keep(n_visual)
        if self.contextual is None:
            contextual = min(keep - 1, round(keep * 10 / 64)) if keep > 1 else 0
        else:
            check_int(self.name, "contextual", self.contextual, 0, keep)
            contextual = self.contextual
        return VisionZipPlan(num_layers, n_visual, keep, contextual)

    # the plan passed in is the one plan() built, a VisionZipPlan (narrower than SelectBeforeLLM's BudgetPlan)
    def select(self, view, plan: VisionZipPlan) -> KeepVisual:  # type: ignore[override]
        c = plan.contextual
        dominant = torch.topk(view.saliency.float(), plan.keep - c, dim=-1).indices  # [B, I, d]
        x = view.visual_hidden()  # [B, I, N, D]
        kept_hidden = torch.gather(x, 2, dominant[..., None].expand(-1, -1, -1, x.shape[-1]).to(x.device))
        if c == 0:
            return KeepVisual(dominant, kept_hidden)
        targets, merged = merge_contextual(x, dominant, c)
        return KeepVisual(torch.cat([dominant, targets], dim=-1), torch.cat([kept_hidden, merged], dim=2))


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
