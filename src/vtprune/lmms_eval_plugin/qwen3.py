"""``vtprune_qwen3_vl``: lmms-eval's stock Qwen3-VL model classes with a vtprune method attached
(:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).

* :class:`VTPruneQwen3VL` subclasses the chat ``lmms_eval.models.chat.qwen3_vl.Qwen3_VL`` (the default
  interface) and :class:`VTPruneQwen3VLSimple` the simple ``lmms_eval.models.simple.qwen3_vl.Qwen3_VL``
  (``--force_simple``).

The stock classes load the checkpoint (``Qwen3VLForConditionalGeneration`` in bfloat16, picked from the
config's ``model_type``; a checkpoint whose name reads ``A<n>B`` loads the MoE class, which vtprune does not
support: TypeError), the processor (``AutoProcessor`` with the ``min_pixels`` / ``max_pixels`` model args),
build the prompts with ``qwen_vl_utils.process_vision_info`` (32 px resize factor) and run the generate loop.
Requirements beyond the ``lmms`` extra: ``qwen-vl-utils`` and ``decord`` (imported by the stock module), and
torchvision, which transformers 5 needs to build a Qwen3-VL processor (its video processor).

``device_map``: when not given, the stock default (``auto``) is replaced by the ``device`` (single process),
so that ``device=cpu`` works and the model sits on one device.

Videos pass through as in :mod:`vtprune.lmms_eval_plugin.qwen` (one visual unit per video, all its timestamped
temporal patches together).
"""

from __future__ import annotations

from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as StockQwen3VLChat
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as StockQwen3VLSimple

from vtprune.lmms_eval_plugin import QWEN3_VL_MODEL_ID
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin


class VTPruneQwen3VL(VTPruneMixin, StockQwen3VLChat):
    """lmms-eval's chat ``qwen3_vl`` (the default interface) with a vtprune method attached. Arguments: see
    :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's ``Qwen3_VL`` (``pretrained``,
    ``device``, ``attn_implementation``, ``max_pixels``, ``min_pixels``, ``system_prompt``, ...)."""

    vtprune_model_id = QWEN3_VL_MODEL_ID


class VTPruneQwen3VLSimple(VTPruneMixin, StockQwen3VLSimple):
    """lmms-eval's simple ``qwen3_vl`` (``--force_simple``) with a vtprune method attached."""

    vtprune_model_id = QWEN3_VL_MODEL_ID


__all__ = ["VTPruneQwen3VL", "VTPruneQwen3VLSimple"]
