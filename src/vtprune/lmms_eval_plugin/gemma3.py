"""``vtprune_gemma3``: lmms-eval's stock Gemma 3 model class with a vtprune method attached
(:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).

:class:`VTPruneGemma3` subclasses ``lmms_eval.models.simple.gemma3.Gemma3`` (lmms-eval 0.7 has no chat class
for Gemma 3: ``--model vtprune_gemma3`` resolves to it with or without ``--force_simple``). The stock class
loads the checkpoint (``Gemma3ForConditionalGeneration`` in bfloat16), the tokenizer and processor
(``AutoProcessor``), builds the prompts with the processor's chat template (images as JPEG data URLs) and
runs the generate loop; its prompts carry ``token_type_ids``, so the image tokens attend to each other
bidirectionally as in the stock model, also after pruning (:mod:`vtprune.adapters.gemma3`).

``device_map``: when not given, the stock default (``auto``) is replaced by the ``device`` (single process),
so that ``device=cpu`` works and the model sits on one device.
"""

from __future__ import annotations

from lmms_eval.models.simple.gemma3 import Gemma3 as StockGemma3Simple

from vtprune.lmms_eval_plugin import GEMMA3_MODEL_ID
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin


class VTPruneGemma3(VTPruneMixin, StockGemma3Simple):
    """lmms-eval's (simple) ``gemma3`` with a vtprune method attached around ``generate_until``. Arguments:
    see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's ``Gemma3`` (``pretrained``,
    ``device``, ``attn_implementation``, ``system_prompt``, ...)."""

    vtprune_model_id = GEMMA3_MODEL_ID


__all__ = ["VTPruneGemma3"]
