"""The lmms-eval plugin on every family beside LLaVA-1.5 (``test_lmms_eval_plugin``), end to end through
lmms-eval's ``simple_evaluate`` on the local ``vtprune_pope_local`` task (the fixtures of
``test_lmms_eval_plugin``): each model id is registered over lmms-eval's stock classes, refuses an unknown
option before loading, loads a tiny checkpoint of its family with the stock class (and vtprune's adapter), and
prunes in an evaluation. One parametrised test per shape over :data:`FAMILIES` (what differs: the model id, the
checkpoint, the loaders, ParVTS's budget, the visual tokens of a photo). The checkpoints:

* LLaVA-NeXT: lmms-eval's stock ``llava_hf`` picks ``LlavaNextForConditionalGeneration`` from the
  checkpoint's ``model_type``, so ``vtprune_llava_hf`` covers it; a tiny random NeXT saved with a real
  ``LlavaNextProcessor`` (any-resolution tiles: the visual tokens per image follow the photo's size).
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``vtprune_qwen2_vl`` / ``vtprune_qwen2_5_vl`` / ``vtprune_qwen3_vl``
  (lmms-eval's stock Qwen classes) on tiny random models with a word-level tokenizer carrying Qwen's vision
  tokens and the PIL image processor, on photos and on a video task (``vtprune_video_local``: an 8-frame mp4
  written with PyAV, read by qwen-vl-utils with decord) under every method. Without torchvision (this CPU-only
  venv) test-only shims stand in (see :func:`qwen_env`): a stub module so that ``qwen_vl_utils`` imports, with
  a tensor ``resize`` for the video frames, and a processor loader that builds ``Qwen2VLProcessor`` /
  ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` with :class:`QwenVideoStandIn` (the real video processors'
  layout, from ``qwen_tiny.video_pixels``) as its video processor; the stock loading of the model, the prompts,
  ``process_vision_info`` and the generate loop run unchanged.
* Gemma 3: ``vtprune_gemma3`` (lmms-eval's stock ``gemma3``, a simple class only) on ``gemma3_tiny``'s tiny
  Gemma 3 saved with its real ``Gemma3Processor`` and a chat template; the stock class loads it unchanged
  (bfloat16).
* InternVL: ``vtprune_internvl`` (lmms-eval's chat ``internvl_hf``: stock ``InternVLForConditionalGeneration``,
  in bfloat16) on a tiny random InternVL saved with the parts of a real ``InternVLProcessor`` (word-level
  tokenizer with InternVL's image tokens and a chat template, the PIL tiling image processor).
* LLaVA-OneVision: ``vtprune_llava_onevision`` (lmms-eval's ``llava_hf``, chat and simple, which loads
  ``LlavaOnevisionForConditionalGeneration`` from the checkpoint's ``model_type``) on a tiny random OneVision
  saved the same way, on photos and on the video task under every method (the stock ``load_video`` reads the
  frames, decord; ``onevision_tiny.FrameProcessor`` stands in for the torchvision-based video processor).

transformers 5 cannot load the InternVL or OneVision processor without torchvision (their video processors
need it), so :class:`ProcessorFromParts` stands in for ``AutoProcessor`` in the lmms-eval modules that load
them: it builds the checkpoint's real processor class from its saved parts with no video processor.

Skipped only when lmms-eval (or, for the Qwen families, qwen-vl-utils) is not importable.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `lmms` extra)")

import test_lmms_eval_plugin as plugin_tests  # noqa: E402
from conftest import WORD_CHAT_TEMPLATE, processor_without_video, word_tokenizer  # noqa: E402

import vtprune  # noqa: E402
from vtprune.lmms_eval_plugin import (  # noqa: E402
    GEMMA3_MODEL_ID,
    INTERNVL_MODEL_ID,
    LLAVA_ONEVISION_MODEL_ID,
    MODEL_ID,
    MODEL_IDS,
    QWEN2_5_VL_MODEL_ID,
    QWEN2_VL_MODEL_ID,
    QWEN3_VL_MODEL_ID,
    manifests,
)
from vtprune.lmms_eval_tasks import POPE_LOCAL_TASK  # noqa: E402

env = plugin_tests.env  # the fixtures: working directory + entry point, task manager of the local task
task_manager = plugin_tests.task_manager
check_results, evaluate = plugin_tests.check_results, plugin_tests.evaluate

N = 2  # questions per evaluation


pytestmark = pytest.mark.usefixtures("one_thread")


def read_reports(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_pruned(results: dict, rows: list[dict], method: str, budget: int) -> None:
    """The metric is there, every request has a report, and the method pruned: the final budget is the
    one asked for and the equivalent budget (mean over layers) is below the visual tokens in."""
    t = check_results(results, N)
    assert all(s["resps"][0][0].strip() for s in results["samples"][POPE_LOCAL_TASK])
    assert len(rows) == N and {(r["method"], r["task"]) for r in rows} == {(method, POPE_LOCAL_TASK)}
    for r in rows:
        (sample,) = r["samples"]
        assert sample["final_budget"] == budget < sample["visual_tokens_in"]
        assert sample["equivalent_budget"] < sample["visual_tokens_in"]
        assert sample["flops"]["prefill"]["exact_ratio"] < 1.0
    assert t["avg_vtprune_requests"] == N and t["avg_vtprune_final_budget"] == budget
    assert t["avg_vtprune_equivalent_budget"] < t["avg_vtprune_visual_tokens_in"]


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    """``next_tiny.tiny_llava_next`` saved with its real ``LlavaNextProcessor`` (word-level tokenizer, 32 px
    tiles, pinpoints up to 64 x 64 px) plus a chat template, as a llava-hf NeXT repo."""
    from next_tiny import tiny_llava_next, tiny_processor

    path = tmp_path_factory.mktemp("tiny-llava-next")
    processor = tiny_processor()
    processor.chat_template = processor.tokenizer.chat_template = WORD_CHAT_TEMPLATE
    tiny_llava_next().save_pretrained(path)
    processor.save_pretrained(path)
    return path


QWEN_SPECIAL = {"<|image_pad|>": 250, "<|video_pad|>": 251, "<|vision_start|>": 252, "<|vision_end|>": 253}
# Qwen's layout: each image part is <|vision_start|> <|image_pad|> <|vision_end|>, each video part
# <|vision_start|><|video_pad|><|vision_end|> (the processor repeats the pad; Qwen3-VL's replaces the video's wrapper,
# written as Qwen's own template writes it, by per-frame timestamps and wrappers)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' or 'image' in c %}<|vision_start|> <|image_pad|> "
    "<|vision_end|> {% elif c['type'] == 'video' or 'video' in c %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}")


def qwen_tokenizer():
    return word_tokenizer(QWEN_SPECIAL, chat_template=QWEN_CHAT_TEMPLATE, extra_special_tokens={
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def qwen_checkpoint(path: Path, family: str, patch: int | None = None, **pixels) -> Path:
    """``qwen_tiny.tiny_qwen(family)`` (ViT patches of ``patch`` px, the tiny default when None) saved with the
    parts of a real ``Qwen2VLProcessor`` / ``Qwen3VLProcessor`` (word-level tokenizer with Qwen's vision tokens
    and a chat template, the PIL ``Qwen2VLImageProcessor`` with the same patches merged 2 x 2)."""
    from qwen_tiny import MERGE, PATCH, TEMPORAL, tiny_qwen
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = patch or PATCH
    tiny_qwen(family, layers=6, seed=5, patch=patch).save_pretrained(path)
    qwen_tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=TEMPORAL, merge_size=MERGE,
                             **pixels).save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    return qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2_vl"), "qwen2_vl", min_pixels=256, max_pixels=1024)


@pytest.fixture(scope="module")
def qwen2_5_vl_dir(tmp_path_factory):
    return qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), "qwen2_5_vl", min_pixels=256, max_pixels=1024)


@pytest.fixture(scope="module")
def qwen3_vl_dir(tmp_path_factory):
    """Qwen3-VL with its 16 px patches (a photo is then a few hundred tokens, not thousands)."""
    return qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-vl"), "qwen3_vl", patch=16)


GEMMA3_CHAT_TEMPLATE = WORD_CHAT_TEMPLATE.replace("<image>", "<start_of_image>")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    """``gemma3_tiny.tiny_gemma3`` (a 128-token window: lmms-eval's prompts are longer than the tests') saved
    with its real ``Gemma3Processor`` and a chat template, as a google/gemma-3 repo."""
    from gemma3_tiny import tiny_gemma3, tiny_processor

    path = tmp_path_factory.mktemp("tiny-gemma3")
    processor = tiny_processor()
    processor.chat_template = processor.tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    tiny_gemma3(window=128).save_pretrained(path)
    processor.save_pretrained(path)
    return path


INTERNVL_CHAT_TEMPLATE = WORD_CHAT_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")  # InternVL's image placeholder


def save_checkpoint(path: Path, model, processor, processor_args: dict) -> Path:
    """``model`` and the parts of ``processor`` (tokenizer, image processor, chat template, and its own
    arguments in ``processor_config.json``, as a hub checkpoint holds them) saved under ``path``."""
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(processor.chat_template)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": type(processor).__name__,
                                                            **processor_args}))
    return path


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    from internvl_tiny import P, tiny_internvl, tiny_processor

    return save_checkpoint(tmp_path_factory.mktemp("tiny-internvl"), tiny_internvl(seed=1),
                           tiny_processor(INTERNVL_CHAT_TEMPLATE), {"image_seq_length": P})


# LLaVA-OneVision's layout: <image> for each image part, <video> for each video part (the processor repeats them)
ONEVISION_CHAT_TEMPLATE = WORD_CHAT_TEMPLATE.replace("{% elif c['type'] == 'text' %}",
                                                     "{% elif c['type'] == 'video' %}<video> {% elif c['type'] == 'text' %}")


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    """``onevision_tiny.tiny_onevision`` saved with the parts of its real ``LlavaOnevisionProcessor`` (a chat
    template writing ``<image>`` / ``<video>`` for each image / video part) and the settings of its real
    ``LlavaOnevisionVideoProcessor`` (32 x 32 px frames, the tower's tile)."""
    from onevision_tiny import ASPECT, FrameProcessor, P, tiny_onevision, tiny_processor

    path = save_checkpoint(tmp_path_factory.mktemp("tiny-onevision"), tiny_onevision(seed=5),
                           tiny_processor(ONEVISION_CHAT_TEMPLATE),
                           {"num_image_tokens": P, "vision_feature_select_strategy": "full",
                            "vision_aspect_ratio": ASPECT})
    FrameProcessor().real.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------- loaders without torchvision
class QwenVideoStandIn:
    """Stand-in for the Qwen video processors (``Qwen2VLVideoProcessor``, ``Qwen3VLVideoProcessor``) where
    torchvision is missing: transformers 5's video processors are torchvision-based (their modules import
    ``torchvision.transforms.v2``) and this CPU-only venv has no torchvision (PyPI's torchvision wheels need a
    CUDA build of torch). It returns what the real one returns for the frames lmms-eval's Qwen classes hand over
    (already sampled and resized by qwen-vl-utils: float [T, C, H, W] in 0..255): ``pixel_values_videos`` in the
    real layout (:func:`qwen_tiny.video_pixels`: rescale, normalise, each temporal patch of 2 frames cut into
    ``patch_size`` px patches in merge-window order; a last frame repeated to fill a temporal patch, as the real
    one does), ``video_grid_thw`` and, with ``return_metadata``, each video's ``VideoMetadata`` (its fps and
    sampled frames: Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's timestamps come from it). It neither
    resizes nor samples frames: a frame side that is not a multiple of ``patch_size x merge_size`` raises."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, patch_size: int):
        from qwen_tiny import MERGE, TEMPORAL

        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, MERGE, TEMPORAL

    def __call__(self, videos, video_metadata=None, return_metadata=False, return_tensors=None, **kwargs):
        import numpy as np
        import torch
        from qwen_tiny import video_pixels
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        videos = [videos] if isinstance(videos, torch.Tensor) and videos.dim() == 4 else list(videos)
        arrays = []
        for video in videos:
            frames = torch.as_tensor(video).float().round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            if frames.shape[0] % self.temporal_patch_size:
                frames = torch.cat([frames, frames[-1:].expand(self.temporal_patch_size - 1, -1, -1, -1)])
            side = self.patch_size * self.merge_size
            if frames.shape[1] % side or frames.shape[2] % side:
                raise ValueError(f"frames of {tuple(frames.shape[1:3])} px: not multiples of {side} px")
            arrays.append(np.ascontiguousarray(frames.numpy()))
        out = video_pixels(arrays, patch=self.patch_size)
        if return_metadata:
            given = video_metadata if isinstance(video_metadata, list | tuple) else [video_metadata] * len(arrays)
            out["video_metadata"] = [
                VideoMetadata(**{k: v for k, v in dict(m).items() if k in VideoMetadata.__dataclass_fields__})
                if m is not None else VideoMetadata(total_num_frames=len(a), fps=2.0, frames_indices=list(range(len(a))))
                for m, a in zip(given, arrays, strict=True)]
        return BatchFeature(out, tensor_type=None)


class _QwenProcessorFromParts:
    """Stand-in for ``transformers.AutoProcessor`` in lmms-eval's Qwen modules where torchvision is missing:
    transformers 5 cannot build a Qwen2-VL / Qwen2.5-VL / Qwen3-VL processor (``processor_class``) without it (its
    video processor needs torchvision). Builds the real processor from the checkpoint's image processor, tokenizer
    and chat template, with :class:`QwenVideoStandIn` as its video processor."""

    processor_class = "Qwen2VLProcessor"

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None, **kwargs):
        import transformers
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.processing_utils import ProcessorMixin

        images = Qwen2VLImageProcessorPil.from_pretrained(path)
        images.min_pixels, images.max_pixels = min_pixels, max_pixels
        images.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        check = ProcessorMixin.check_argument_for_proper_class
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
                       lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
            return getattr(transformers, cls.processor_class)(
                image_processor=images, tokenizer=AutoTokenizer.from_pretrained(path),
                video_processor=QwenVideoStandIn(images.patch_size),
                chat_template=(Path(path) / "chat_template.jinja").read_text())


class _Qwen2_5ProcessorFromParts(_QwenProcessorFromParts):
    processor_class = "Qwen2_5_VLProcessor"


class _Qwen3ProcessorFromParts(_QwenProcessorFromParts):
    processor_class = "Qwen3VLProcessor"


def _resize(video, size, interpolation=None, antialias=True):
    """Stand-in for ``torchvision.transforms.functional.resize`` on a [T, C, H, W] tensor, which qwen-vl-utils
    calls on a video's frames: what torchvision does for tensors (bicubic ``interpolate``, ``align_corners``
    False, antialiased; a uint8 input rounded back to uint8)."""
    import torch

    out = torch.nn.functional.interpolate(video.float(), size=list(size), mode="bicubic", align_corners=False,
                                          antialias=antialias)
    return out.round().clamp(0, 255).to(video.dtype) if video.dtype == torch.uint8 else out


@pytest.fixture(scope="module")
def qwen_env(env):
    """lmms-eval's Qwen modules importable and able to load the tiny checkpoints offline on CPU. Where
    torchvision is not installed (this CPU-only venv: PyPI's torchvision wheels are CUDA builds): a stub
    ``torchvision`` module while ``qwen_vl_utils`` is first imported (it imports torchvision at the top but
    uses it for videos only, to resize their frames (:func:`_resize`); images go through PIL; frames are read
    with decord), and :class:`_QwenProcessorFromParts`."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("qwen-vl-utils is not installed (pip install qwen-vl-utils)")
    torchvision = _has_torchvision()
    with pytest.MonkeyPatch.context() as mp:
        if not torchvision:
            stub = types.ModuleType("torchvision")
            stub.__version__ = "0.0"
            stub.io = types.ModuleType("torchvision.io")
            stub.transforms = types.ModuleType("torchvision.transforms")
            stub.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
            stub.transforms.functional = types.SimpleNamespace(resize=_resize)
            with pytest.MonkeyPatch.context() as only_for_the_import:
                for name, module in (("torchvision", stub), ("torchvision.io", stub.io),
                                     ("torchvision.transforms", stub.transforms)):
                    only_for_the_import.setitem(sys.modules, name, module)
                import qwen_vl_utils  # the real one, imported under the stub
        else:
            import qwen_vl_utils
        import lmms_eval.models.chat.qwen2_5_vl as chat25
        import lmms_eval.models.simple.qwen2_5_vl as simple25
        import lmms_eval.models.simple.qwen2_vl as simple2

        for module in (chat25, simple25, simple2):
            # lmms-eval resolved its optional import when first imported (maybe before the stub)
            mp.setattr(module, "process_vision_info", qwen_vl_utils.process_vision_info)
            if not torchvision and module is not chat25:
                mp.setattr(module, "AutoProcessor", _Qwen2_5ProcessorFromParts if module is simple25
                           else _QwenProcessorFromParts)
        yield env


@pytest.fixture(scope="module")
def qwen3_env(qwen_env):
    """``qwen_env`` plus lmms-eval's Qwen3-VL modules: their ``process_vision_info`` and, without
    torchvision, the processor loader."""
    import lmms_eval.models.chat.qwen3_vl as chat
    import lmms_eval.models.simple.qwen3_vl as simple
    import qwen_vl_utils

    with pytest.MonkeyPatch.context() as mp:
        for module in (chat, simple):
            mp.setattr(module, "process_vision_info", qwen_vl_utils.process_vision_info)
        if not _has_torchvision():
            mp.setattr(simple, "AutoProcessor", _Qwen3ProcessorFromParts)
        yield qwen_env


def _has_torchvision() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):  # a module without __spec__ in sys.modules
        return False


