"""Several paths packed in one sequence: a split of the visual tokens into groups that run side by side
through the first layers, each with its own copy of the text after the image, then merge into one.

Layout (``engine/layout.py``): the text before the first image is group 0 (shared, computed once); path
``g`` (1 or 2) holds its visual tokens and, when it is named in ``question_in``, a copy of every later
text token (the question Q). Paths never attend to each other; every token keeps its original position;
samples are left-padded with PAD slots to a common packed length.

Source: the packed two-path layout is this project's (reconstructed; METHODS.md, the parallel schedule:
"as two batch rows with padding, or packed into one sequence with a block mask").
"""

from __future__ import annotations

import torch

from vtprune.engine.layout import PAD, Layout, select_kv
from vtprune.engine.state import Generation, PackedPaths


def split(state: Generation, first: torch.Tensor, question_in: tuple[int, ...] = (1, 2)) -> None:
    """Pack two paths into one sequence, before layer 0 of the prefill.

    Path 1 holds the visual tokens ``first`` (LongTensor [B, I, k], positions among each image's N_v
    tokens), path 2 the other N_v - k; see the module docstring for the rest.

    Raises:
        RuntimeError: not before layer 0 of the prefill.
    """
    if state.layer != 0 or state.phase != "prefill":
        raise RuntimeError("paths must be split before layer 0 of the prefill")
    b_size, device = state.batch_size, state.text_index.device
    first = first.sort(dim=-1).values.to(device)
    is_first = torch.zeros(state.visual_index.shape, dtype=torch.bool, device=device)
    is_first.scatter_(2, first, True)
    vis_1 = state.visual_index[is_first].view(b_size, state.n_images, -1)
    vis_2 = state.visual_index[~is_first].view(b_size, state.n_images, -1)
    first_visual = state.visual_index[:, 0, 0].tolist()
    rows = []
    for b in range(b_size):
        text = state.text_index[b]
        prefix, question = text[text < first_visual[b]], text[text > first_visual[b]]
        tails = [(g, (torch.cat([vis.flatten(), question]) if g in question_in else vis.flatten()).sort().values)
                 for g, vis in ((1, vis_1[b]), (2, vis_2[b]))]
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
    is_visual = torch.zeros(b_size, state.prompt_length, dtype=torch.bool, device=device)
    is_visual.scatter_(1, state.visual_index.flatten(1), True)
    slot_visual = torch.gather(is_visual, 1, index) & (group != PAD)
    state.paths = PackedPaths(question_slots=q_slots, question_valid=q_valid, slot_visual=slot_visual,
                              visual={1: vis_1, 2: vis_2}, question_in=question_in)
    # layer 0's input: the token embeddings at `index` (slot i of the call's input holds token offset + i)
    state.set_layout(Layout(index, group), index - state.offset)


def question_rows(paths: PackedPaths) -> torch.Tensor:
    """Slots of the question tokens of path 1 then path 2, LongTensor [B, 2Q]."""
    q = paths.question_slots
    return torch.cat([q[1], q[2]], dim=1)


def question_visual_lse(state: Generation, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head, the log-sum-exp of each question token's attention logits over its own path's visual
    keys at ``layer`` (scored with :class:`~vtprune.engine.decisions.PathQuestions`).

    Returns (lse_path_1 [B, H, Q], lse_path_2 [B, H, Q], valid [B, Q]); -inf where a path has no visual
    key visible to that token. Raises RuntimeError when no paths run or ``layer`` was not scored.
    """
    paths = state.paths_state()
    logits = state.logits.get(layer)
    if logits is None:
        raise RuntimeError(f"no question rows were scored at layer {layer}")
    q = paths.question_count  # logits: [B, H, 2Q, k], rows of path 1, then of path 2
    layout = state.prefill_keys(layer)  # earlier turns' entries (group 0, never visual here) then the layout
    assert layout.group is not None  # packed: the paths run
    group = layout.group.to(logits.device)
    visual = paths.slot_visual.to(logits.device)
    if visual.shape[1] < group.shape[1]:
        visual = torch.cat([visual.new_zeros(visual.shape[0], group.shape[1] - visual.shape[1]), visual], dim=1)
    out = []
    for i, g in enumerate((1, 2)):
        keys = (visual & (group == g))[:, None, None, :]
        out.append(torch.logsumexp(logits[:, :, i * q:(i + 1) * q, :].masked_fill(~keys, float("-inf")), dim=-1))
    return out[0], out[1], paths.question_valid


def fuse(state: Generation, weight_first: torch.Tensor, into: tuple[int, ...] = (1, 2)) -> None:
    """Set the question hidden states of the paths ``into`` to ``w * h_1 + (1 - w) * h_2``
    (``weight_first``: FloatTensor [B, Q] in [0, 1]), computed in fp32."""
    paths, h = state.paths_state(), state.hidden
    assert h is not None  # prefill: the current layer's input
    d = h.shape[-1]
    idx = {g: paths.question_slots[g].to(h.device)[:, :, None].expand(-1, -1, d) for g in (1, 2)}
    w = weight_first.to(h.device, torch.float32)[:, :, None]
    fused = (w * torch.gather(h, 1, idx[1]).float() + (1 - w) * torch.gather(h, 1, idx[2]).float()).to(h.dtype)
    valid = paths.question_valid.to(h.device)[:, :, None]
    h = h.clone()
    for g in into:
        h.scatter_(1, idx[g], torch.where(valid, fused, torch.gather(h, 1, idx[g])))
    state.hidden = h


def merge(state: Generation, keep_path: int, question_from: int) -> None:
    """End the paths before the current layer: keep the shared prefix, the visual tokens of path
    ``keep_path`` and the question tokens of path ``question_from``. The KV caches of the earlier layers
    keep the same entries; everything else of the other path is dropped from the hidden states and the
    caches (when the call has a cache)."""
    paths, group = state.paths_state(), state.layout.group
    assert group is not None  # packed: the paths run
    is_q = torch.zeros_like(group, dtype=torch.bool)
    is_q.scatter_(1, paths.question_slots[question_from], paths.question_valid)
    keep = (group == 0) | ((group == keep_path) & paths.slot_visual) | is_q
    n_keep = int(keep[0].sum())
    src = keep.long().argsort(dim=1, descending=True, stable=True)[:, :n_keep]
    index = torch.gather(state.layout.index, 1, src)
    order = index.argsort(dim=1)
    src, index = torch.gather(src, 1, order), torch.gather(index, 1, order)
    state.visual = paths.visual[keep_path]
    for layer in range(state.layer):
        if state.cache is not None:  # None: a forward call with use_cache=False
            select_kv(state.cache.layers[layer], state.prefill_kv_slots(layer, src))
        state.layouts[layer] = Layout(index)
        state.layer_visual[layer] = state.visual
    state.paths = None
    state.set_layout(Layout(index), src)
