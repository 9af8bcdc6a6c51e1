"""Gemma 3 (``Gemma3ForConditionalGeneration``, google/gemma-3-*-it checkpoints).

Layout: a SigLIP tower (``model.model.vision_tower``, no [CLS]) whose last hidden state, P x P patches
per image (64 x 64 at 896 px with 14 px patches), the projector average-pools with a k x k window
(``k = P / sqrt(mm_tokens_per_image)``) into ``config.mm_tokens_per_image`` tokens (256: 16 x 16, row-major),
normalises and projects; a Gemma 3 language model (``model.model.language_model``). The processor expands
each image into ``<start_of_image>``, ``mm_tokens_per_image`` image tokens (``config.image_token_id``) and
``<end_of_image>``, and returns ``token_type_ids`` (1 at the image tokens).

What the engine needs from this family, and where it comes from:

* Visual tokens: ``input_ids == config.image_token_id``, ``mm_tokens_per_image`` per image (fixed by the
  config). With pan-and-scan (``do_pan_and_scan``) each crop is one more image of that many tokens; samples
  with different numbers of crops run as groups (:meth:`Gemma3Adapter.batch_groups`).
* Bidirectional image blocks: the model lets the tokens of one image attend to each other in both
  directions (full layers: OR(causal, block); sliding layers: AND(window, OR(causal, block))), from the
  prefill call's ``token_type_ids`` (``get_block_sequence_ids_for_mask``: one block per run of image
  tokens); decode calls get none. :meth:`Gemma3Adapter.attention_blocks` returns those block ids, and the
  engine's masks keep the blocks among the kept tokens after pruning. Without ``token_type_ids`` the model
  is causal everywhere, and so are the engine's masks.
* Masks: the language model receives a dict of 4-D masks (``full_attention``, ``sliding_attention``), each
  layer picks its own; the engine builds each pruned layer's mask itself (padding from the model call's 2-D
  ``attention_mask``).
* Sliding-window layers (``layer_types``): a query sees the keys less than ``sliding_window`` positions
  back, and their cache keeps the last ``sliding_window - 1`` entries. :meth:`Gemma3Adapter.sliding_window`
  tells the engine each layer's window, which the masks of pruned layers apply by original position and
  whose cache evictions the engine follows (:mod:`vtprune.engine.window`).
* Positions: 1-D ``position_ids``; each layer type has its own rotary embedding (local base 10k, global
  1M), and the engine gathers each layer's (cos, sin) from that layer's own call, at the original indices.
* Attention scale ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``): the scoring entry reads the
  ``scaling`` each attention call passes. ``attn_logit_softcapping`` (None in every released Gemma 3) would
  not be applied to the scores.

Refused (ValueError): ``use_bidirectional_attention=True`` (text tokens attending forward, which the engine's
causal masks do not reproduce).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vtprune.adapters.base import Adapter, SampleGroup, images_per_sample, register_adapter, select_rows


@register_adapter
class Gemma3Adapter(Adapter):
    """Gemma 3: SigLIP tower, average-pooling projector (``mm_tokens_per_image`` tokens per image), Gemma 3
    language model with sliding-window and full layers and bidirectional image blocks (module docstring).

    Saliency (ParVTS subjects, VisionZip dominant tokens): SigLIP has no [CLS]; the attention each patch
    receives in the tower's last encoder layer (whose output, after the post-layernorm, the projector
    pools), ``s(p) = 1 / (H P^2) * sum_h sum_i A_h[i, p]`` for the P x P patches of one image and softmax
    attention ``A_h`` of head h (from that layer's own q / k projections in a forward pre-hook; the tower
    keeps its kernel), summed over each k x k pooling window of the projector into the image's
    ``mm_tokens_per_image`` tokens (row-major, the projector's order). Each image's saliency sums to 1.
    Source: reconstructed (ParVTS, arXiv 2511.18875 Fig. 4, uses [CLS] attention; the attention a patch
    receives from all patches is the [CLS]-free counterpart, as for Qwen's ViT), the window sum is ours.

    Raises:
        ValueError: (on construction) a text config with ``use_bidirectional_attention=True``.
    """

    model_classes = ("Gemma3ForConditionalGeneration",)
    family = "gemma3"

    def __init__(self, model):
        super().__init__(model)
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise ValueError("this Gemma 3 config sets use_bidirectional_attention=True (text tokens attend forward); "
                             "vtprune's masks are causal outside the image blocks, so it supports only the default False")

    # ------------------------------------------------------------------ visual positions
    def tokens_per_image(self) -> int | None:
        """``config.mm_tokens_per_image`` (256 in the released checkpoints)."""
        return self.model.config.mm_tokens_per_image

    def visual_grid(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[int, int] | None:
        """(side, side) of the projector's pooled grid, ``side = sqrt(mm_tokens_per_image)`` (row-major, as
        the projector flattens it); None when ``visual`` ([B, I, N_v]) holds another count."""
        side = math.isqrt(self.model.config.mm_tokens_per_image)
        return (side, side) if side * side == visual.shape[-1] else None

    def image_counts_per_sample(self, input_ids: torch.Tensor, inputs: dict) -> list[list[int]] | None:
        """Each sample's images (pan-and-scan crops counted as images), ``mm_tokens_per_image`` tokens each,
        dealt over its runs of image tokens in the order of ``pixel_values`` (one row per image or crop,
        sample-major); None without ``pixel_values``. Raises ValueError as
        :func:`~vtprune.adapters.base.images_per_sample`."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return None
        return images_per_sample(input_ids, self.image_token_id, [self.model.config.mm_tokens_per_image] * pixels.shape[0])

    def select_samples(self, inputs: dict, group: SampleGroup) -> dict:
        """``inputs`` restricted to ``group``: per-sample tensors by sample, ``pixel_values`` by the group's
        images (one row each)."""
        return select_rows(inputs, group.samples, {"pixel_values": torch.tensor(group.images)})

    def attention_blocks(self, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor | None:
        """The model's bidirectional blocks: LongTensor [B, S], for each run of ``token_type_ids == 1`` its
        number among the sample's runs (0, 1, ...), -1 elsewhere, as transformers'
        ``get_block_sequence_ids_for_mask``; None when the call carries no ``token_type_ids`` (the model is
        then causal everywhere)."""
        types = (inputs or {}).get("token_type_ids")
        if types is None:
            return None
        is_image = types.to(input_ids.device) == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
        return torch.where(is_image, starts.long().cumsum(1) - 1, -1)

    def sliding_window(self, layer: int) -> int | None:
        """``text_config.sliding_window`` for a ``sliding_attention`` layer, None for a full one."""
        cfg = self.text_config
        return cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None

    # ------------------------------------------------------------------ saliency
    def attach_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        """A forward pre-hook on the tower's last encoder attention that calls ``sink`` with FloatTensor
        [n_images, mm_tokens_per_image] per vision forward (images in the order of ``pixel_values``; see the
        class docstring)."""
        tower = self.model.model.vision_tower
        attn = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
        projector = self.model.model.multi_modal_projector
        side, window = projector.patches_per_image, projector.kernel_size

        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            sink(pooled_saliency(attention_received(module, hidden), side, window))

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]


def attention_received(attn, hidden: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Mean softmax attention each token receives in a (non-causal, unmasked) SigLIP attention layer.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``num_heads``, ``scale``).
        hidden: [n_images, N, D] the layer's attention input (after its layer norm).
        max_elements: fp32 attention probabilities held at once (query rows are taken in chunks of
            ``max_elements // (n_images * heads * N)``; the default bounds them at 64 MiB).

    Returns:
        FloatTensor [n_images, N]: ``1 / (H N) * sum_h sum_i A_h[i, p]`` (each image sums to 1).
    """
    n, t, _ = hidden.shape
    heads = attn.num_heads
    q = attn.q_proj(hidden).view(n, t, heads, -1).transpose(1, 2).float()
    k = attn.k_proj(hidden).view(n, t, heads, -1).transpose(1, 2).float()
    received = torch.zeros(n, t, dtype=torch.float32, device=hidden.device)
    chunk = max(1, max_elements // (n * heads * t))
    for lo in range(0, t, chunk):
        received += torch.softmax(q[:, :, lo:lo + chunk] @ k.transpose(-1, -2) * attn.scale, dim=-1).sum((1, 2))
    return received / (heads * t)


def pooled_saliency(received: torch.Tensor, side: int, window: int) -> torch.Tensor:
    """Per-patch saliency summed over the projector's pooling windows.

    Args:
        received: FloatTensor [n_images, side * side], row-major patches.
        side: patches per side (``patches_per_image``).
        window: the pooling kernel and stride (``kernel_size``).

    Returns:
        FloatTensor [n_images, (side // window) ** 2]: each window's sum, row-major (the windows of the
        projector's ``AvgPool2d``).
    """
    grid = received.view(-1, 1, side, side)
    return (torch.nn.functional.avg_pool2d(grid, window) * window * window).flatten(1)
