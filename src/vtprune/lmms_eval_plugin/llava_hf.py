"""``vtprune_llava_hf``: lmms-eval's stock ``llava_hf`` model classes with a vtprune method attached.

:class:`VTPruneLlavaHf` subclasses ``lmms_eval.models.chat.llava_hf.LlavaHf`` (what ``--model llava_hf``
resolves to by default) and :class:`VTPruneLlavaHfSimple` the simple one (``--force_simple``); both take
``method`` and the method's options in ``--model_args`` (:class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin`).
The stock class loads the checkpoint (``AutoConfig`` -> ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration``, ``AutoProcessor``), builds the prompts and runs the generate loop.

``pretrained=vtprune-default`` (also ``default`` or ``vtprune/smol-efficientnet-llava``) is the bundled
offline model (:func:`vtprune.models.load_default`): it is built once into its cache directory with
``save_pretrained`` and the stock loader then reads that directory like any local checkpoint.

``loglikelihood`` (lmms-eval's ``loglikelihood`` / ``multiple_choice`` tasks; lmms-eval runs them with the
simple class only, ``--force_simple``: its chat classes build messages for generation only) runs
:func:`llava_hf_loglikelihood`, the stock loop mended for transformers 5, under the method. It needs the
chat interface (its image token is ``<empty_output>`` and its prompt a few-shot template), so the simple
class refuses it.
"""

from __future__ import annotations

import math
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


def llava_hf_loglikelihood(lm: Any, requests: list) -> list[tuple[float, bool]]:
    """lmms-eval 0.7.3's ``llava_hf`` ``loglikelihood`` loop (simple class; the chat one inherits it) mended to
    run on transformers 5 and to score what it means to score. ``lm`` is the lmms-eval model object.

    Per request, as the stock loop: the prompt is ``<image>`` per image, a newline and the context, as the
    user turn of the chat template (the tokenizer's, or ``chat_template``, or lmms-eval's Vicuna template),
    the continuation as the assistant turn; one forward call with ``labels`` = the prompt-and-continuation
    tokens after the prompt. Mended (the stock lines in parentheses):

    * the prompt's length is counted on the prompt processed with its images, i.e. with each ``<image>``
      expanded to the image's tokens (stock: the prompt without images, which transformers 5's processors
      refuse, ``ValueError: Found 1 <image> tokens in the text but no images were passed``; transformers 4's
      left ``<image>`` unexpanded, so the labels also covered most of the image tokens and the context);
    * ``is_greedy`` compares the continuation with the argmax of the logits that predict it, one position
      earlier (stock: the logits at the continuation's own positions).

    Returns:
        Per request ``(loss, is_greedy)``: the mean negative log-likelihood (nats per token) of the
        continuation's tokens given the prompt and images, the value these lmms-eval classes return as the
        "log-likelihood" (its ``multiple_choice`` scoring takes the argmin for them), and whether greedy
        decoding gives every continuation token.

    Raises:
        ValueError: a request's loss is not finite (under pruning: the continuation's first token follows
            a visual token the method pruned, whose output does not exist, see :mod:`vtprune.engine.outputs`).
    """
    import torch
    from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE

    results = []
    for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
        doc = lm.task_dict[task][split][doc_id]
        continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
        visuals = lm.flatten([doc_to_visual(doc)])
        user = f"{' '.join([DEFAULT_IMAGE_TOKEN] * len(visuals))}\n{context}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": continuation}]
        if lm.chat_template is not None:
            lm.tokenizer.chat_template = lm.chat_template
        elif lm.tokenizer.chat_template is None:
            lm.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        prompt = lm.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        inputs = lm._image_processor(text=[whole], images=visuals, return_tensors="pt").to(lm._device, lm.model.dtype)
        n_prompt = lm._image_processor(text=[prompt], images=visuals, return_tensors="pt")["input_ids"].shape[1]
        ids = inputs["input_ids"]
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.inference_mode():
            out = lm.model(**inputs, labels=labels)
        loss = float(out["loss"].item())
        if not math.isfinite(loss):
            raise ValueError(f"{lm.vtprune_model_id}: the log-likelihood of request {doc_id} of task {task!r} is "
                             f"{loss} under method {lm.vtprune_method!r}: the logits that predict its continuation "
                             "include a position without an output (a visual token the method pruned, when the "
                             "prompt ends with an image)")
        greedy = out["logits"][:, n_prompt - 1:-1].argmax(dim=-1)
        results.append((loss, bool((greedy == ids[:, n_prompt:]).all())))
    return results


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

    def vtprune_loglikelihood(self, requests) -> list:
        """:func:`llava_hf_loglikelihood` (the stock loop fails on transformers 5)."""
        return llava_hf_loglikelihood(self, requests)

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


__all__ = ["VTPruneLlavaHf", "VTPruneLlavaHfSimple", "bundled_checkpoint", "is_bundled", "llava_hf_loglikelihood",
           "BUNDLED_NAMES"]
