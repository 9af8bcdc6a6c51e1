"""The lmms-eval plugin on Qwen3-VL and Gemma 3, end to end through lmms-eval's ``simple_evaluate`` on the
local ``vtprune_pope_local`` task (the fixtures and helpers of ``test_lmms_eval_families``):

* ``vtprune_qwen3_vl``: lmms-eval's stock ``qwen3_vl`` classes (chat and simple) on ``qwen_tiny``'s tiny
  Qwen3-VL saved with a word-level tokenizer carrying Qwen's vision tokens and the PIL image processor;
  without torchvision the same two test-only shims as for Qwen2-VL stand in (a stub while ``qwen_vl_utils``
  imports, a loader that builds ``Qwen3VLProcessor`` with no video processor).
* ``vtprune_gemma3``: lmms-eval's stock ``gemma3`` (a simple class only) on ``gemma3_tiny``'s tiny Gemma 3
  saved with its real ``Gemma3Processor`` and a chat template; the stock class loads it unchanged (bfloat16).

Skipped only when lmms-eval (or, for Qwen3-VL, qwen-vl-utils) is not importable.
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `lmms` extra)")

import test_lmms_eval_families as families  # noqa: E402
from conftest import WORD_CHAT_TEMPLATE  # noqa: E402

from vtprune.lmms_eval_plugin import GEMMA3_MODEL_ID, MODEL_IDS, QWEN3_VL_MODEL_ID, manifests  # noqa: E402

env, task_manager, qwen_env = families.env, families.task_manager, families.qwen_env
check_pruned, evaluate, read_reports, N = families.check_pruned, families.evaluate, families.read_reports, families.N

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered(env):
    from lmms_eval.models import get_model, get_model_manifest
    from lmms_eval.models.simple.gemma3 import Gemma3

    from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

    assert {QWEN3_VL_MODEL_ID, GEMMA3_MODEL_ID} <= set(MODEL_IDS) == {m.model_id for m in manifests()}
    for manifest in manifests():
        assert get_model_manifest(manifest.model_id) == manifest
    assert get_model_manifest(GEMMA3_MODEL_ID).chat_class_path is None  # lmms-eval has no chat Gemma 3
    for model_id, simple in ((QWEN3_VL_MODEL_ID, True), (QWEN3_VL_MODEL_ID, False), (GEMMA3_MODEL_ID, True),
                             (GEMMA3_MODEL_ID, False)):
        cls = get_model(model_id, force_simple=simple)
        assert cls.vtprune_model_id == model_id and cls.__mro__[1] is VTPruneMixin
        assert cls.is_simple == (simple or model_id == GEMMA3_MODEL_ID)
        assert not [name for name, value in vars(cls).items() if callable(value)]  # nothing copied
    assert issubclass(get_model(GEMMA3_MODEL_ID), Gemma3)


@pytest.mark.parametrize("model_id", [QWEN3_VL_MODEL_ID, GEMMA3_MODEL_ID])
def test_bad_option_fails_before_loading(env, model_id):
    from lmms_eval.models import get_model

    with pytest.raises(TypeError, match=rf"{model_id}: method 'parvts' has no option\(s\) \['nope'\].*'system_prompt'"):
        get_model(model_id).create_from_arg_string("pretrained=/no/such/checkpoint,method=parvts,budget=4,nope=1",
                                                   {"device": "cpu"})


# ---------------------------------------------------------------------------------------- Qwen3-VL
class _Qwen3ProcessorWithoutVideo(families._ProcessorWithoutVideo):
    processor_class = "Qwen3VLProcessor"


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
        if not families._has_torchvision():
            mp.setattr(simple, "AutoProcessor", _Qwen3ProcessorWithoutVideo)
        yield qwen_env


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """``qwen_tiny.tiny_qwen("qwen3_vl")`` with Qwen3-VL's 16 px patches (a photo is then a few hundred tokens,
    not thousands) saved with the parts of a real ``Qwen3VLProcessor`` (``test_lmms_eval_families``' Qwen
    tokenizer and chat template, the PIL ``Qwen2VLImageProcessor`` Qwen3-VL uses)."""
    from qwen_tiny import MERGE, TEMPORAL, tiny_qwen
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = tmp_path_factory.mktemp("tiny-qwen3-vl")
    tiny_qwen("qwen3_vl", seed=5, patch=16).save_pretrained(path)
    families.qwen_tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=TEMPORAL, merge_size=MERGE).save_pretrained(path)
    (path / "chat_template.jinja").write_text(families.QWEN_CHAT_TEMPLATE)
    return path


def _load_stock(model_id, path, model_cls, processor_cls, adapter_cls):
    """The plugin's model for ``model_id`` on the checkpoint at ``path``, checked to be the stock classes
    with vtprune's adapter (FastV, budget 4)."""
    from lmms_eval.models import get_model

    from vtprune.adapters import adapter_for

    lm = get_model(model_id).create_from_arg_string(f"pretrained={path},method=fastv,budget=4", {"device": "cpu"})
    assert type(lm.model) is model_cls and type(lm.processor) is processor_cls
    assert isinstance(adapter_for(lm.model), adapter_cls)
    return lm