class ProcessorFromParts:
    """Stand-in for ``transformers.AutoProcessor`` where torchvision is missing: the checkpoint's processor
    class (``processor_class`` of its ``processor_config.json``), built from its saved image processor,
    tokenizer, chat template and arguments with no video processor (:func:`conftest.processor_without_video`),
    or with ``video_processor()`` as its video processor when given (a stand-in for the real one)."""

    def __init__(self, image_processor_class, video_processor=None):
        self.image_processor_class, self.video_processor = image_processor_class, video_processor

    def from_pretrained(self, path, **kwargs):
        import transformers

        args = json.loads((Path(path) / "processor_config.json").read_text())
        if "image_processor" in args:  # a processor saved whole (no video processor to miss): the real loader
            return transformers.AutoProcessor.from_pretrained(path, **kwargs)
        cls = getattr(transformers, args.pop("processor_class"))
        processor = processor_without_video(cls, image_processor=self.image_processor_class.from_pretrained(path),
                                            tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                            chat_template=(Path(path) / "chat_template.jinja").read_text(), **args)
        if self.video_processor is not None:
            processor.video_processor = self.video_processor()
        return processor


@pytest.fixture(scope="module")
def loaders(env):
    """lmms-eval's InternVL and llava_hf modules loading the tiny processors offline (see the module docstring);
    OneVision's with ``onevision_tiny.FrameProcessor`` as its video processor: what the real
    ``LlavaOnevisionVideoProcessor`` does to frames (resize to its 32 x 32 px, rescale, normalise), which
    needs torchvision. It takes frames only: lmms-eval's simple ``llava_hf`` reads a video's frames itself and
    vtprune's chat class has the stock reader read them (``VideoFrames``); a video file's path raises, as the
    real one does without torchcodec, so a path that got through would fail the test."""
    import lmms_eval.models.chat.internvl_hf as internvl_hf
    import lmms_eval.models.simple.llava_hf as llava_hf
    from onevision_tiny import FrameProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    with pytest.MonkeyPatch.context() as mp:
        if not _has_torchvision():
            mp.setattr(internvl_hf, "AutoProcessor", ProcessorFromParts(GotOcr2ImageProcessorPil))
            mp.setattr(llava_hf, "AutoProcessor", ProcessorFromParts(LlavaOnevisionImageProcessorPil, FrameProcessor))
        yield env


