"""LLaVA-1.5 (``LlavaForConditionalGeneration``, llava-hf checkpoints) and the bundled small model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vtprune.adapters.base import Adapter, register_adapter


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5: CLIP ViT tower, MLP projector, Llama/Vicuna language model.

    Saliency: the vision encoder's [CLS] query attention to each patch, in the encoder layer whose
    output LLaVA feeds to the projector (``vision_feature_layer``), summed over heads, computed from
    that layer's own q / k projections in a forward pre-hook (the tower keeps its SDPA kernel).
    Source: ParVTS (arXiv 2511.18875) Fig. 4 visualises [CLS] attention; layer and head reduction
    reconstructed (METHODS.md, ParVTS step 1). Towers without [CLS] that expose
    ``class_activation_saliency(features)`` (the bundled EfficientNet tower) use it instead.
    """

    model_classes = ("LlavaForConditionalGeneration",)
    family = "llava"

    def tokens_per_image(self) -> int | None:
        return getattr(self.model.config, "image_seq_length", None)

    def visual_grid(self, visual: torch.Tensor, inputs: dict | None = None) -> tuple[int, int] | None:
        """The square patch grid of a CLIP (or the bundled CNN) feature map: (sqrt(N_v), sqrt(N_v))."""
        n_visual = visual.shape[-1]
        side = math.isqrt(n_visual)
        return (side, side) if side * side == n_visual else None

    def attach_saliency(self, sink: Callable[[torch.Tensor], None]) -> list:
        tower = self.model.model.vision_tower
        if hasattr(tower, "class_activation_saliency"):
            return [tower.register_forward_hook(
                lambda mod, args, out: sink(mod.class_activation_saliency(self._selected(out))))]
        body = getattr(tower, "vision_model", tower)  # CLIPVisionModel in transformers v5 has no vision_model
        layers = getattr(getattr(body, "encoder", None), "layers", None)
        if layers is None:
            raise ValueError(f"no saliency for vision tower {type(tower).__name__}: it has no [CLS] encoder layers")
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):
            feature_layer = feature_layer[-1]
        # hidden_states[i] is the output of encoder layer i - 1
        layer_idx = (feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer) - 1
        attn = layers[layer_idx].self_attn
        drop_cls = self.model.config.vision_feature_select_strategy == "default"

        def hook(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            sink(cls_attention(module, h, drop_cls))

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]

    def _selected(self, out) -> torch.Tensor:
        layer = self.model.config.vision_feature_layer
        return out.hidden_states[layer if isinstance(layer, int) else layer[-1]]


def cls_attention(attn, hidden: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    """[CLS] query attention to every token of a CLIP-style attention block.

    Args:
        attn: the block's attention module (``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``).
        hidden: [n_images, 1 + N, D] the block's input (after its layer norm).
        drop_cls: drop the [CLS] column (LLaVA's "default" feature selection drops [CLS]).

    Returns:
        FloatTensor [n_images, N] (or [n_images, 1 + N]): softmax attention of [CLS], summed over heads.
    """
    n, t, _ = hidden.shape
    heads = attn.num_heads
    q = attn.q_proj(hidden[:, :1]).view(n, 1, heads, -1).transpose(1, 2).float()
    k = attn.k_proj(hidden).view(n, t, heads, -1).transpose(1, 2).float()
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)[:, :, 0, :].sum(1)
    return probs[:, 1:] if drop_cls else probs
