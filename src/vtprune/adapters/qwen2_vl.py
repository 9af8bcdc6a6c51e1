"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Both families share the layout this adapter reads: a ViT (``model.model.visual``) whose patch merger
turns each ``spatial_merge_size x spatial_merge_size`` group of patches into one LLM token, a Qwen2
language model (``model.model.language_model``) with M-RoPE, and one ``<|image_pad|>`` token
(``config.image_token_id``) per LLM visual token in the prompt. An image of ``image_grid_thw`` row
``(t, h, w)`` (in patches) gives ``t * h * w / spatial_merge_size**2`` visual tokens.

Positions. The language model receives M-RoPE ``position_embeddings`` (cos, sin of shape
[B, S, head_dim], the three sections already interleaved) and text ``position_ids`` [B, S] (or None);
the engine gathers both at the original token indices, so kept tokens keep their original M-RoPE
positions. During ``generate`` the decode positions come from the ``position_ids`` that
``generate`` extends by one per step (original prompt positions + t), never from the cache length.
A direct forward call without ``position_ids`` makes the model derive them from
``past_key_values.get_seq_length()`` plus ``rope_deltas``; a cache vtprune filled answers the stock
length there (:mod:`vtprune.engine.conversation`), even after ParVTS has shortened layer 0's cache, so
those positions are the stock ones.

