"""The lmms-eval plugin on InternVL and LLaVA-OneVision, end to end through lmms-eval's ``simple_evaluate`` on
the local ``vtprune_pope_local`` task (the fixtures of ``test_lmms_eval_plugin``, the checks of
``test_lmms_eval_families``):

* ``vtprune_internvl``: lmms-eval's chat ``internvl_hf`` (stock ``InternVLForConditionalGeneration``, in
  bfloat16) on a tiny random InternVL saved with the parts of a real ``InternVLProcessor`` (word-level
  tokenizer with InternVL's image tokens and a chat template, the PIL tiling image processor);
* ``vtprune_llava_onevision``: lmms-eval's ``llava_hf`` (chat and simple), which loads
  ``LlavaOnevisionForConditionalGeneration`` from the checkpoint's ``model_type``, on a tiny random
  OneVision saved the same way.

transformers 5 cannot load either processor without torchvision (their video processors need it; this
CPU-only venv has none), so :class:`ProcessorFromParts` stands in for ``AutoProcessor`` in the lmms-eval
modules that load them: it builds the checkpoint's real processor class from its saved parts with no video
processor. The stock loading of the model, the prompts and the generate loop run unchanged.

Skipped only when lmms-eval is not importable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `lmms` extra)")

import test_lmms_eval_families as families_tests  # noqa: E402
import test_lmms_eval_plugin as plugin_tests  # noqa: E402
from conftest import WORD_CHAT_TEMPLATE, processor_without_video  # noqa: E402

from vtprune.lmms_eval_plugin import INTERNVL_MODEL_ID, LLAVA_ONEVISION_MODEL_ID, MODEL_ID  # noqa: E402

env = plugin_tests.env  # the fixtures: working directory + entry point, task manager of the local task
task_manager = plugin_tests.task_manager
evaluate = plugin_tests.evaluate
check_pruned, read_reports, N = families_tests.check_pruned, families_tests.read_reports, families_tests.N

pytestmark = pytest.mark.usefixtures("one_thread")

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


class ProcessorFromParts:
    """Stand-in for ``transformers.AutoProcessor`` where torchvision is missing: the checkpoint's processor
    class (``processor_class`` of its ``processor_config.json``), built from its saved image processor,
    tokenizer, chat template and arguments with no video processor (:func:`conftest.processor_without_video`)."""

    def __init__(self, image_processor_class):
        self.image_processor_class = image_processor_class

    def from_pretrained(self, path, **kwargs):
        import transformers

        args = json.loads((Path(path) / "processor_config.json").read_text())
        if "image_processor" in args:  # a processor saved whole (no video processor to miss): the real loader
            return transformers.AutoProcessor.from_pretrained(path, **kwargs)
        cls = getattr(transformers, args.pop("processor_class"))
        return processor_without_video(cls, image_processor=self.image_processor_class.from_pretrained(path),
                                       tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                       chat_template=(Path(path) / "chat_template.jinja").read_text(), **args)


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    from internvl_tiny import P, tiny_internvl, tiny_processor

    return save_checkpoint(tmp_path_factory.mktemp("tiny-internvl"), tiny_internvl(seed=1),
                           tiny_processor(INTERNVL_CHAT_TEMPLATE), {"image_seq_length": P})


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    from onevision_tiny import ASPECT, P, tiny_onevision, tiny_processor

    return save_checkpoint(tmp_path_factory.mktemp("tiny-onevision"), tiny_onevision(seed=5),
                           tiny_processor(WORD_CHAT_TEMPLATE),
                           {"num_image_tokens": P, "vision_feature_select_strategy": "full",
                            "vision_aspect_ratio": ASPECT})


@pytest.fixture(scope="module")
def loaders(env):
    """lmms-eval's InternVL and llava_hf modules loading the tiny processors offline (see the module docstring)."""
    import lmms_eval.models.chat.internvl_hf as internvl_hf
    import lmms_eval.models.simple.llava_hf as llava_hf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    with pytest.MonkeyPatch.context() as mp:
        if not families_tests._has_torchvision():
            mp.setattr(internvl_hf, "AutoProcessor", ProcessorFromParts(GotOcr2ImageProcessorPil))
            mp.setattr(llava_hf, "AutoProcessor", ProcessorFromParts(LlavaOnevisionImageProcessorPil))
        yield env


