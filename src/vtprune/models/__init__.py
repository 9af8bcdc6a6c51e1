"""Bundled real-weight model for vtprune: EfficientNet-Lite0 + MLP projector + SmolLM2-135M, as a stock
``transformers.LlavaForConditionalGeneration``.  See :mod:`vtprune.models.default`."""

from .default import DEFAULT_MODEL_ID, IMAGE_TOKEN, NUM_IMAGE_TOKENS, load_default
from .efficientnet_tower import (
    EfficientNetLiteTower,
    EfficientNetLiteTowerConfig,
    class_activation_saliency,
)

__all__ = [
    "DEFAULT_MODEL_ID",
    "IMAGE_TOKEN",
    "NUM_IMAGE_TOKENS",
    "EfficientNetLiteTower",
    "EfficientNetLiteTowerConfig",
    "class_activation_saliency",
    "load_default",
]