# ---------------------------------------------------------------------------------------- the families
@dataclasses.dataclass(frozen=True)
class Family:
    """One family under the plugin: its ``model_id``; the fixtures of its lmms-eval modules' loaders
    (``loader``) and of its checkpoint (``checkpoint``); the stock classes (lmms-eval's chat and simple class
    the plugin's derive from, None where lmms-eval has none; the model class, the lm attribute holding the
    processor and its class, vtprune's adapter as ``module.Class``), where vtprune's mixin sits in the plugin
    class's MRO (``mixin``: OneVision's classes derive from the llava_hf ones) and the ``device_map`` the
    stock class ends up with; the option
    named in the refusal of an unknown one (None: not checked); its evaluation: extra ``model_args``,
    ParVTS's budget, ``force_simple`` values, the visual tokens of a photo (``tokens(n, simple)``); the
    ``force_simple`` values the loading is checked with, and the method and budget it loads with."""

    model_id: str
    loader: str
    checkpoint: str
    stock: tuple[str | None, str | None]
    model_class: str
    processor: tuple[str, str]
    adapter: str
    device_map: str | None
    accepted: str | None
    budget: int
    tokens: Callable[[int, bool], bool]
    args: str = ""
    backends: tuple[bool, ...] = (False, True)
    loads: tuple[bool, ...] = (False,)
    load_method: tuple[str, int] = ("parvts", 8)
    mixin: int = 1


