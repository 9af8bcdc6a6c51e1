"""The lmms-eval plugin on the other families, end to end through lmms-eval's ``simple_evaluate`` on the
local ``vtprune_pope_local`` task (the fixtures of ``test_lmms_eval_plugin``):

* LLaVA-NeXT: lmms-eval's stock ``llava_hf`` picks ``LlavaNextForConditionalGeneration`` from the
  checkpoint's ``model_type``, so ``vtprune_llava_hf`` covers it; a tiny random NeXT saved with a real
  ``LlavaNextProcessor`` (any-resolution tiles: the visual tokens per image follow the photo's size).
* Qwen2-VL / Qwen2.5-VL: ``vtprune_qwen2_vl`` / ``vtprune_qwen2_5_vl`` (lmms-eval's stock Qwen classes) on
  tiny random models with a word-level tokenizer carrying Qwen's vision tokens and the PIL image processor.
  Without torchvision (this CPU-only venv) two test-only shims stand in (see :func:`qwen_env`): a stub
  module so that ``qwen_vl_utils`` imports, and a processor loader that builds ``Qwen2VLProcessor`` with no
  video processor; the stock loading of the model, the prompts, ``process_vision_info`` and the generate
  loop run unchanged.

Skipped only when lmms-eval (or, for the Qwen evaluations, qwen-vl-utils) is not importable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `lmms` extra)")

import test_lmms_eval_plugin as plugin_tests  # noqa: E402
from conftest import WORD_CHAT_TEMPLATE, word_tokenizer  # noqa: E402

from vtprune.lmms_eval_plugin import MODEL_ID, MODEL_IDS, QWEN2_5_VL_MODEL_ID, QWEN2_VL_MODEL_ID, manifests  # noqa: E402
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


# ---------------------------------------------------------------------------------------- LLaVA-NeXT
def llava_next_checkpoint(path):
    """``test_llava_next.tiny_llava_next`` saved with its real ``LlavaNextProcessor`` (word-level tokenizer,
    32 px tiles, pinpoints up to 64 x 64 px) plus a chat template, as a llava-hf NeXT repo."""
    from next_tiny import tiny_llava_next, tiny_processor

    processor = tiny_processor()
    processor.chat_template = processor.tokenizer.chat_template = WORD_CHAT_TEMPLATE
    tiny_llava_next().save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return llava_next_checkpoint(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_stock_llava_hf_loads_llava_next(env, next_dir, force_simple):
    from lmms_eval.models import get_model
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from vtprune.adapters import adapter_for
    from vtprune.adapters.llava_next import LlavaNextAdapter

    lm = get_model(MODEL_ID, force_simple=force_simple).create_from_arg_string(
        f"pretrained={next_dir},method=parvts,budget=8", {"device": "cpu"})
    assert type(lm.model) is LlavaNextForConditionalGeneration  # the stock loader's pick from model_type
    assert type(lm._image_processor) is LlavaNextProcessor
    assert isinstance(adapter_for(lm.model), LlavaNextAdapter)
    assert lm.vtprune_method == "parvts" and lm.vtprune_options == {"budget": 8}


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_llava_next_parvts(env, task_manager, next_dir, force_simple):
    report = env / f"next-{force_simple}.jsonl"
    results = evaluate(task_manager, f"pretrained={next_dir},method=parvts,budget=8,discard_layer=2,"
                                     f"vtprune_report={report}", limit=N, force_simple=force_simple,
                       gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", 8)
    assert results["config"]["model_backend"].endswith("(simple)" if force_simple else "(chat)")
    assert results["config"]["model"] == MODEL_ID
    # any-resolution: a COCO photo is 2 x 2 tiles (64 x 64 px pinpoint) with its unpadded grid, > 16 tokens
    assert all(r["samples"][0]["visual_tokens_in"] > 16 for r in rows)
    # ParVTS: layers 0-1 see every visual token, layers 2-5 the 8 subjects
    for r in rows:
        sample = r["samples"][0]
        n = sample["visual_tokens_in"]
        assert sample["visual_tokens_per_layer_prefill"] == [n, n, 8, 8, 8, 8]
        assert sample["equivalent_budget"] == pytest.approx((2 * n + 4 * 8) / 6)


# ---------------------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_IDS = {"qwen2_vl": QWEN2_VL_MODEL_ID, "qwen2_5_vl": QWEN2_5_VL_MODEL_ID}
QWEN_SPECIAL = {"<|image_pad|>": 250, "<|video_pad|>": 251, "<|vision_start|>": 252, "<|vision_end|>": 253}
# Qwen's layout: each image part is <|vision_start|> <|image_pad|> <|vision_end|> (the processor repeats the pad)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' or 'image' in c %}<|vision_start|> <|image_pad|> "
    "<|vision_end|> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% endfor %}")
# a 640 x 480 photo -> 28 x 56 px (qwen_vl_utils, 28 px factor) -> 32 x 56 px (the processor, 8 px): 28 tokens
QWEN_PIXELS = "min_pixels=256,max_pixels=3136"


def qwen_tokenizer():
    return word_tokenizer(QWEN_SPECIAL, chat_template=QWEN_CHAT_TEMPLATE, extra_special_tokens={
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def qwen_checkpoint(path, family: str):
    """``qwen_tiny.tiny_qwen(family)`` saved with the parts of a real ``Qwen2VLProcessor`` (word-level
    tokenizer with Qwen's vision tokens and a chat template, the PIL ``Qwen2VLImageProcessor`` with 4 px
    patches merged 2 x 2)."""
    from qwen_tiny import MERGE, PATCH, TEMPORAL, tiny_qwen
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tiny_qwen(family, layers=6, seed=5).save_pretrained(path)
    qwen_tokenizer().save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE,
                             min_pixels=256, max_pixels=1024).save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return path


class _ProcessorWithoutVideo:
    """Stand-in for ``transformers.AutoProcessor`` in lmms-eval's Qwen modules where torchvision is missing:
    transformers 5 cannot build a Qwen2-VL (or Qwen3-VL: ``processor_class``) processor without it (its video
    processor needs torchvision). Builds the real processor from the checkpoint's image processor, tokenizer
    and chat template with no video processor (images only)."""

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
                image_processor=images, tokenizer=AutoTokenizer.from_pretrained(path), video_processor=None,
                chat_template=(Path(path) / "chat_template.jinja").read_text())


@pytest.fixture(scope="module")
def qwen_env(env):
    """lmms-eval's Qwen modules importable and able to load the tiny checkpoints offline on CPU. Where
    torchvision is not installed (this CPU-only venv: PyPI's torchvision wheels are CUDA builds): a stub
    ``torchvision`` module while ``qwen_vl_utils`` is first imported (it imports torchvision at the top but
    uses it for videos only; images go through PIL), and :class:`_ProcessorWithoutVideo`."""
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
                mp.setattr(module, "AutoProcessor", _ProcessorWithoutVideo)
        yield env


def _has_torchvision() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):  # a module without __spec__ in sys.modules
        return False


@pytest.fixture(scope="module", params=list(QWEN_IDS))
def qwen_dir(request, tmp_path_factory):
    return request.param, qwen_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def test_qwen_registered(env):
    from lmms_eval.models import get_model, get_model_manifest

    from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

    assert {m.model_id for m in manifests()} == set(MODEL_IDS) >= {MODEL_ID, QWEN2_VL_MODEL_ID, QWEN2_5_VL_MODEL_ID}
    for manifest in manifests():
        assert get_model_manifest(manifest.model_id) == manifest
    assert get_model_manifest(QWEN2_VL_MODEL_ID).chat_class_path is None  # lmms-eval has no chat Qwen2-VL
    for model_id, simple in ((QWEN2_VL_MODEL_ID, True), (QWEN2_VL_MODEL_ID, False), (QWEN2_5_VL_MODEL_ID, True),
                             (QWEN2_5_VL_MODEL_ID, False)):
        cls = get_model(model_id, force_simple=simple)
        assert cls.vtprune_model_id == model_id and cls.__mro__[1] is VTPruneMixin
        assert cls.is_simple == (simple or model_id == QWEN2_VL_MODEL_ID)
        assert not [name for name, value in vars(cls).items() if callable(value)]  # nothing copied


@pytest.mark.parametrize("model_id", [QWEN2_VL_MODEL_ID, QWEN2_5_VL_MODEL_ID])
def test_qwen_bad_option_fails_before_loading(env, model_id):
    from lmms_eval.models import get_model

    with pytest.raises(TypeError, match=rf"{model_id}: method 'parvts' has no option\(s\) \['nope'\].*'max_pixels'"):
        get_model(model_id).create_from_arg_string("pretrained=/no/such/checkpoint,method=parvts,budget=4,nope=1",
                                                   {"device": "cpu"})


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_qwen_parvts(qwen_env, task_manager, qwen_dir, force_simple):
    family, path = qwen_dir
    model_id = QWEN_IDS[family]
    report = qwen_env / f"{family}-{force_simple}.jsonl"
    results = evaluate(task_manager, f"pretrained={path},{QWEN_PIXELS},method=parvts,budget=4,discard_layer=2,"
                                     f"vtprune_report={report}", model=model_id, limit=N, force_simple=force_simple,
                       gen_kwargs="max_new_tokens=2")
    rows = read_reports(report)
    check_pruned(results, rows, "parvts", 4)
    simple = force_simple or family == "qwen2_vl"
    assert results["config"]["model_backend"].endswith("(simple)" if simple else "(chat)")
    for r in rows:  # layers 0-1 see every visual token of the photo, layers 2-5 the 4 subjects
        sample = r["samples"][0]
        n = sample["visual_tokens_in"]
        assert n >= 16 and sample["visual_tokens_per_layer_prefill"] == [n, n, 4, 4, 4, 4]
        assert sample["equivalent_budget"] == pytest.approx((2 * n + 4 * 4) / 6)
