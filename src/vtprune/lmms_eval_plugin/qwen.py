"""``vtprune_qwen2_vl`` and ``vtprune_qwen2_5_vl``: lmms-eval's stock Qwen2-VL / Qwen2.5-VL model classes
with a vtprune method attached (:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).

* :class:`VTPruneQwen2VL` subclasses ``lmms_eval.models.simple.qwen2_vl.Qwen2_VL`` (lmms-eval 0.7 has no
  chat class for Qwen2-VL: ``--model vtprune_qwen2_vl`` resolves to it with or without ``--force_simple``);
* :class:`VTPruneQwen2_5_VL` subclasses the chat ``lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL`` (the
  default interface) and :class:`VTPruneQwen2_5_VLSimple` the simple one (``--force_simple``).

The stock classes load the checkpoint (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``;
Qwen2.5-VL always in bfloat16), the processor (``AutoProcessor`` with the ``min_pixels`` / ``max_pixels``
model args), build the prompts with ``qwen_vl_utils.process_vision_info`` and run the generate loop.
Requirements beyond the ``lmms`` extra: ``pip install qwen-vl-utils`` (it imports torchvision), and
torchvision itself, which transformers 5 needs to load any Qwen2-VL processor (its video processor).

``device_map``: when not given, the stock default (``auto`` / ``cuda``) is replaced by the ``device``
(single process), so that ``device=cpu`` works and the model sits on one device.

Videos pass through: the stock classes read a task's video files (qwen-vl-utils, decord; ``max_num_frames`` /
``fps`` model args) and the processor lays them out; vtprune schedules each video as one visual unit (a
``budget`` per video, ``keep_ratio`` of its tokens) under every method, and each report says which units are
videos (``visual_kinds``, ``video_tokens_per_layer_prefill``).
"""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as StockQwen2_5_VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as StockQwen2_5_VLSimple
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as StockQwen2VLSimple

from vtprune.lmms_eval_plugin import QWEN2_5_VL_MODEL_ID, QWEN2_VL_MODEL_ID
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin


class VTPruneQwen2VL(VTPruneMixin, StockQwen2VLSimple):
    """lmms-eval's (simple) ``qwen2_vl`` with a vtprune method attached around ``generate_until``.
    Arguments: see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's ``Qwen2_VL``
    (``pretrained``, ``device``, ``max_pixels``, ``min_pixels``, ``system_prompt``, ...)."""

    vtprune_model_id = QWEN2_VL_MODEL_ID


class VTPruneQwen2_5_VL(VTPruneMixin, StockQwen2_5_VLChat):
    """lmms-eval's chat ``qwen2_5_vl`` (the default interface) with a vtprune method attached. Arguments:
    see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's ``Qwen2_5_VL``
    (``pretrained``, ``device``, ``attn_implementation``, ``max_pixels``, ``min_pixels``, ...)."""

    vtprune_model_id = QWEN2_5_VL_MODEL_ID


class VTPruneQwen2_5_VLSimple(VTPruneMixin, StockQwen2_5_VLSimple):
    """lmms-eval's simple ``qwen2_5_vl`` (``--force_simple``) with a vtprune method attached."""

    vtprune_model_id = QWEN2_5_VL_MODEL_ID


__all__ = ["VTPruneQwen2VL", "VTPruneQwen2_5_VL", "VTPruneQwen2_5_VLSimple"]
