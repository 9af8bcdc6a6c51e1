"""``vtprune_llava_onevision``: lmms-eval's stock ``llava_hf`` model classes on LLaVA-OneVision checkpoints,
with a vtprune method attached (:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).

lmms-eval's ``llava_hf`` (chat and simple) picks ``LlavaOnevisionForConditionalGeneration`` from a
checkpoint's ``model_type`` (``llava-hf/llava-onevision-*``), builds the prompt with the processor's chat
template (simple: the tokenizer's) and calls ``self.model.generate``, so ``vtprune_llava_hf`` runs OneVision
too; this id names the family and refuses other checkpoints. :class:`VTPruneLlavaOnevision` subclasses the
chat ``lmms_eval.models.chat.llava_hf.LlavaHf`` (the default interface) and
:class:`VTPruneLlavaOnevisionSimple` the simple one (``--force_simple``). lmms-eval's own
``llava_onevision`` class is not used: it loads the model with the ``llava`` package of the LLaVA-NeXT
repository (not transformers' stock class) and generates with its own code.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.models.chat.llava_hf import LlavaHf as StockLlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as StockLlavaHfSimple

from vtprune.lmms_eval_plugin import LLAVA_ONEVISION_MODEL_ID
from vtprune.lmms_eval_plugin.llava_hf import llava_hf_loglikelihood
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

MODEL_CLASS = "LlavaOnevisionForConditionalGeneration"


class _OnevisionOnly(VTPruneMixin):
    vtprune_model_id = LLAVA_ONEVISION_MODEL_ID
    model: Any  # the stock class's loaded model

    def vtprune_loglikelihood(self, requests) -> list:
        """:func:`~vtprune.lmms_eval_plugin.llava_hf.llava_hf_loglikelihood` (the stock loop fails on
        transformers 5)."""
        return llava_hf_loglikelihood(self, requests)

    def after_stock_init(self) -> None:
        """Raises ValueError when the checkpoint is not a LLaVA-OneVision one (the stock loader took it)."""
        if type(self.model).__name__ != MODEL_CLASS:
            raise ValueError(f"{LLAVA_ONEVISION_MODEL_ID} runs LLaVA-OneVision checkpoints ({MODEL_CLASS}); this one "
                             f"loaded as {type(self.model).__name__}: use --model vtprune_llava_hf")


class VTPruneLlavaOnevision(_OnevisionOnly, StockLlavaHfChat):
    """lmms-eval's chat ``llava_hf`` (the default interface) on a LLaVA-OneVision checkpoint with a vtprune
    method attached. Arguments: see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's
    ``LlavaHf`` (``pretrained``, ``device``, ``dtype``, ``attn_implementation``, ``batch_size`` = 1, ...)."""


class VTPruneLlavaOnevisionSimple(_OnevisionOnly, StockLlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` (``--force_simple``) on a LLaVA-OneVision checkpoint with a vtprune
    method attached."""


__all__ = ["VTPruneLlavaOnevision", "VTPruneLlavaOnevisionSimple"]
