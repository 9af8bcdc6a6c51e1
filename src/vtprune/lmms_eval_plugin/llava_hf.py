"""``vtprune_llava_hf``: lmms-eval's stock ``llava_hf`` model classes with a vtprune method attached.

:class:`VTPruneLlavaHf` subclasses ``lmms_eval.models.chat.llava_hf.LlavaHf`` (what ``--model llava_hf``
resolves to by default) and :class:`VTPruneLlavaHfSimple` the simple one (``--force_simple``); both take
``method`` and the method's options in ``--model_args`` (:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).
The stock class loads the checkpoint (``AutoConfig`` -> ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration``, ``AutoProcessor``), builds the prompts and runs the generate loop.

``pretrained=vtprune-default`` (also ``default`` or ``vtprune/smol-efficientnet-llava``) is the bundled
offline model (:func:`vtprune.models.load_default`): it is built once into its cache directory with
``save_pretrained`` and the stock loader then reads that directory like any local checkpoint. It needs the
chat interface (its image token is ``<empty_output>`` and its prompt a few-shot template), so the simple
class refuses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmms_eval.models.chat.llava_hf import LlavaHf as StockLlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as StockLlavaHfSimple

from vtprune.lmms_eval_plugin import MODEL_ID
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

BUNDLED_NAMES = ("vtprune-default", "default", "vtprune/smol-efficientnet-llava")


def is_bundled(pretrained: Any) -> bool:
    """Whether ``pretrained`` names the bundled model (one of :data:`BUNDLED_NAMES`)."""
    return isinstance(pretrained, str) and pretrained in BUNDLED_NAMES


def bundled_checkpoint() -> str:
    """Directory of the bundled model as a ``save_pretrained`` checkpoint (model + processor).

    The directory is :func:`vtprune.models.load_default`'s cache (``$VTPRUNE_CACHE``, default
    ``~/.cache/vtprune/default-<hash>``); the first call builds it (about 30 s on 2 CPU cores). Importing
    :mod:`vtprune.models` registers the EfficientNet tower with ``AutoConfig`` / ``AutoModel`` so that the
    stock loader can read the checkpoint.

    Raises:
        ImportError: a weight package of the bundled model is missing (the message names it).
        OSError: the cache directory could not be written (set ``VTPRUNE_CACHE`` to a writable folder).
    """
    from vtprune.models import default

    directory = default.default_cache_dir()
    if not default.is_saved_checkpoint(directory):
        default.load_default()
    if not default.is_saved_checkpoint(directory):
        raise OSError(f"the bundled model could not be saved under {default.cache_root()}; "
                      "set VTPRUNE_CACHE to a writable directory")
    return str(directory)


class _LlavaHfVTPrune(VTPruneMixin):
    """The LLaVA-specific part shared by the chat and simple classes: the bundled model."""

    vtprune_model_id = MODEL_ID
    _is_chat = False
    if TYPE_CHECKING:
        _image_processor: Any  # the processor, an attribute of the stock lmms-eval class this is combined with

    def prepare_stock_args(self, stock: dict[str, Any]) -> dict[str, Any]:
        stock = super().prepare_stock_args(stock)
        self.vtprune_bundled = is_bundled(stock.get("pretrained"))
        if self.vtprune_bundled:
            if not self._is_chat:
                raise ValueError(f"{MODEL_ID}: pretrained={stock['pretrained']} (the bundled model) needs "
                                 "lmms-eval's chat interface; run without --force_simple")
            stock = {**stock, "pretrained": bundled_checkpoint()}
        return stock

    def after_stock_init(self) -> None:
        if self.vtprune_bundled:  # as load_default: its few-shot template, left padding
            from vtprune.models.default import CHAT_TEMPLATE

            self._image_processor.chat_template = CHAT_TEMPLATE
            self._image_processor.tokenizer.padding_side = "left"


class VTPruneLlavaHf(_LlavaHfVTPrune, StockLlavaHfChat):
    """lmms-eval's chat ``llava_hf`` (the default interface) with a vtprune method attached around
    ``generate_until``. Arguments: see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's
    ``LlavaHf`` (``pretrained``, ``device``, ``dtype``, ``attn_implementation``, ``batch_size`` = 1, ...)."""

    _is_chat = True


class VTPruneLlavaHfSimple(_LlavaHfVTPrune, StockLlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` (``--force_simple``) with a vtprune method attached; llava-hf
    checkpoints only (the bundled model is refused with a ValueError)."""


__all__ = ["VTPruneLlavaHf", "VTPruneLlavaHfSimple", "bundled_checkpoint", "is_bundled", "BUNDLED_NAMES"]
