"""``vtprune_internvl``: lmms-eval's stock InternVL model class with a vtprune method attached
(:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).

:class:`VTPruneInternVL` subclasses the chat ``lmms_eval.models.chat.internvl_hf.InternVLHf`` (``--model
internvl_hf``), which loads the checkpoint as transformers' ``InternVLForConditionalGeneration`` (always in
bfloat16) with ``AutoProcessor`` (``min_patches`` / ``max_patches`` model args: tiles per image), builds
the prompt with the processor's chat template and calls ``self.model.generate``: ``OpenGVLab/InternVL3-*-hf``
and ``OpenGVLab/InternVL3_5-*-HF`` checkpoints. lmms-eval's simple ``internvl3`` / ``internvl3_5`` classes
are not used: they load OpenGVLab's remote code (``AutoModel`` with ``trust_remote_code``, not the stock
class) and answer through its own ``model.chat``, which vtprune does not schedule. So the id has a chat class
only (lmms-eval resolves it with or without ``--force_simple``).

``device_map``: when not given, the stock default (``auto``) is replaced by the ``device`` (single process),
so that ``device=cpu`` works and the model sits on one device.
"""

from __future__ import annotations

from lmms_eval.models.chat.internvl_hf import InternVLHf as StockInternVLChat

from vtprune.lmms_eval_plugin import INTERNVL_MODEL_ID
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin


class VTPruneInternVL(VTPruneMixin, StockInternVLChat):
    """lmms-eval's chat ``internvl_hf`` with a vtprune method attached around ``generate_until``. Arguments:
    see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's ``InternVLHf`` (``pretrained``,
    ``device``, ``attn_implementation``, ``min_patches``, ``max_patches``, ...)."""

    vtprune_model_id = INTERNVL_MODEL_ID


__all__ = ["VTPruneInternVL"]
