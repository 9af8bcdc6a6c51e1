"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, Qwen/Qwen3-VL-* checkpoints).

What Qwen3-VL shares with Qwen2-VL (and this adapter inherits from
:class:`~vtprune.adapters.qwen2_vl.Qwen2VLAdapter`): a ViT (``model.model.visual``) whose patch merger turns
each ``spatial_merge_size x spatial_merge_size`` group of patches into one LLM token, one ``<|image_pad|>``
token (``config.image_token_id``) per LLM visual token, ``t * h * w / spatial_merge_size**2`` tokens for an
image of ``image_grid_thw`` row ``(t, h, w)`` (dynamic resolution: batches of mixed sizes run as groups),
M-RoPE positions whose deltas the model keeps in ``model.model.rope_deltas``, videos as units of their own
(a video's frames are separated by timestamp text here: one unit of several runs).

What differs, and how it is handled:

* Positions. M-RoPE is interleaved (the H and W frequencies at indices 1::3 and 2::3 of the rotary half,
  not contiguous sections) and the text model takes 4-row ``position_ids`` [4, B, S] (row 0 the text
  positions the mask and the layers see, rows 1-3 the (t, h, w) positions of the rotary embedding). The
  decoder layers receive the rotary (cos, sin) [B, S, head_dim] and the text positions [B, S], which the
  engine gathers at the kept tokens' original indices, as for Qwen2-VL; an image's positions advance the
  text by ``max(h, w) / merge`` (the model's ``get_rope_index``), and decode positions come from
  ``generate`` (or, in a hand-written loop, from the model itself: a cache vtprune filled answers the
  stock length, :mod:`vtprune.engine.conversation`).
* DeepStack. The tower also returns one feature per visual token at each of its
  ``deepstack_visual_indexes`` blocks (through its own merger), and ``Qwen3VLTextModel.forward`` adds level
  i to the hidden states at the visual positions after decoder layer i (``_deepstack_process``), i.e. into
  the input of layer i + 1. The adapter takes ``visual_pos_masks`` and ``deepstack_visual_embeds`` out of
  the language model's prefill call (:meth:`take_language_model_inputs`) and adds level i back before
  layer i + 1 (:meth:`layer_input`) at the slots of the sequence that layer i ran on whose original index
  is a visual token (image or video), each slot getting the features of its own token. So a visual token
  pruned before layer i + 1 gets none of the later levels, the kept tokens get theirs in whatever order and packing the layer
  holds (ParVTS's two paths included; PAD slots are skipped), and with nothing pruned the sums are those
  of the stock model, element by element. A merged token (VisionZip's contextual tokens) sits at its
  target's original index and gets the target's features (reconstructed: DeepStack has no merged tokens).
  A config with as many DeepStack levels as decoder layers (the last level would be added after the last
  layer, where no layer input follows) is refused (ValueError); released checkpoints have 3 levels and 28
  or more layers.

Saliency (ParVTS subjects, VisionZip dominant tokens): as Qwen2-VL, the mean attention each LLM visual
token receives in the ViT's last block (every Qwen3-VL block attends over the whole image), summed over
the merger's ``spatial_merge_size**2`` patches; each image's saliency sums to 1. Source: reconstructed
(the Qwen ViT has no [CLS]; see :class:`~vtprune.adapters.qwen2_vl.Qwen2VLAdapter`); the DeepStack levels
are not part of it.
"""

from __future__ import annotations

import dataclasses

import torch

from vtprune.adapters.base import register_adapter
from vtprune.adapters.qwen2_vl import Qwen2VLAdapter


@dataclasses.dataclass(frozen=True, eq=False)
class DeepStack:
    """The DeepStack inputs of one prefill call of the language model.

    Attributes:
        levels: one FloatTensor [n_visual_all, d] per level: the features of every visual token of the
            batch, in the order of ``visual_pos_masks.nonzero()`` (sample-major, then position).
        rows: LongTensor [B, S], the row of each prompt token in every level, -1 for non-visual tokens.
    """

    levels: tuple[torch.Tensor, ...]
    rows: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor, levels) -> DeepStack:
        """From the model's ``visual_pos_masks`` (BoolTensor [B, S]) and ``deepstack_visual_embeds``."""
        mask = mask.bool()
        rows = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)
        return cls(tuple(levels), torch.where(mask, rows, -1))


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen ViT with a 2x2 patch merger and DeepStack levels, Qwen3 language model with
    interleaved M-RoPE (module docstring). Visual tokens, mixed-size batches, patch grids, decode
    positions and saliency as :class:`~vtprune.adapters.qwen2_vl.Qwen2VLAdapter`.

    Raises:
        ValueError: (on construction) a config with at least as many DeepStack levels as decoder layers.
    """

    model_classes = ("Qwen3VLForConditionalGeneration",)
    family = "qwen3_vl"

    def __init__(self, model):
        super().__init__(model)
        levels = len(model.config.vision_config.deepstack_visual_indexes)
        layers = self.text_config.num_hidden_layers
        if levels >= layers:
            raise ValueError(
                f"this Qwen3-VL config has {levels} DeepStack levels (deepstack_visual_indexes) for {layers} decoder "
                "layers; vtprune re-adds level i before decoder layer i + 1, so it needs more layers than levels")

    def take_language_model_inputs(self, kwargs: dict) -> DeepStack | None:
        """Take ``visual_pos_masks`` and ``deepstack_visual_embeds`` out of the language model's prefill
        call (so that its own ``_deepstack_process``, which indexes the full-length sequence, does not
        run) and return them as a :class:`DeepStack`; None when the call carries no DeepStack features."""
        mask = kwargs.pop("visual_pos_masks", None)
        levels = kwargs.pop("deepstack_visual_embeds", None)
        if levels is None or mask is None:
            return None
        return DeepStack.from_mask(mask, levels)

    def layer_input(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, group: torch.Tensor | None,
                    taken: DeepStack | None) -> torch.Tensor:
        """The input of prefill decoder layer ``layer``: ``hidden`` (the output of layer ``layer - 1``, [B, n,
        d]) plus DeepStack level ``layer - 1`` at the slots holding a visual token, for layers 1 ..
        n_levels (others: ``hidden`` unchanged).

        Args:
            layer: the decoder layer about to run.
            hidden: [B, n, d] the previous layer's output, on the sequence that layer ran on.
            index: LongTensor [B, n], each slot's original token index.
            group: LongTensor [B, n] of path groups (packed paths; -1 marks a PAD slot, which gets nothing)
                or None.
            taken: what :meth:`take_language_model_inputs` returned.

        Returns:
            [B, n, d] in ``hidden``'s dtype: slot (b, j) holding visual token ``index[b, j]`` gets that
            token's level feature added (cast to ``hidden``'s dtype first, as the model does).
        """
        if taken is None or not 1 <= layer <= len(taken.levels):
            return hidden
        level = taken.levels[layer - 1].to(hidden.device, hidden.dtype)
        rows = torch.gather(taken.rows.to(hidden.device), 1, index.to(hidden.device))  # [B, n]
        hit = rows >= 0
        if group is not None:
            hit &= group.to(hidden.device) >= 0
        return torch.where(hit[..., None], hidden + level[rows.clamp(min=0)], hidden)