# a 640 x 480 photo -> 28 x 56 px (qwen_vl_utils, 28 px factor) -> 32 x 56 px (the processor, 8 px): 28 tokens
QWEN_PIXELS = "min_pixels=256,max_pixels=3136"
# Qwen3-VL, 32 px per merged token: the simple class resizes it within max_pixels (qwen_vl_utils) to 96 x 128 px,
# 3 x 4 tokens; the chat class passes no pixel limits per image (stock): 480 x 640 px, 15 x 20 tokens
QWEN3_PIXELS = "min_pixels=1024,max_pixels=16384"
QWEN3_TOKENS = {True: 12, False: 300}

FAMILIES = {
    # any-resolution: a COCO photo is 2 x 2 tiles (64 x 64 px pinpoint) with its unpadded grid, > 16 tokens
    "llava_next": Family(MODEL_ID, "env", "next_dir", ("lmms_eval.models.chat.llava_hf.LlavaHf", "lmms_eval.models.simple.llava_hf.LlavaHf"),
                         "LlavaNextForConditionalGeneration", ("_image_processor", "LlavaNextProcessor"),
                         "llava_next.LlavaNextAdapter", None, None, 8, lambda n, simple: n > 16, loads=(False, True)),
    "qwen2_vl": Family(QWEN2_VL_MODEL_ID, "qwen_env", "qwen2_vl_dir", (None, "lmms_eval.models.simple.qwen2_vl.Qwen2_VL"),
                       "Qwen2VLForConditionalGeneration", ("processor", "Qwen2VLProcessor"), "qwen2_vl.Qwen2VLAdapter",
                       "cpu", "max_pixels", 4, lambda n, simple: n >= 16, args=QWEN_PIXELS),
    "qwen2_5_vl": Family(QWEN2_5_VL_MODEL_ID, "qwen_env", "qwen2_5_vl_dir",
                         ("lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL"),
                         "Qwen2_5_VLForConditionalGeneration", ("processor", "Qwen2_5_VLProcessor"),
                         "qwen2_vl.Qwen2VLAdapter", "cpu", "max_pixels", 4, lambda n, simple: n >= 16, args=QWEN_PIXELS),
    "qwen3_vl": Family(QWEN3_VL_MODEL_ID, "qwen3_env", "qwen3_vl_dir",
                       ("lmms_eval.models.chat.qwen3_vl.Qwen3_VL", "lmms_eval.models.simple.qwen3_vl.Qwen3_VL"),
                       "Qwen3VLForConditionalGeneration", ("processor", "Qwen3VLProcessor"), "qwen3_vl.Qwen3VLAdapter",
                       "cpu", "system_prompt", 4, lambda n, simple: n == QWEN3_TOKENS[simple], args=QWEN3_PIXELS,
                       load_method=("fastv", 4)),
    # the fixed 16 tokens per image
    "gemma3": Family(GEMMA3_MODEL_ID, "env", "gemma3_dir", (None, "lmms_eval.models.simple.gemma3.Gemma3"),
                     "Gemma3ForConditionalGeneration", ("processor", "Gemma3Processor"), "gemma3.Gemma3Adapter", "cpu",
                     "system_prompt", 4, lambda n, simple: n == 16, backends=(False,), load_method=("fastv", 4)),
    # a 4:3 COCO photo: 2 x 2 tiles (the closest aspect of at most 4) + thumbnail, 16 tokens each
    "internvl": Family(INTERNVL_MODEL_ID, "loaders", "internvl_dir", ("lmms_eval.models.chat.internvl_hf.InternVLHf", None),
                       "InternVLForConditionalGeneration", ("processor", "InternVLProcessor"),
                       "internvl.InternVLAdapter", "cpu", None, 8, lambda n, simple: n == 5 * 16, args="max_patches=4",
                       backends=(False,)),
    # a COCO photo: base tile + its unpadded grid (downsampled by anyres_max_2) with newlines
    "llava_onevision": Family(LLAVA_ONEVISION_MODEL_ID, "loaders", "onevision_dir",
                              ("lmms_eval.models.chat.llava_hf.LlavaHf", "lmms_eval.models.simple.llava_hf.LlavaHf"),
                              "LlavaOnevisionForConditionalGeneration", ("_image_processor", "LlavaOnevisionProcessor"),
                              "llava_onevision.LlavaOnevisionAdapter", None, None, 8, lambda n, simple: n > 16,
                              mixin=2),
}
PLUGIN_FAMILIES = [f for f in FAMILIES if f != "llava_next"]  # llava_next runs under vtprune_llava_hf


