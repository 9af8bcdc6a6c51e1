"""Per-generation state: one ``generate`` call (the prefill, then one decode step per new token).

It holds where the visual tokens are (per sample and image), which tokens each layer's sequence and KV
cache hold, the attention rows scored this step, and the counts the ledger turns into FLOPs / KV bytes.
Methods act only through the public methods below; the run (``engine/run.py``) applies their effect to
hidden states, position embeddings, masks and caches.

Shapes: B samples, I images per sample, N_v visual tokens per image, S prompt length (padded),
L decoder layers. Token indices are those of ``engine/layout.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from vtprune.engine.layout import PAD, Layout, gather_tokens, locate, select_kv


class Generation:
    """State of one generation. Created by the run at the prefill call.

    Attributes read by methods:
        num_layers (L), batch_size (B), n_images (I), n_visual (N_v, per image), prompt_length (S),
        phase ("prefill" | "decode"), layer (current decoder layer), step (decode: tokens generated so
        far, 1 at the first decode step), max_new_tokens (int or None),
        visual_index: LongTensor [B, I, N_v], original indices of every image's tokens,
        saliency: FloatTensor [B, I, N_v] or None (per-patch saliency from the adapter),
        visual_grids: the :class:`~vtprune.adapters.base.PatchGrid` s that make up each image's visual
            tokens when the adapter knows them, else None (asked of the adapter on first read only, so
            methods that never read it cost nothing); visual_grid: (rows, cols) when that is one grid
            covering every visual token, else None.
    """

    def __init__(self, *, visual_index: torch.Tensor, text_index: torch.Tensor, valid: torch.Tensor,
                 num_layers: int, max_new_tokens: int | None):
        self.visual_index = visual_index
        self.text_index = text_index
        self.valid = valid  # [B, S_total] bool, False at padding; grows during decoding
        self.batch_size, self.n_images, self.n_visual = visual_index.shape
        self.prompt_length = valid.shape[1]
        self.num_layers = num_layers
        self.saliency: torch.Tensor | None = None  # set by the run before layer 0 when a method needs it
        self.grids_source: Callable[[], tuple | None] | None = None  # set by the run: the adapter's answer
        self.max_new_tokens = max_new_tokens
        self.pads = (~valid).sum(1).tolist()  # per-sample left padding (one host sync, prefill only)
        self.has_padding = any(self.pads)
        self.phase = "prefill"
        self.layer = 0
        self.step = 0
        self.layout = Layout(self._prompt_index())
        self.identity = True  # no layer has deviated from the stock sequence yet
        self.identity_at = [True] * num_layers  # per layer: still the stock sequence at prefill
        self.orig_pe = None  # the model's position embeddings of the prompt (cos, sin), [B|1, S, d]
        self.orig_pos = None  # the model's position ids of the prompt, [B|1, S]
        self.vis = visual_index  # [B, I, n] visual tokens of the main path at the current layer
        self.paths: dict | None = None  # ParVTS packed-path bookkeeping
        self.hidden: torch.Tensor | None = None  # [B, n, d] input of the current layer (prefill)
        self.logits: dict[int, torch.Tensor] = {}  # layer -> [B, H, r, k] logits scored this step
        self.score_request: dict[int, str | None] = {}  # layer -> rows the method asked to score
        self.layouts: list[Layout | None] = [None] * num_layers  # prefill sequence of each layer
        self.layer_vis: list[torch.Tensor | None] = [None] * num_layers
        # after prefill: prompt tokens in each layer's cache (index [B, n_l], None = all) and its visual tokens
        self.cache_index: list[torch.Tensor | None] = [None] * num_layers
        self.cache_vis: list[torch.Tensor] = [visual_index] * num_layers
        self.cache = None

    # ------------------------------------------------------------------ reading
    @functools.cached_property
    def visual_grids(self) -> tuple | None:
        """PatchGrids of each image's visual tokens, if known (from ``grids_source``, read once)."""
        return self.grids_source() if self.grids_source is not None else None

    @property
    def visual_grid(self) -> tuple[int, int] | None:
        """(rows, cols) when each image's visual tokens are exactly one row-major patch grid, else None."""
        grids = self.visual_grids
        if grids and len(grids) == 1 and grids[0].tokens == self.n_visual and not grids[0].separators:
            return grids[0].rows, grids[0].cols
        return None

    def visual_count(self, layer: int | None = None) -> int:
        """Visual tokens per image currently present: in the main path (prefill) or in the KV cache of
        ``layer`` (decode; default the current layer)."""
        if self.phase == "prefill":
            return self.vis.shape[-1]
        return self.cache_vis[self.layer if layer is None else layer].shape[-1]

    def total_length(self) -> int:
        """Prompt tokens plus tokens fed back so far (the size of the index space)."""
        return self.valid.shape[1]

    def key_index(self, layer: int) -> torch.Tensor:
        """Token indices of ``layer``'s keys at this step, LongTensor [B, n]: the prefill sequence of
        that layer (prefill), or its KV cache after this step's update (decode)."""
        if self.phase == "prefill":
            return self.layouts[layer].index
        prompt = self._cache_prompt_index(layer)
        fed = torch.arange(self.prompt_length, self.total_length(), device=prompt.device)
        return torch.cat([prompt, fed.expand(self.batch_size, -1)], dim=1)

    def visual_attention(self, layer: int) -> torch.Tensor:
        """Attention of the last query (prefill) or of the token being decoded, at ``layer``, to the
        visual tokens currently present (softmax over the whole row in fp32, mean over heads).

        Returns FloatTensor [B, I, n] aligned with the current visual tokens (``visual_count()``), -inf
        for a token that is not among ``layer``'s keys. Raises RuntimeError if ``layer`` was not scored.
        """
        logits = self.logits.get(layer)
        if logits is None:
            raise RuntimeError(f"no attention row was scored at layer {layer}; the method must ask for it in score_rows")
        probs = torch.softmax(logits[:, :, -1, :], dim=-1).mean(1)  # [B, k]
        keys = self.key_index(layer).to(probs.device)
        by_index = torch.full((self.batch_size, self.total_length()), float("-inf"), device=probs.device)
        by_index.scatter_(1, keys, probs)
        vis = self.vis if self.phase == "prefill" else self.cache_vis[self.layer]
        return torch.gather(by_index, 1, vis.flatten(1).to(probs.device)).view(vis.shape)

    # ------------------------------------------------------------------ acting
    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the current visual tokens at the input of the current prefill layer
        (at layer 0: the projected visual embeddings), FloatTensor [B, I, n, d] in the model dtype,
        aligned with ``visual_count()``. Raises RuntimeError outside the prefill or while paths run."""
        if self.phase != "prefill" or self.paths is not None:
            raise RuntimeError("visual_hidden is available in the prefill, on a single path")
        slots = locate(self.layout.index, self.vis.flatten(1))
        return gather_tokens(self.hidden, slots).view(*self.vis.shape, self.hidden.shape[-1])

    def keep_visual(self, keep: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Keep, from the current layer on, the visual tokens at ``keep`` (LongTensor [B, I, k] of
        positions among the current ``visual_count()`` tokens of each image; any order; k may be 0).

        Prefill: this and every later layer's sequence holds only those visual tokens (plus all text).
        ``hidden`` (optional, [B, I, k, d], in the order of ``keep``) replaces their hidden states: a
        merged token (pooling, VisionZip's contextual tokens) sits at the original position of the
        token it replaces.
        Decode: the current layer's KV cache keeps only those visual entries (text, prefix and
        generated tokens are never evicted); ``hidden`` is not accepted.
        """
        keep, order = keep.sort(dim=-1)
        if self.phase == "prefill":
            if self.paths is not None:
                raise RuntimeError("keep_visual while the ParVTS paths run: merge the paths first")
            new_vis = torch.gather(self.vis, 2, keep.to(self.vis.device))
            new_index = self._index_with(new_vis)
            self._set_layout(Layout(new_index), locate(self.layout.index, new_index))
            self.vis = new_vis
            if hidden is not None:
                self._replace_visual_hidden(torch.gather(
                    hidden, 2, order.to(hidden.device)[..., None].expand(-1, -1, -1, hidden.shape[-1])))
            return
        if hidden is not None:
            raise ValueError("keep_visual(hidden=...) replaces hidden states, which exist only in the prefill")
        layer = self.layer
        new_vis = torch.gather(self.cache_vis[layer], 2, keep.to(self.cache_vis[layer].device))
        old_index, new_index = self._cache_prompt_index(layer), self._index_with(new_vis)
        n_old, fed = old_index.shape[1], self.step - 1  # tokens fed back before this step are cached
        fed_slots = torch.arange(n_old, n_old + fed, device=new_index.device).expand(self.batch_size, -1)
        select_kv(self.cache.layers[layer], torch.cat([locate(old_index, new_index), fed_slots], 1))
        self.cache_index[layer] = new_index
        self.cache_vis[layer] = new_vis
        self.identity = False  # this layer's cache, hence its mask, now differs from the stock one

    def _replace_visual_hidden(self, hidden: torch.Tensor) -> None:
        """Set the hidden states of the current visual tokens ([B, I, n, d], aligned with ``vis``)."""
        if hidden.shape[:3] != self.vis.shape or hidden.shape[-1] != self.hidden.shape[-1]:
            raise ValueError(f"replacement hidden states of shape {tuple(hidden.shape)} do not match the "
                             f"{tuple(self.vis.shape)} kept visual tokens of width {self.hidden.shape[-1]}")
        slots = locate(self.layout.index, self.vis.flatten(1)).to(self.hidden.device)
        h = self.hidden.clone()
        h.scatter_(1, slots[:, :, None].expand(-1, -1, h.shape[-1]), hidden.flatten(1, 2).to(h))
        self.hidden = h

    def _prompt_index(self) -> torch.Tensor:
        """Every prompt token, in order: LongTensor [B, S]."""
        return torch.arange(self.prompt_length, device=self.valid.device).expand(self.batch_size, -1)

    def _cache_prompt_index(self, layer: int) -> torch.Tensor:
        """Prompt tokens in ``layer``'s KV cache after the prefill, LongTensor [B, n_l]."""
        index = self.cache_index[layer]
        return self._prompt_index() if index is None else index

    def _index_with(self, vis: torch.Tensor) -> torch.Tensor:
        """All text tokens plus the visual tokens ``vis`` [B, I, n], sorted: LongTensor [B, T + I n]."""
        return torch.cat([self.text_index, vis.flatten(1)], dim=1).sort(dim=1).values

    def _set_layout(self, layout: Layout, src: torch.Tensor) -> None:
        """Make ``layout`` the sequence from this layer on; slot i takes the hidden state of slot
        ``src[:, i]`` of the previous sequence."""
        self.hidden = gather_tokens(self.hidden, src)
        self.layout = layout
        self.identity = False

    # ------------------------------------------------------------------ ParVTS paths
    def split_paths(self, subject: torch.Tensor, question_in: tuple[int, ...] = (1, 2)) -> None:
        """Pack two paths into one sequence, before layer 0 (ParVTS, METHODS.md).

        Path 1 holds the subject tokens ``subject`` (LongTensor [B, I, k], positions among each
        image's N_v tokens), path 2 the other N_v - k. The text before the first image is shared
        (computed once); every later non-visual token (the question Q) is copied into each path named
        in ``question_in``. The paths never attend to each other; every token keeps its original
        position. Samples are left-padded with PAD slots to a common packed length.
        """
        if self.layer != 0 or self.phase != "prefill":
            raise RuntimeError("split_paths must be called before layer 0 of the prefill")
        b_size, device = self.batch_size, self.text_index.device
        subject = subject.sort(dim=-1).values.to(device)
        is_subject = torch.zeros(self.visual_index.shape, dtype=torch.bool, device=device)
        is_subject.scatter_(2, subject, True)
        vis_s = self.visual_index[is_subject].view(b_size, self.n_images, -1)
        vis_n = self.visual_index[~is_subject].view(b_size, self.n_images, -1)
        first_visual = self.visual_index[:, 0, 0].tolist()
        rows = []
        for b in range(b_size):
            text = self.text_index[b]
            prefix, question = text[text < first_visual[b]], text[text > first_visual[b]]
            tails = [(g, (torch.cat([vis.flatten(), question]) if g in question_in else vis.flatten()).sort().values)
                     for g, vis in ((1, vis_s[b]), (2, vis_n[b]))]
            rows.append((prefix, tails, question))
        lengths = [p.numel() + sum(t.numel() for _, t in tails) for p, tails, _ in rows]
        n, q_max = max(lengths), max(q.numel() for _, _, q in rows)
        index = torch.zeros(b_size, n, dtype=torch.long, device=device)
        group = torch.full((b_size, n), PAD, dtype=torch.long, device=device)
        q_slots = {g: torch.zeros(b_size, q_max, dtype=torch.long, device=device) for g in (1, 2)}
        q_valid = torch.zeros(b_size, q_max, dtype=torch.bool, device=device)
        for b, (prefix, tails, question) in enumerate(rows):
            at = n - lengths[b]
            index[b, at:at + prefix.numel()], group[b, at:at + prefix.numel()] = prefix, 0
            at += prefix.numel()
            for g, idx in tails:
                index[b, at:at + idx.numel()], group[b, at:at + idx.numel()] = idx, g
                if g in question_in:
                    q_slots[g][b, :question.numel()] = at + torch.searchsorted(idx, question)
                at += idx.numel()
            q_valid[b, :question.numel()] = True
        is_visual = torch.zeros(b_size, self.prompt_length, dtype=torch.bool, device=device)
        is_visual.scatter_(1, self.visual_index.flatten(1), True)
        slot_visual = torch.gather(is_visual, 1, index) & (group != PAD)
        self.paths = {"q_slots": q_slots, "q_valid": q_valid, "slot_visual": slot_visual,
                      "vis": {1: vis_s, 2: vis_n}, "question_in": question_in}
        self._set_layout(Layout(index, group), index)  # layer 0's input: the token embeddings at `index`

    def question_rows(self) -> torch.Tensor:
        """Slots of the question tokens of path 1 then path 2, LongTensor [B, 2Q]."""
        q = self.paths["q_slots"]
        return torch.cat([q[1], q[2]], dim=1)

    def question_visual_lse(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per head, the log-sum-exp of each question token's attention logits over its own path's
        visual keys at ``layer`` (scored with rows ``"question"``).

        Returns (lse_subject [B, H, Q], lse_non_subject [B, H, Q], valid [B, Q]); -inf where a path has
        no visual key visible to that token.
        """
        logits = self.logits[layer]  # [B, H, 2Q, k]: rows of path 1, then of path 2
        q = self.paths["q_valid"].shape[1]
        group = self.layouts[layer].group.to(logits.device)
        visual = self.paths["slot_visual"].to(logits.device)
        out = []
        for i, g in enumerate((1, 2)):
            keys = (visual & (group == g))[:, None, None, :]
            out.append(torch.logsumexp(logits[:, :, i * q:(i + 1) * q, :].masked_fill(~keys, float("-inf")), dim=-1))
        return out[0], out[1], self.paths["q_valid"]

    def fuse_questions(self, weight_subject: torch.Tensor, into: tuple[int, ...] = (1, 2)) -> None:
        """Set the question hidden states of the paths ``into`` to ``w * h_1 + (1 - w) * h_2``
        (``weight_subject``: FloatTensor [B, Q] in [0, 1])."""
        q_slots, h = self.paths["q_slots"], self.hidden
        d = h.shape[-1]
        idx = {g: q_slots[g].to(h.device)[:, :, None].expand(-1, -1, d) for g in (1, 2)}
        w = weight_subject.to(h.device, torch.float32)[:, :, None]
        fused = (w * torch.gather(h, 1, idx[1]).float() + (1 - w) * torch.gather(h, 1, idx[2]).float()).to(h.dtype)
        valid = self.paths["q_valid"].to(h.device)[:, :, None]
        h = h.clone()
        for g in into:
            h.scatter_(1, idx[g], torch.where(valid, fused, torch.gather(h, 1, idx[g])))
        self.hidden = h

    def merge_paths(self, keep_group: int, question_from: int) -> None:
        """End the paths before the current layer (the ParVTS discard): keep the shared prefix, the
        visual tokens of path ``keep_group`` and the question tokens of path ``question_from``. The
        KV caches of the earlier layers keep the same entries; everything else of the other path is
        dropped from the hidden states and the caches.
        """
        paths, group = self.paths, self.layout.group
        is_q = torch.zeros_like(group, dtype=torch.bool)
        is_q.scatter_(1, paths["q_slots"][question_from], paths["q_valid"])
        keep = (group == 0) | ((group == keep_group) & paths["slot_visual"]) | is_q
        n_keep = int(keep[0].sum())
        src = keep.long().argsort(dim=1, descending=True, stable=True)[:, :n_keep]
        index = torch.gather(self.layout.index, 1, src)
        order = index.argsort(dim=1)
        src, index = torch.gather(src, 1, order), torch.gather(index, 1, order)
        self.vis = paths["vis"][keep_group]
        for layer in range(self.layer):
            select_kv(self.cache.layers[layer], src)
            self.layouts[layer] = Layout(index)
            self.layer_vis[layer] = self.vis
        self.paths = None
        self._set_layout(Layout(index), src)
