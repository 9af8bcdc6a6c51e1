"""ParVTS: Parallel Vision Token Scheduling (Zhan, Lin, Lin, Ji, 2025, arXiv 2511.18875)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import check_choice, check_int, check_layer, check_ratio, seeded_scores
from vtprune.methods.registry import register_method
from vtprune.methods.stages import ParallelPaths, PathsPlan

SCHEDULES = {  # question tokens in which path(s); path whose visual tokens survive; question source
    "parallel": ((1, 2), 1, 1),
    "sequential_non_subject_first": ((2,), 1, 2),
    "sequential_subject_first": ((1,), 2, 1),
}


@register_method
@dataclasses.dataclass(frozen=True)
class ParVTS(ParallelPaths):
    """Subject and non-subject visual tokens run as two parallel paths whose information migrates
    into the question tokens; the non-subject path is discarded mid-network.

    1. Partition: subject set S = the top ``budget`` patches per image by the adapter's saliency
       (``subject_score="cls_attention"``: the vision encoder's [CLS] attention, or the tower's own
       saliency where it has no [CLS]; ``"random"`` for the ablation); N = the rest.
    2. Two paths ``[P, V_S, Q]`` and ``[P, V_N, Q]`` packed in one sequence (P computed once), each
       token at its original position, the groups never attending to each other, through layers
       ``0 .. discard_layer - 1``.
    3. Fusion at ``discard_layer`` (K): each question token becomes ``w_S h_A + (1 - w_S) h_B`` with
       ``fusion="attention_mass"``: ``w_S = mean_h sigmoid(lse_S - lse_N)``, the log-sum-exp of the
       token's attention logits over its path's visual keys at layer K-1 (the split full attention
       over S and N would give); ``"fixed"``: ``w_S = alpha``; ``"size"``: ``w_S = |S| / N_v``.
       ``fuse_every_layer`` fuses after every layer < K and feeds the fused Q to both paths.
    4. Discard: path B, its hidden states and KV entries are dropped; every layer's cache then holds
       ``P + |S| + Q`` entries.
    Ablations: ``schedule="sequential_non_subject_first"`` (Q sees only N before K, then only S) and
    ``"sequential_subject_first"`` (Q sees only S before K, then only N, which keeps N_v - budget
    tokens in the deep layers).

    Options: budget / keep_ratio (subject tokens per image; default keep_ratio 0.25), discard_layer
    (3), subject_score, fusion, alpha (0.5), fuse_every_layer (False), schedule ("parallel"), seed (0,
    for random subjects).

    Source: ParVTS abstract, Fig. 2 (parallel vs sequential scheduling) and Fig. 4 ([CLS] attention);
    every step's details (paths as a packed sequence, fusion weights, K) are reconstructed
    (METHODS.md, ParVTS).
    """

    name = "parvts"
    needs_saliency = True
    discard_layer: int = 3
    subject_score: str = "cls_attention"
    fusion: str = "attention_mass"
    alpha: float = 0.5
    fuse_every_layer: bool = False
    schedule: str = "parallel"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "discard_layer", self.discard_layer, 1)
        check_choice(self.name, "subject_score", self.subject_score, ("cls_attention", "random"))
        check_choice(self.name, "fusion", self.fusion, ("attention_mass", "fixed", "size"))
        check_choice(self.name, "schedule", self.schedule, tuple(SCHEDULES))
        check_ratio(self.name, "alpha", self.alpha, lo_open=False, hi_open=False)
        check_int(self.name, "seed", self.seed, 0)

    def check_layers(self, num_layers: int) -> None:
        check_layer(self.name, "discard_layer", self.discard_layer, num_layers)

    def plan(self, num_layers: int, n_visual: int) -> PathsPlan:
        self.check_layers(num_layers)
        question_in, keep_path, question_from = SCHEDULES[self.schedule]
        return PathsPlan(num_layers, n_visual, self.keep(n_visual), self.discard_layer, question_in, keep_path,
                         question_from)

    # ------------------------------------------------------------------ the stage's choices
    def needs_question_scores(self, plan: PathsPlan) -> bool:
        return self.fusion == "attention_mass"

    def fuse_before_merge(self, plan: PathsPlan) -> bool:
        return self.fuse_every_layer

    def first_path(self, view, plan: PathsPlan) -> torch.Tensor:
        """Subject tokens per image, LongTensor [B, I, budget] of positions among the N_v."""
        scores = seeded_scores(view, self.seed) if self.subject_score == "random" else view.saliency
        return torch.topk(scores.float(), plan.keep, dim=-1).indices

    def fusion_weights(self, view, plan: PathsPlan, layer: int) -> torch.Tensor:
        """w_S per question token, FloatTensor [B, Q]."""
        q = view.question_count()
        if self.fusion == "fixed":
            return torch.full((view.batch_size, q), float(self.alpha))
        if self.fusion == "size":
            return torch.full((view.batch_size, q), plan.keep / plan.n_visual)
        lse_s, lse_n, _ = view.question_visual_lse(layer)
        return torch.sigmoid(lse_s - lse_n).nan_to_num(0.5).mean(1)