def is_simple(family: Family, force_simple: bool) -> bool:
    """Whether lmms-eval picks the simple class (``force_simple`` and there is one, or there is no chat class)."""
    chat, simple = family.stock
    return (force_simple and simple is not None) or chat is None


@pytest.mark.parametrize("name", PLUGIN_FAMILIES)
def test_registered(env, name):
    from lmms_eval.models import get_model, get_model_manifest

    from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

    family = FAMILIES[name]
    assert {m.model_id for m in manifests()} == set(MODEL_IDS) >= {f.model_id for f in FAMILIES.values()}
    assert [m.model_id for m in manifests()].count(family.model_id) == 1
    for manifest in manifests():
        assert get_model_manifest(manifest.model_id) == manifest
    manifest = get_model_manifest(family.model_id)
    assert (manifest.chat_class_path is None) == (family.stock[0] is None)  # lmms-eval has no chat class
    assert (manifest.simple_class_path is None) == (family.stock[1] is None)  # or its simple ones are remote code
    for force_simple in (True, False):
        cls = get_model(family.model_id, force_simple=force_simple)
        simple = is_simple(family, force_simple)
        assert cls.vtprune_model_id == family.model_id and cls.is_simple == simple
        assert VTPruneMixin in cls.__mro__ and cls.__mro__.index(VTPruneMixin) == family.mixin
        module, stock = family.stock[simple].rsplit(".", 1)
        assert cls.__mro__[family.mixin + 1] is getattr(importlib.import_module(module), stock)  # the stock class, next
        assert not [name for name, value in vars(cls).items() if callable(value)]  # nothing copied


