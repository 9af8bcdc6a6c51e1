"""LLaVA-1.5 (``LlavaForConditionalGeneration``, llava-hf checkpoints) and the bundled small model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

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
        attn = self.feature_attention()
        drop_cls = self.model.config.vision_feature_select_strategy == "default"

        def hook(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            sink(cls_attention(module, h, drop_cls))

        return [attn.register_forward_pre_hook(hook, with_kwargs=True)]

    def feature_attention(self) -> nn.Module:
        """The self-attention module of the CLIP-style encoder layer whose output the model projects
        (``config.vision_feature_layer``; the last of a list). Raises ValueError for a tower without
        encoder layers or a feature layer that is the embeddings."""
        tower = self.model.model.vision_tower
        body = getattr(tower, "vision_model", tower)  # CLIPVisionModel in transformers v5 has no vision_model
        layers = getattr(getattr(body, "encoder", None), "layers", None)
        if layers is None:
            raise ValueError(f"no saliency for vision tower {type(tower).__name__}: it has no [CLS] encoder layers")
        return layers[feature_block(self.model.config.vision_feature_layer, len(layers))].self_attn

    def _selected(self, out) -> torch.Tensor:
        layer = self.model.config.vision_feature_layer
        return out.hidden_states[layer if isinstance(layer, int) else layer[-1]]


def feature_block(feature_layer: int | list[int], n_blocks: int) -> int:
    """Index of the encoder block whose output is ``hidden_states[feature_layer]`` (``hidden_states[0]`` is
    the embeddings, ``hidden_states[i]`` block i - 1's output; a list means its last entry), for a tower of
    ``n_blocks`` blocks. Raises ValueError when that is the embeddings or out of range."""
    layer = feature_layer if isinstance(feature_layer, int) else feature_layer[-1]
    block = (layer if layer >= 0 else n_blocks + 1 + layer) - 1
    if not 0 <= block < n_blocks:
        raise ValueError(f"no saliency for vision_feature_layer={feature_layer!r}: it names no encoder block's output "
                         f"(the tower has {n_blocks} blocks; hidden_states[0] is the embeddings)")
    return block


def _heads(attn, hidden: torch.Tensor, proj: str) -> torch.Tensor:
    """``proj`` (``"q"`` or ``"k"``) of a ViT attention block for ``hidden`` [n, T, D], with the block's
    own ``q_norm`` / ``k_norm`` when it has them (InternViT), as fp32 [n, heads, T, head_dim]."""
    x = getattr(attn, f"{proj}_proj")(hidden)
    norm = getattr(attn, f"{proj}_norm", None)
    if norm is not None:
        x = norm(x)
    n, t, _ = hidden.shape
    return x.view(n, t, attn.num_heads, -1).transpose(1, 2).float()


def cls_attention(attn, hidden: torch.Tensor, drop_cls: bool) -> torch.Tensor:
    """[CLS] query attention to every token of a CLIP-style attention block.

    Args:
        attn: the block's attention module (``q_proj``, ``k_proj``, ``num_heads``, ``scale``, and
            ``q_norm`` / ``k_norm`` applied after the projections when present).
        hidden: [n_images, 1 + N, D] the block's input (after its layer norm).
        drop_cls: drop the [CLS] column (LLaVA's "default" feature selection drops [CLS]).

    Returns:
        FloatTensor [n_images, N] (or [n_images, 1 + N]): softmax attention of [CLS], summed over heads.
    """
    q, k = _heads(attn, hidden[:, :1], "q"), _heads(attn, hidden, "k")
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)[:, :, 0, :].sum(1)
    return probs[:, 1:] if drop_cls else probs


def attention_received(attn, hidden: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Mean softmax attention each token receives in a ViT attention block without [CLS] (SigLIP).

    Args:
        attn: the block's attention module (as :func:`cls_attention`).
        hidden: [n_images, N, D] the block's input (after its layer norm).
        max_elements: fp32 attention probabilities held at once (images are taken in chunks of
            ``max_elements // (heads * N * N)``, at least one; the default bounds them at 64 MiB).

    Returns:
        FloatTensor [n_images, N]: ``1 / (H N) * sum_h sum_i A_h[i, p]`` for each token p (each image's
        values sum to 1).
    """
    n, t, _ = hidden.shape
    chunk = max(1, max_elements // (attn.num_heads * t * t))
    out = []
    for part in hidden.split(chunk):
        q, k = _heads(attn, part, "q"), _heads(attn, part, "k")
        out.append(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1).mean(1))
    return torch.cat(out)