Video. A video's ``<|video_pad|>`` tokens (``config.video_token_id``; ``t * h * w / spatial_merge_size**2``
for ``video_grid_thw`` row ``(t, h, w)``, t its temporal patches of ``temporal_patch_size`` frames) are
visual tokens too, and a video is one visual unit (a budget is per video); images and videos are units in
prompt order (:meth:`Qwen2VLAdapter.visual_kinds`), kept video tokens keep their original M-RoPE positions,
temporal row included (the engine gathers them like an image's).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers.vision_utils import get_vision_window_index

from vtprune.adapters.base import (
    Adapter,
    PatchGrid,
    SampleGroup,
    register_adapter,
    select_rows,
    unit_groups,
    units_of,
)


@register_adapter
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: Qwen ViT with a 2x2 patch merger, Qwen2 language model with M-RoPE.

    Visual tokens: ``input_ids == config.image_token_id`` split into images by ``image_grid_thw``, and
    ``input_ids == config.video_token_id`` split into videos by ``video_grid_thw`` (direct forward calls), or
    by the per-image / per-video features ``generate`` computes before the prefill
    (``mm_encoder_outputs["image"]`` / ``["video"]``). Each image and each video is one unit of [B, I, N_v];
    the units of a batch must have equal token counts (a ``generate`` batch whose samples differ runs as
    groups, :meth:`batch_groups`).

    Saliency (for ParVTS' subject partition): the mean attention each LLM visual token receives in
    the ViT's last full-attention block, i.e. for an image of n patches with softmax attention
    ``A_h`` [n, n] in head h of that block, ``s(p) = 1 / (H n) * sum_h sum_i A_h[i, p]`` for each
    patch p, summed over the ``spatial_merge_size**2`` patches the merger turns into one LLM token.
    Each image's saliency sums to 1 over its tokens. The block is the last one for Qwen2-VL (every
    block attends over the whole image) and ``max(fullatt_block_indexes)`` for Qwen2.5-VL (the other
    blocks attend within windows). It is computed from that block's own qkv projection and rotary
    embedding in a forward pre-hook, image by image along ``cu_seqlens`` (the tower keeps its own
    attention kernel), and put back in the order of the visual tokens (Qwen2.5-VL permutes its
    patches into windows before the blocks). Source: reconstructed: Qwen's ViT has no [CLS];
    ParVTS's Fig. 4 uses [CLS] attention (arXiv 2511.18875; METHODS.md, ParVTS step 1), and the
    attention a patch receives from all patches is the [CLS]-free counterpart.

    A video's saliency is the same quantity per temporal patch: the tower attends within each temporal
    patch (its ``cu_seqlens`` segments), so each temporal patch's tokens sum to 1 and a video's to t; a
    saliency-ranked method ranks the video's tokens across all its frames (reconstructed: ParVTS and
    VisionZip describe images; equal mass per frame keeps every frame in the ranking).
    """

    model_classes: tuple[str, ...] = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "qwen2_vl"

    @property
    def merge_size(self) -> int:
        """Patches per side merged into one LLM token (``vision_config.spatial_merge_size``)."""
        return self.model.config.vision_config.spatial_merge_size

    # ------------------------------------------------------------------ visual positions
    @property
    def video_token_id(self) -> int | None:
        """``<|video_pad|>`` (``config.video_token_id``): one per LLM visual token of a video."""
        return getattr(self.model.config, "video_token_id", None)

    def visual_index(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """Original indices of every image's and video's visual tokens, LongTensor [B, I, N_v] (see
        :meth:`Adapter.visual_index`), the units in prompt order (:meth:`visual_kinds` says which is which).
        Images are dealt to samples in the order of ``image_grid_thw``, videos in that of ``video_grid_thw``
        (sample-major, as the processor emits them); a video is one unit, all its frames' tokens (Qwen3-VL
        writes a timestamp between frames: its tokens need not be contiguous).

        Raises:
            ValueError: a prompt whose image / video tokens do not match the grids' token counts; images or
                videos of different token counts in one batch (vtprune needs them equal; a ``generate`` batch
                whose samples differ is split by :meth:`batch_groups` before it gets here).
        """
        return units_of(input_ids, self.unit_token_ids(), self.unit_counts(inputs or {}))[0]

    def unit_counts(self, inputs: dict) -> dict[str, list[int] | None]:
        """Visual tokens of each image and each video of a call (:meth:`tokens_per_image_of`,
        :meth:`tokens_per_video_of`)."""
        return {"image": self.tokens_per_image_of(inputs), "video": self.tokens_per_video_of(inputs)}

    # ------------------------------------------------------------------ batches of mixed image sizes
    def batch_groups(self, input_ids: torch.Tensor, inputs: dict) -> list[SampleGroup] | None:
        """For a ``generate`` call: its samples grouped by the kinds and token counts of their images and
        videos (dynamic resolution: the counts follow each image's size and each video's frames and size),
        or None when all samples are alike or the call carries no grids (:func:`~vtprune.adapters.base.unit_groups`).
        Raises ValueError as :func:`~vtprune.adapters.base.units_per_sample`."""
        counts = self.unit_counts(inputs)
        if all(c is None for c in counts.values()):
            return None
        return unit_groups(input_ids, self.unit_token_ids(), counts)

    def select_samples(self, inputs: dict, group: SampleGroup) -> dict:
        """``inputs`` restricted to ``group``: per-sample tensors by sample, ``image_grid_thw`` /
        ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``) by the group's images / videos,
        ``pixel_values`` / ``pixel_values_videos`` (patches of all images / videos, concatenated) by their
        patch rows; a kind the group holds none of is dropped from the call."""
        by: dict[str, torch.Tensor] = {}
        dropped = []
        for grid_key, pixel_key, units in (("image_grid_thw", "pixel_values", list(group.images)),
                                           ("video_grid_thw", "pixel_values_videos", list(group.videos))):
            grid = inputs.get(grid_key)
            if grid is None:
                continue
            if not units:
                dropped += [grid_key, pixel_key] + (["second_per_grid_ts"] if grid_key == "video_grid_thw" else [])
                continue
            patches = grid.prod(-1).tolist()
            rows = torch.arange(sum(patches)).split(patches)  # each unit's patch rows
            by[grid_key] = torch.tensor(units)
            by[pixel_key] = torch.cat([rows[i] for i in units])
            if grid_key == "video_grid_thw" and inputs.get("second_per_grid_ts") is not None:
                by["second_per_grid_ts"] = torch.tensor(units)
        out = select_rows(inputs, group.samples, by)
        return {k: v for k, v in out.items() if k not in dropped}

    def visual_grid(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[int, int] | None:
        """(rows, cols) of each image's merged patches, row-major as the merger emits them, or None when the
        units are videos (:meth:`visual_grids` gives their frames x rows x cols grid), differ in shape, or
        neither grids nor M-RoPE positions are given (see :meth:`unit_shape`)."""
        shape = self.unit_shape(visual, inputs)
        return (shape[1], shape[2]) if shape is not None and shape[0] == 1 else None

    def visual_grids(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[PatchGrid, ...] | None:
        """One grid per unit: ``rows x cols`` merged patches for an image, ``frames x rows x cols`` for a
        video (its temporal patches, ``temporal_patch_size`` frames each, one after the other), or None as
        :meth:`unit_shape`."""
        shape = self.unit_shape(visual, inputs)
        return None if shape is None else (PatchGrid(shape[1], shape[2], frames=shape[0]),)

    def unit_shape(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[int, int, int] | None:
        """(frames, rows, cols) of every visual unit of the call in merged patches (frames: temporal patches,
        1 for an image), from ``image_grid_thw`` / ``video_grid_thw`` or, inside ``generate`` (whose prefill
        call carries no grid), from the units' (t, h, w) M-RoPE position ids: the distinct temporal positions
        are the frames, the distinct h / w positions of the first frame its rows / cols. None when the units
        differ in shape or neither is given. ``visual``: :meth:`visual_index`'s result [B, I, N_v]."""
        inputs = inputs or {}
        grids = [g for g in (inputs.get("image_grid_thw"), inputs.get("video_grid_thw")) if g is not None]
        m = self.merge_size
        shapes: set[tuple[int, ...]]
        if grids:
            shapes = {(int(t), int(h) // m, int(w) // m) for g in grids for t, h, w in g.tolist()}
        else:
            pos = inputs.get("position_ids")
            if pos is None or pos.dim() != 3 or pos.shape[0] < 3:
                return None
            thw, index = pos[-3:], visual.to(pos.device)
            shapes = set()
            for b in range(index.shape[0]):
                for i in range(index.shape[1]):
                    t, h, w = thw[:, b, index[b, i]]
                    first = t == t.min()
                    shapes.add((int(t.unique().numel()), int(h[first].unique().numel()), int(w[first].unique().numel())))
        if len(shapes) != 1:
            return None
        t, h, w = shapes.pop()
        return (t, h, w) if t * h * w == visual.shape[-1] else None

    def tokens_per_image_of(self, inputs: dict) -> list[int] | None:
        """Visual tokens of each image of a prefill call, in order, or None when the call carries
        neither ``image_grid_thw`` nor precomputed image features."""
        return self._tokens_of(inputs, "image_grid_thw", "image")

    def tokens_per_video_of(self, inputs: dict) -> list[int] | None:
        """Visual tokens of each video of a prefill call (``t * h * w / merge**2`` for ``video_grid_thw`` row
        (t, h, w)), in order, or None when the call carries neither ``video_grid_thw`` nor precomputed video
        features."""
        return self._tokens_of(inputs, "video_grid_thw", "video")

    def _tokens_of(self, inputs: dict, grid_key: str, modality: str) -> list[int] | None:
        grid = inputs.get(grid_key)
        if grid is not None:
            return (grid.prod(-1) // self.merge_size**2).tolist()
        encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
        features = getattr(encoded, "pooler_output", None)
        if isinstance(features, list | tuple):
            return [f.shape[0] for f in features]
        return None

    # ------------------------------------------------------------------ saliency
    def saliency_block(self) -> int:
        """Index of the ViT block the saliency is read from: the last full-attention block."""
        visual = self.model.model.visual
        full = getattr(visual, "fullatt_block_indexes", None)
        if full is None:
            return len(visual.blocks) - 1
        if len(full) == 0:
            raise ValueError("no saliency for this Qwen2.5-VL vision tower: fullatt_block_indexes is empty "
                             "(every block attends within windows)")
        return max(full)

    def attach_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        """Hooks on the vision tower (to read ``grid_thw``) and on the saliency block's attention that
        call ``sink`` with FloatTensor [n_images, N_v] per vision forward (see the class docstring).

        Raises:
            ValueError: a Qwen2.5-VL tower without full-attention blocks.
        """
        visual = self.model.model.visual
        attn = visual.blocks[self.saliency_block()].attn
        merge, windowed = self.merge_size, hasattr(visual, "fullatt_block_indexes")
        call: dict = {}

        def on_visual(module, args, kwargs):
            grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
            call["grid"] = grid
            call["window_index"] = None
            if windowed:
                call["window_index"] = kwargs.get("window_index")
                if call["window_index"] is None:
                    call["window_index"] = get_vision_window_index(
                        grid, spatial_merge_size=module.spatial_merge_size, window_size=module.window_size,
                        patch_size=module.patch_size)[0]

        def on_attention(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            received = attention_received(module, hidden, kwargs["position_embeddings"], kwargs["cu_seqlens"])
            sink(merged_token_saliency(received, call["grid"], merge, call["window_index"]))

        return [visual.register_forward_pre_hook(on_visual, with_kwargs=True),
                attn.register_forward_pre_hook(on_attention, with_kwargs=True)]


def attention_received(attn, hidden: torch.Tensor, position_embeddings, cu_seqlens: torch.Tensor,
                       max_elements: int = 1 << 24) -> torch.Tensor:
    """Mean softmax attention each patch receives in a Qwen ViT attention block, per segment.

    Args:
        attn: the block's attention module (``qkv``, ``num_heads``, ``scaling``).
        hidden: [n_patches, D] the block's attention input (after its norm), in the block's order.
        position_embeddings: the block's vision rotary (cos, sin), each [n_patches, head_dim].
        cu_seqlens: IntTensor [n_segments + 1], the segment (image) boundaries of the block's attention.
        max_elements: fp32 attention probabilities held at once (query rows are taken in chunks of
            ``max_elements // (heads * n)``; the default bounds them at 64 MiB).

    Returns:
        FloatTensor [n_patches]: ``1 / (H n) * sum_h sum_i A_h[i, p]`` within each segment of n
        patches (so each segment sums to 1), in the block's patch order.
    """
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    n_all = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n_all, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [H, n_all, hd]
    out = torch.empty(n_all, dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        ks = k[:, start:end]
        received = torch.zeros(end - start, dtype=torch.float32, device=hidden.device)
        chunk = max(1, max_elements // (attn.num_heads * (end - start)))
        for lo in range(start, end, chunk):
            qs = q[:, lo:min(lo + chunk, end)]
            received += torch.softmax(qs @ ks.transpose(-1, -2) * attn.scaling, dim=-1).sum((0, 1))
        out[start:end] = received / (attn.num_heads * (end - start))
    return out


def merged_token_saliency(received: torch.Tensor, grid_thw: torch.Tensor, merge: int,
                          window_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-patch saliency pooled to the LLM's visual tokens, per image.

    Args:
        received: FloatTensor [n_patches] in the ViT blocks' order (consecutive runs of ``merge**2``
            patches form one merged token, as in the patch merger).
        grid_thw: LongTensor [n_images, 3], each image's (t, h, w) in patches.
        merge: ``spatial_merge_size``.
        window_index: Qwen2.5-VL's permutation of merged tokens into windows (None for Qwen2-VL).

    Returns:
        FloatTensor [n_images, N_v], summed over each token's ``merge**2`` patches, in the order of
        the image's visual tokens in the prompt.

    Raises:
        ValueError: images of different token counts (vtprune needs them equal within a call).
    """
    tokens = received.view(-1, merge * merge).sum(-1)
    if window_index is not None:
        tokens = tokens[torch.argsort(window_index.to(tokens.device))]
    counts = (grid_thw.prod(-1) // merge**2).tolist()
    if len(set(counts)) != 1:
        raise ValueError(f"mismatched images: every image must give the same number of visual tokens; got {counts}")
    return tokens.view(len(counts), counts[0])