@pytest.mark.parametrize("name", PLUGIN_FAMILIES)
def test_bad_option_fails_before_loading(env, name):
    from lmms_eval.models import get_model

    family = FAMILIES[name]
    accepted = "" if family.accepted is None else f".*'{family.accepted}'"
    with pytest.raises(TypeError, match=rf"{family.model_id}: method 'parvts' has no option\(s\) \['nope'\]{accepted}"):
        get_model(family.model_id).create_from_arg_string("pretrained=/no/such/checkpoint,method=parvts,budget=4,nope=1",
                                                          {"device": "cpu"})


@pytest.mark.parametrize("name,force_simple", [pytest.param(f, s, id=f"{f}-{'simple' if s else 'chat'}")
                                               for f, family in FAMILIES.items() for s in family.loads])
def test_stock_class_loads_the_checkpoint(request, name, force_simple):
    import transformers
    from lmms_eval.models import get_model

    from vtprune.adapters import adapter_for

    family = FAMILIES[name]
    request.getfixturevalue(family.loader)
    path = request.getfixturevalue(family.checkpoint)
    method, budget = family.load_method
    lm = get_model(family.model_id, force_simple=force_simple).create_from_arg_string(
        f"pretrained={path},method={method},budget={budget}", {"device": "cpu"})
    assert type(lm.model) is getattr(transformers, family.model_class)  # the stock loader's pick
    attribute, processor = family.processor
    assert type(getattr(lm, attribute)) is getattr(transformers, processor)
    module, adapter = family.adapter.rsplit(".", 1)
    assert isinstance(adapter_for(lm.model), getattr(importlib.import_module(f"vtprune.adapters.{module}"), adapter))
    assert lm.vtprune_method == method and lm.vtprune_options == {"budget": budget}
    assert lm.device_map == family.device_map  # "auto" (which moves inputs to cuda) replaced by the device


