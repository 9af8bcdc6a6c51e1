"""ParVTS: Parallel Vision Token Scheduling (Zhan, Lin, Lin, Ji, 2025, arXiv 2511.18875)."""

from __future__ import annotations

import dataclasses

import torch

from vtprune.methods.base import PerImageBudget, check_choice, check_layer, seeded_scores

SCHEDULES = {  # question tokens in which path(s); path whose visual tokens survive; question source
    "parallel": ((1, 2), 1, 1),
    "sequential_non_subject_first": ((2,), 1, 2),
    "sequential_subject_first": ((1,), 2, 1),
}


@dataclasses.dataclass
class ParVTS(PerImageBudget):
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

    def validate(self, num_layers: int) -> None:
        check_layer(self.name, "discard_layer", self.discard_layer, num_layers)
        check_choice(self.name, "subject_score", self.subject_score, ("cls_attention", "random"))
        check_choice(self.name, "fusion", self.fusion, ("attention_mass", "fixed", "size"))
        check_choice(self.name, "schedule", self.schedule, tuple(SCHEDULES))
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"parvts: alpha must be a float in [0, 1], got {self.alpha!r}")

    # ------------------------------------------------------------------ stages
    def _active(self) -> bool:
        return self.keep < self.n_visual

    def _fuses(self) -> bool:
        return self.schedule == "parallel"

    def score_rows(self, gen) -> str | None:
        if gen.phase != "prefill" or not self._active() or not self._fuses() or self.fusion != "attention_mass":
            return None
        last = gen.layer == self.discard_layer - 1
        return "question" if last or (self.fuse_every_layer and gen.layer < self.discard_layer - 1) else None

    def on_prefill_layer(self, gen) -> None:
        if not self._active():
            return
        question_in, keep_group, question_from = SCHEDULES[self.schedule]
        if gen.layer == 0:
            gen.split_paths(self._subjects(gen), question_in)
        elif self._fuses() and self.fuse_every_layer and gen.layer < self.discard_layer:
            gen.fuse_questions(self._weights(gen, gen.layer - 1), into=(1, 2))
        if gen.layer == self.discard_layer:
            if self._fuses():
                gen.fuse_questions(self._weights(gen, gen.layer - 1), into=(1,))
            gen.merge_paths(keep_group, question_from)

    def _subjects(self, gen) -> torch.Tensor:
        """Subject tokens per image, LongTensor [B, I, budget] of positions among the N_v."""
        scores = seeded_scores(gen, self.seed) if self.subject_score == "random" else gen.saliency
        return torch.topk(scores.float(), self.keep, dim=-1).indices

    def _weights(self, gen, layer: int) -> torch.Tensor:
        """w_S per question token, FloatTensor [B, Q]."""
        q = gen.paths["q_valid"].shape[1]
        if self.fusion == "fixed":
            return torch.full((gen.batch_size, q), float(self.alpha))
        if self.fusion == "size":
            return torch.full((gen.batch_size, q), self.keep / self.n_visual)
        lse_s, lse_n, _ = gen.question_visual_lse(layer)
        return torch.sigmoid(lse_s - lse_n).nan_to_num(0.5).mean(1)