def test_stock_qwen3_vl_loads_the_checkpoint(qwen3_env, qwen3_dir):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    from vtprune.adapters.qwen3_vl import Qwen3VLAdapter

    lm = _load_stock(QWEN3_VL_MODEL_ID, qwen3_dir, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLAdapter)
    assert lm.device_map == "cpu"  # the stock default "auto" (which moves inputs to cuda) replaced by the device


# a 640 x 480 photo, 32 px per merged token: the simple class resizes it within max_pixels (qwen_vl_utils) to
# 96 x 128 px, 3 x 4 tokens; the chat class passes no pixel limits per image (stock): 480 x 640 px, 15 x 20 tokens
QWEN3_PIXELS = "min_pixels=1024,max_pixels=16384"
QWEN3_TOKENS = {True: 12, False: 300}


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_qwen3_vl_parvts(qwen3_env, task_manager, qwen3_dir, force_simple):
    report = qwen3_env / f"qwen3-{force_simple}.jsonl"
    results = evaluate(task_manager, f"pretrained={qwen3_dir},{QWEN3_PIXELS},method=parvts,budget=4,discard_layer=2,"
                                     f"vtprune_report={report}", model=QWEN3_VL_MODEL_ID, limit=N,
                       force_simple=force_simple, gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", 4)
    assert results["config"]["model_backend"].endswith("(simple)" if force_simple else "(chat)")
    n = QWEN3_TOKENS[force_simple]
    for r in rows:  # layers 0-1 see every visual token of the photo, layers 2-5 the 4 subjects
        assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [n, n, 4, 4, 4, 4]


# ---------------------------------------------------------------------------------------- Gemma 3
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


def test_stock_gemma3_loads_the_checkpoint(env, gemma3_dir):
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    from vtprune.adapters.gemma3 import Gemma3Adapter

    lm = _load_stock(GEMMA3_MODEL_ID, gemma3_dir, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3Adapter)
    assert lm.vtprune_method == "fastv" and lm.vtprune_options == {"budget": 4}


def test_gemma3_parvts(env, task_manager, gemma3_dir):
    report = env / "gemma3.jsonl"
    results = evaluate(task_manager, f"pretrained={gemma3_dir},method=parvts,budget=4,discard_layer=2,"
                                     f"vtprune_report={report}", model=GEMMA3_MODEL_ID, limit=N,
                       gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", 4)
    assert results["config"]["model_backend"].endswith("(simple)")
    for r in rows:  # the fixed 16 tokens per image; layers 0-1 see them all, layers 2-5 the 4 subjects
        assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [16, 16, 4, 4, 4, 4]