@pytest.mark.parametrize("name,force_simple", [pytest.param(f, s, id=f"{f}-{'simple' if s else 'chat'}")
                                               for f, family in FAMILIES.items() for s in family.backends])
def test_parvts_in_an_evaluation(request, task_manager, name, force_simple):
    family = FAMILIES[name]
    work = request.getfixturevalue(family.loader)
    path = request.getfixturevalue(family.checkpoint)
    report = work / f"{name}-{force_simple}.jsonl"
    args = f"{family.args}," if family.args else ""
    budget = family.budget
    results = evaluate(task_manager, f"pretrained={path},{args}method=parvts,budget={budget},discard_layer=2,"
                                     f"vtprune_report={report}", model=family.model_id, limit=N,
                       force_simple=force_simple, gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", budget)
    simple = is_simple(family, force_simple)
    assert results["config"]["model_backend"].endswith("(simple)" if simple else "(chat)")
    assert results["config"]["model"] == family.model_id
    for r in rows:  # ParVTS: layers 0-1 see every visual token of the photo, layers 2-5 the subjects
        sample = r["samples"][0]
        n = sample["visual_tokens_in"]
        assert family.tokens(n, force_simple)
        assert sample["visual_tokens_per_layer_prefill"] == [n, n] + [budget] * 4
        assert sample["equivalent_budget"] == pytest.approx((2 * n + 4 * budget) / 6)


def test_llava_onevision_id_refuses_other_checkpoints(env, tmp_path):
    from lmms_eval.models import get_model

    llava_dir = plugin_tests.tiny_checkpoint(tmp_path / "tiny-llava")  # a LLaVA-1.5 checkpoint
    with pytest.raises(ValueError, match=rf"{LLAVA_ONEVISION_MODEL_ID} runs LLaVA-OneVision .* use --model {MODEL_ID}"):
        get_model(LLAVA_ONEVISION_MODEL_ID).create_from_arg_string(f"pretrained={llava_dir}", {"device": "cpu"})


# ---------------------------------------------------------------------------------------- video
VIDEO_TASK = "vtprune_video_local"
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIDE = 8, 4, 64  # an 8-frame video, 2 s at 4 fps, of 64 x 64 px frames


@pytest.fixture(scope="module")
def video_task(env):
    """A local video task: ``vtprune_pope_local``'s YAML included, its rows naming a video (``doc_to_visual``
    gives its path, and lmms-eval's Qwen classes read it with qwen-vl-utils and decord) instead of a photo; N
    questions about one 8-frame mp4 of random 64 x 64 px frames at 4 fps written with PyAV (no download).
    Returns a task manager that indexes it."""
    import shutil

    import numpy as np
    from lmms_eval.tasks import TaskManager

    from vtprune.lmms_eval_tasks import TASKS_DIR

    av = pytest.importorskip("av", reason="PyAV writes the test video")
    pytest.importorskip("decord", reason="qwen-vl-utils and lmms-eval's Qwen classes read videos with decord")
    folder = env / "video-task"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    video = folder / "clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = VIDEO_SIDE
        stream.pix_fmt = "yuv420p"
        for _ in range(VIDEO_FRAMES):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (VIDEO_SIDE, VIDEO_SIDE, 3), dtype=np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    rows = [{"id": f"v{i}", "video": str(video), "question": f"is there a w{5 + i} in the video ?",
             "answer": "yes" if i % 2 == 0 else "no"} for i in range(N)]
    data = folder / "video.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "video.yaml").write_text(f"include: {TASKS_DIR / 'vtprune_pope_local.yaml'}\ntask: {VIDEO_TASK}\n"
                                       f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    return TaskManager("WARNING", include_path=[str(TASKS_DIR), str(folder)], include_defaults=False)


# qwen-vl-utils samples 4 frames (2 s at its 2 fps; max_num_frames=4 caps lmms-eval's own resampling) and resizes them
# to its factor of 2 x the ViT patch within the pixel limits: Qwen2-VL / 2.5-VL 56 x 56 px (28 px factor, max_pixels
# 3136), 4 px patches merged 2 x 2: 2 temporal patches x 7 x 7 = 98 tokens; Qwen3-VL 64 x 64 px (32 px factor),
# 16 px patches: 2 x 2 x 2 = 8 tokens (one timestamped wrapper per temporal patch). LLaVA-OneVision: lmms-eval's
# load_video reads 4 frames (max_frames_num=4: frames 0, 2, 4, 7), the processor resizes them to the tower's 32 x 32 px
# tile, whose 4 x 4 patches the model pools to 2 x 2: 4 frames x 2 x 2 + one newline = 17 tokens
VIDEO_TOKENS = {"qwen2_vl": 98, "qwen2_5_vl": 98, "qwen3_vl": 8, "llava_onevision": 4 * 2**2 + 1}
VIDEO_FRAMES_ARG = {"qwen2_vl": "max_num_frames", "qwen2_5_vl": "max_num_frames", "qwen3_vl": "max_num_frames",
                    "llava_onevision": "max_frames_num"}  # the stock classes' frames per video


def video_cases() -> list:
    """Every registered method on each id of :data:`VIDEO_TOKENS`; where the id has a chat and a simple class,
    the methods alternate between them (both classes see several methods)."""
    cases = []
    for name in VIDEO_TOKENS:
        backends = FAMILIES[name].backends
        for i, method in enumerate(sorted(vtprune.METHODS)):
            simple = backends[i % len(backends)] or FAMILIES[name].stock[0] is None
            cases.append(pytest.param(name, simple, method, id=f"{name}-{'simple' if simple else 'chat'}-{method}"))
    return cases


@pytest.mark.parametrize("name,force_simple,method", video_cases())
def test_video_passes_through(request, video_task, name, force_simple, method):
    """A generate_until video task through ``simple_evaluate`` with the Qwen and OneVision ids: the stock class
    reads the video (Qwen: qwen-vl-utils, decord; OneVision: its ``load_video``, decord, which vtprune's chat class
    has read the paths the stock chat loop hands the processor) and its processor lays it out; vtprune schedules
    the video's tokens as one visual unit under every method (each with its pruning example's options): the
    report says the unit is a video, counts its tokens per layer as video tokens, and a pruning method keeps
    fewer of them."""
    family = FAMILIES[name]
    work = request.getfixturevalue(family.loader)
    path = request.getfixturevalue(family.checkpoint)
    report = work / f"video-{name}-{force_simple}-{method}.jsonl"
    options = "".join(f",{k}={v}" for k, v in vtprune.METHODS[method].examples["prune"].items())
    args = ",".join(a for a in (f"pretrained={path}", family.args, f"{VIDEO_FRAMES_ARG[name]}=4") if a)
    results = evaluate(video_task, f"{args},method={method}{options},vtprune_report={report}", tasks=(VIDEO_TASK,),
                       model=family.model_id, limit=N, force_simple=force_simple, gen_kwargs="max_new_tokens=2")
    check_results(results, N, VIDEO_TASK)
    assert all(s["resps"][0][0].strip() for s in results["samples"][VIDEO_TASK])
    assert results["config"]["model_backend"].endswith("(simple)" if is_simple(family, force_simple) else "(chat)")
    rows = read_reports(report)
    assert len(rows) == N and {(r["method"], r["task"]) for r in rows} == {(method, VIDEO_TASK)}
    n = VIDEO_TOKENS[name]
    for r in rows:
        (sample,) = r["samples"]
        assert sample["visual_kinds"] == ["video"] and sample["visual_tokens_in"] == n
        per_layer = sample["visual_tokens_per_layer_prefill"]
        assert sample["video_tokens_per_layer_prefill"] == per_layer  # every visual token is the video's
        if method == "none":
            assert per_layer == [n] * 6 and sample["equivalent_budget"] == n
        else:
            assert min(per_layer) < n and sample["equivalent_budget"] < n


def test_onevision_processor_parts_take_paths_and_no_images(tmp_path):
    """``VideoFrames`` (the OneVision chat class's video processor) reads a path with the reader it is given and
    hands the frames over unsampled again, passes frames through, refuses a missing file; ``NoImages`` answers no
    images with no pixels (the real image processors raise IndexError) and passes images through."""
    import numpy as np
    import torch
    from onevision_tiny import FrameProcessor, random_video
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from vtprune.lmms_eval_plugin.llava_onevision import NoImages, VideoFrames

    calls = []

    class Recorder(FrameProcessor):
        def __call__(self, videos, **kwargs):
            calls.append(kwargs)
            return super().__call__(videos, **kwargs)

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # a file; the reader below stands in for decoding it
    frames = random_video(0, frames=3)
    read = []
    videos = VideoFrames(Recorder(), lambda path: read.append(path) or frames)
    assert videos.real.size.height == 32  # the wrapped part's settings
    out = videos([str(clip), random_video(1, frames=3)], return_tensors="pt")["pixel_values_videos"]
    assert read == [str(clip)] and out.shape == (2, 3, 3, 32, 32) and calls[-1]["do_sample_frames"] is False
    same = videos(frames, return_tensors="pt")["pixel_values_videos"]
    assert "do_sample_frames" not in calls[-1] and torch.equal(same[0], out[0])  # frames: through, as read
    with pytest.raises(FileNotFoundError, match="video file not found: .*nope.mp4"):
        videos(str(tmp_path / "nope.mp4"))
    assert read == [str(clip)]

    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32})
    with pytest.raises(IndexError):
        images([])
    assert dict(NoImages(images)([])) == {}
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(NoImages(images)([image], return_tensors="pt")["pixel_values"],
                               images([image], return_tensors="pt")["pixel_values"])