def test_registered(env):
    from lmms_eval.models import get_model, get_model_manifest

    from vtprune.lmms_eval_plugin import manifests
    from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

    for model_id in (INTERNVL_MODEL_ID, LLAVA_ONEVISION_MODEL_ID):
        (manifest,) = [m for m in manifests() if m.model_id == model_id]
        assert get_model_manifest(model_id) == manifest
    assert get_model_manifest(INTERNVL_MODEL_ID).simple_class_path is None  # lmms-eval's simple ones are remote code
    for model_id, simple, stock in ((INTERNVL_MODEL_ID, False, "lmms_eval.models.chat.internvl_hf"),
                                    (INTERNVL_MODEL_ID, True, "lmms_eval.models.chat.internvl_hf"),
                                    (LLAVA_ONEVISION_MODEL_ID, False, "lmms_eval.models.chat.llava_hf"),
                                    (LLAVA_ONEVISION_MODEL_ID, True, "lmms_eval.models.simple.llava_hf")):
        cls = get_model(model_id, force_simple=simple)
        assert cls.vtprune_model_id == model_id and VTPruneMixin in cls.__mro__
        assert cls.__mro__[cls.__mro__.index(VTPruneMixin) + 1].__module__ == stock  # the stock class, next
        assert cls.is_simple == (simple and model_id == LLAVA_ONEVISION_MODEL_ID)


@pytest.mark.parametrize("model_id", [INTERNVL_MODEL_ID, LLAVA_ONEVISION_MODEL_ID])
def test_bad_option_fails_before_loading(env, model_id):
    from lmms_eval.models import get_model

    with pytest.raises(TypeError, match=rf"{model_id}: method 'parvts' has no option\(s\) \['nope'\]"):
        get_model(model_id).create_from_arg_string("pretrained=/no/such/checkpoint,method=parvts,budget=4,nope=1",
                                                   {"device": "cpu"})


def test_stock_internvl_loads_the_checkpoint(loaders, internvl_dir):
    from lmms_eval.models import get_model
    from transformers import InternVLForConditionalGeneration, InternVLProcessor

    from vtprune.adapters import adapter_for
    from vtprune.adapters.internvl import InternVLAdapter

    lm = get_model(INTERNVL_MODEL_ID).create_from_arg_string(f"pretrained={internvl_dir},method=parvts,budget=8",
                                                             {"device": "cpu"})
    assert type(lm.model) is InternVLForConditionalGeneration and type(lm.processor) is InternVLProcessor
    assert isinstance(adapter_for(lm.model), InternVLAdapter)
    assert lm.vtprune_method == "parvts" and lm.vtprune_options == {"budget": 8}


def test_internvl_parvts(loaders, task_manager, internvl_dir):
    report = loaders / "internvl.jsonl"
    results = evaluate(task_manager, f"pretrained={internvl_dir},max_patches=4,method=parvts,budget=8,discard_layer=2,"
                                     f"vtprune_report={report}", model=INTERNVL_MODEL_ID, limit=N,
                       gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", 8)
    assert results["config"]["model_backend"].endswith("(chat)")
    for r in rows:  # a 4:3 COCO photo: 2 x 2 tiles (the closest aspect of at most 4) + thumbnail, 16 tokens each
        sample = r["samples"][0]
        n = sample["visual_tokens_in"]
        assert n == 5 * 16 and sample["visual_tokens_per_layer_prefill"] == [n, n, 8, 8, 8, 8]


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_llava_onevision_parvts(loaders, task_manager, onevision_dir, force_simple):
    report = loaders / f"onevision-{force_simple}.jsonl"
    results = evaluate(task_manager, f"pretrained={onevision_dir},method=parvts,budget=8,discard_layer=2,"
                                     f"vtprune_report={report}", model=LLAVA_ONEVISION_MODEL_ID, limit=N,
                       force_simple=force_simple, gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", 8)
    assert results["config"]["model_backend"].endswith("(simple)" if force_simple else "(chat)")
    for r in rows:  # a COCO photo: base tile + its unpadded grid (downsampled by anyres_max_2) with newlines
        sample = r["samples"][0]
        n = sample["visual_tokens_in"]
        assert n > 16 and sample["visual_tokens_per_layer_prefill"] == [n, n, 8, 8, 8, 8]


def test_llava_onevision_id_refuses_other_checkpoints(env, tmp_path):
    from lmms_eval.models import get_model

    llava_dir = plugin_tests.tiny_checkpoint(tmp_path / "tiny-llava")  # a LLaVA-1.5 checkpoint
    with pytest.raises(ValueError, match=rf"{LLAVA_ONEVISION_MODEL_ID} runs LLaVA-OneVision .* use --model {MODEL_ID}"):
        get_model(LLAVA_ONEVISION_MODEL_ID).create_from_arg_string(f"pretrained={llava_dir}", {"device": "cpu"})
