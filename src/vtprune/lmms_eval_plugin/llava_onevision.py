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

Videos pass through under every method, each one visual unit (a ``budget`` per video, ``keep_ratio`` of its
tokens: ``frames x pooled side^2 + 1``, the newline last). Both classes hand the processor each video's frames
read by the stock class's own ``load_video`` (decord, ``max_frames_num`` frames spread evenly over the clip,
first and last included; default 32): the simple class does it itself, the chat class through
:class:`VideoFrames`, and :class:`NoImages` lets its video-only requests through (see why there).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmms_eval.models.chat.llava_hf import LlavaHf as StockLlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as StockLlavaHfSimple

from vtprune.lmms_eval_plugin import LLAVA_ONEVISION_MODEL_ID
from vtprune.lmms_eval_plugin.llava_hf import llava_hf_loglikelihood
from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

MODEL_CLASS = "LlavaOnevisionForConditionalGeneration"


class _Part:
    """One part of a processor (its image or video processor), wrapped: its attributes are the part's (the
    processor reads its settings, ``valid_kwargs``, ...); subclasses change the call."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def __getattr__(self, name: str) -> Any:
        if name == "part" or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.part, name)


class NoImages(_Part):
    """A processor's image processor that answers an empty list of images with no pixels (an empty
    ``BatchFeature``), and calls the image processor otherwise.

    Why: lmms-eval's chat ``llava_hf`` hands the processor ``images=[]`` for a request without images (a video
    or text-only question), and transformers 5's OneVision image processors read ``images[0]`` first: an
    IndexError out of the stock generate loop ends the evaluation."""

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        if isinstance(images, list | tuple) and len(images) == 0:
            from transformers import BatchFeature

            return BatchFeature({})
        return self.part(images, **kwargs)


class VideoFrames(_Part):
    """A processor's video processor, fed frames read by ``read`` wherever it is given a video file's path;
    arrays and anything but a path pass through unchanged.

    Why: lmms-eval's chat ``llava_hf`` hands the processor a task's videos as the task gives them (file paths,
    from ``ChatMessages.extract_media``) and ignores its ``max_frames_num``. Given a path, transformers 5's
    ``LlavaOnevisionVideoProcessor`` decodes the file itself with torchcodec, else with torchvision's deprecated
    ``read_video`` (removed in torchvision 0.26); torchcodec is in neither lmms-eval's base install nor
    vtprune's ``lmms`` extra, so with a current torchvision the evaluation ends with an ImportError. Where it
    decodes, it keeps every frame (the processor's ``do_sample_frames`` is False): 196 tokens a frame on the 7B
    checkpoints, 350,000 for a minute at 30 fps, ten times their 32k context. The simple class reads each video
    with its ``load_video`` (decord, which its module imports) and hands over frames; with this as the
    processor's video processor the chat class does the same.

    Args:
        part: the processor's own video processor (called with the frames).
        read: path -> uint8 frames [frames, height, width, 3] (the stock class's ``load_video`` with its
            ``max_frames_num``).

    Calling it raises FileNotFoundError for a path that is not a file, else what the video processor raises.
    """

    def __init__(self, part: Any, read: Callable[[str], Any]) -> None:
        super().__init__(part)
        self.read = read

    def __call__(self, videos: Any, **kwargs: Any) -> Any:
        paths = (str, os.PathLike)
        items = [videos] if isinstance(videos, paths) else videos
        if not isinstance(items, list | tuple) or not any(isinstance(v, paths) for v in items):
            return self.part(videos, **kwargs)
        frames = []
        for video in items:
            if isinstance(video, paths):
                if not os.path.isfile(video):
                    raise FileNotFoundError(f"{LLAVA_ONEVISION_MODEL_ID}: video file not found: {os.fspath(video)}")
                video = self.read(os.fspath(video))
            frames.append(video)
        # sampled already (max_frames_num): a video processor set to sample frames would sample them again
        return self.part(frames, **{**kwargs, "do_sample_frames": False})


class _OnevisionOnly(VTPruneMixin):
    vtprune_model_id = LLAVA_ONEVISION_MODEL_ID
    if TYPE_CHECKING:  # attributes of the stock class this is combined with
        model: Any  # the loaded model
        _image_processor: Any  # its processor
        max_frames_num: int  # frames read per video
        load_video: Callable[[str, int], Any]  # path, frames -> uint8 frames [frames, height, width, 3] (decord)

    def vtprune_loglikelihood(self, requests) -> list:
        """:func:`~vtprune.lmms_eval_plugin.llava_hf.llava_hf_loglikelihood` (the stock loop fails on
        transformers 5)."""
        return llava_hf_loglikelihood(self, requests)

    def after_stock_init(self) -> None:
        """The processor's image processor wrapped in :class:`NoImages`, its video processor (where it has
        one) in :class:`VideoFrames` reading with the stock class's ``load_video`` and ``max_frames_num``: what
        the chat loop needs to pass a video through (the simple loop is unaffected: it hands over frames, and
        images only with images). Raises ValueError when the checkpoint is not a LLaVA-OneVision one (the stock
        loader took it)."""
        if type(self.model).__name__ != MODEL_CLASS:
            raise ValueError(f"{LLAVA_ONEVISION_MODEL_ID} runs LLaVA-OneVision checkpoints ({MODEL_CLASS}); this one "
                             f"loaded as {type(self.model).__name__}: use --model vtprune_llava_hf")
        processor = self._image_processor
        processor.image_processor = NoImages(processor.image_processor)
        if getattr(processor, "video_processor", None) is not None:
            processor.video_processor = VideoFrames(processor.video_processor,
                                                    lambda path: self.load_video(path, self.max_frames_num))


class VTPruneLlavaOnevision(_OnevisionOnly, StockLlavaHfChat):
    """lmms-eval's chat ``llava_hf`` (the default interface) on a LLaVA-OneVision checkpoint with a vtprune
    method attached. Arguments: see :class:`~vtprune.lmms_eval_plugin.mixin.VTPruneMixin` and lmms-eval's
    ``LlavaHf`` (``pretrained``, ``device``, ``dtype``, ``attn_implementation``, ``batch_size`` = 1, ...)."""


class VTPruneLlavaOnevisionSimple(_OnevisionOnly, StockLlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` (``--force_simple``) on a LLaVA-OneVision checkpoint with a vtprune
    method attached."""


__all__ = ["VTPruneLlavaOnevision", "VTPruneLlavaOnevisionSimple", "NoImages", "VideoFrames"]
