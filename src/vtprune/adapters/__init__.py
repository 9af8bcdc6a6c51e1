"""Model adapters (one module per family). Importing this package registers them."""

from vtprune.adapters import gemma3, internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
from vtprune.adapters.base import Adapter, PatchGrid, adapter_for, visual_spans

__all__ = ["Adapter", "PatchGrid", "adapter_for", "visual_spans"]
