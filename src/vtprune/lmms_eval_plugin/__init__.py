"""lmms-eval plugin: run lmms-eval's standard benchmarks on a model whose visual tokens vtprune schedules.

No fork and no vendored copy of lmms-eval: the plugin registers its model ids through lmms-eval's own
model registry, each subclassing lmms-eval's stock classes for its family (loading, prompting and the
generate loop are lmms-eval's; vtprune only attaches :func:`vtprune.apply` around the generation, see
:mod:`vtprune.lmms_eval_plugin.mixin`):

* ``vtprune_llava_hf`` (:data:`MODEL_ID`): LLaVA-1.5 and LLaVA-NeXT checkpoints (the stock ``llava_hf``
  loader picks ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` from the config's
  ``model_type``; LLaVA-OneVision too, which ``vtprune_llava_onevision`` names) and the bundled model; lmms-eval's ``llava_hf`` chat and simple classes
  (:mod:`vtprune.lmms_eval_plugin.llava_hf`);
* ``vtprune_qwen2_vl`` (:data:`QWEN2_VL_MODEL_ID`): Qwen2-VL; lmms-eval's ``qwen2_vl`` (a simple class
  only, used with or without ``--force_simple``) (:mod:`vtprune.lmms_eval_plugin.qwen`);
* ``vtprune_qwen2_5_vl`` (:data:`QWEN2_5_VL_MODEL_ID`): Qwen2.5-VL; lmms-eval's ``qwen2_5_vl`` chat and
  simple classes (:mod:`vtprune.lmms_eval_plugin.qwen`);
* ``vtprune_qwen3_vl`` (:data:`QWEN3_VL_MODEL_ID`): Qwen3-VL; lmms-eval's ``qwen3_vl`` chat and simple
  classes (:mod:`vtprune.lmms_eval_plugin.qwen3`);
* ``vtprune_gemma3`` (:data:`GEMMA3_MODEL_ID`): Gemma 3; lmms-eval's ``gemma3`` (a simple class only)
  (:mod:`vtprune.lmms_eval_plugin.gemma3`).
* ``vtprune_internvl`` (:data:`INTERNVL_MODEL_ID`): InternVL3 / InternVL3.5 in transformers' format
  (``InternVLForConditionalGeneration``); lmms-eval's chat ``internvl_hf`` (a chat class only: lmms-eval's
  simple InternVL classes run OpenGVLab's remote code) (:mod:`vtprune.lmms_eval_plugin.internvl`);
* ``vtprune_llava_onevision`` (:data:`LLAVA_ONEVISION_MODEL_ID`): LLaVA-OneVision; lmms-eval's ``llava_hf``
  chat and simple classes, which load ``LlavaOnevisionForConditionalGeneration`` from the checkpoint's
  ``model_type`` (:mod:`vtprune.lmms_eval_plugin.llava_onevision`).

The Qwen ids need ``qwen-vl-utils`` and torchvision (see :mod:`vtprune.lmms_eval_plugin.qwen`).

Registration mechanism (lmms-eval 0.7.x): the Python entry-point group ``lmms_eval.models``. On import,
``lmms_eval.models`` builds its ``ModelRegistryV2`` and calls ``load_entrypoint_manifests()``, which loads
every entry point of that group; a payload may be a ``ModelManifest``, an iterable of them, or a callable
returning either. vtprune's entry point is :func:`manifests`, declared in ``pyproject.toml``::

    [project.entry-points."lmms_eval.models"]
    vtprune = "vtprune.lmms_eval_plugin:manifests"

(the older ``LMMS_EVAL_PLUGINS`` environment variable is deprecated in 0.7 and not used). This module stays
light on purpose: lmms-eval imports it while its own ``lmms_eval.models`` package is still initialising,
so the model classes live in :mod:`vtprune.lmms_eval_plugin.llava_hf`, :mod:`vtprune.lmms_eval_plugin.qwen`,
:mod:`vtprune.lmms_eval_plugin.qwen3`, :mod:`vtprune.lmms_eval_plugin.gemma3`,
:mod:`vtprune.lmms_eval_plugin.internvl` and :mod:`vtprune.lmms_eval_plugin.llava_onevision` and are imported
only when a model is requested.

Usage::

    python -m lmms_eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=parvts,budget=64,discard_layer=3 \\
        --tasks pope --batch_size 1
    python -m lmms_eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,method=parvts,budget=160 --tasks pope
    python -m lmms_eval --model vtprune_qwen2_5_vl \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=parvts,keep_ratio=0.25 --tasks pope
    python -m lmms_eval --model vtprune_qwen3_vl \\
        --model_args pretrained=Qwen/Qwen3-VL-8B-Instruct,method=parvts,keep_ratio=0.25 --tasks pope
    python -m lmms_eval --model vtprune_gemma3 \\
        --model_args pretrained=google/gemma-3-4b-it,method=parvts,budget=64 --tasks pope
    python -m lmms_eval --model vtprune_internvl \\
        --model_args pretrained=OpenGVLab/InternVL3-8B-hf,method=parvts,keep_ratio=0.25 --tasks pope
    python -m lmms_eval --model vtprune_llava_onevision \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,method=parvts,keep_ratio=0.25 --tasks pope

``method`` (default ``none``), ``budget`` / ``keep_ratio`` and every option of the method are accepted in
``--model_args`` beside the stock class's arguments (``llava_hf``: ``pretrained``, ``dtype``, ``device``,
``attn_implementation``, ...; Qwen: ``pretrained``, ``device``, ``max_pixels``, ``min_pixels``, ...). With
any-resolution inputs (LLaVA-NeXT, Qwen, InternVL, OneVision) the visual tokens per image vary with its size: a ``budget``
above an image's visual tokens fails that request (vtprune's ValueError, re-raised after the loop), while
``keep_ratio`` scales with each image. The Qwen ids and ``vtprune_llava_onevision`` also take a task's videos,
each one visual unit (a budget per video; ``keep_ratio`` scales with its frames). With ``vtprune_llava_hf``,
``pretrained=vtprune-default`` loads the bundled offline model
(:func:`vtprune.models.load_default`). Unknown methods raise ValueError, unknown options TypeError
(vtprune's own errors, listing what is accepted).
"""

from __future__ import annotations

MODEL_ID = "vtprune_llava_hf"
"""lmms-eval model id of vtprune on LLaVA-1.5, LLaVA-NeXT and the bundled model (``--model vtprune_llava_hf``)."""

QWEN2_VL_MODEL_ID = "vtprune_qwen2_vl"
"""lmms-eval model id of vtprune on Qwen2-VL (``--model vtprune_qwen2_vl``)."""

QWEN2_5_VL_MODEL_ID = "vtprune_qwen2_5_vl"
"""lmms-eval model id of vtprune on Qwen2.5-VL (``--model vtprune_qwen2_5_vl``)."""

QWEN3_VL_MODEL_ID = "vtprune_qwen3_vl"
"""lmms-eval model id of vtprune on Qwen3-VL (``--model vtprune_qwen3_vl``)."""

GEMMA3_MODEL_ID = "vtprune_gemma3"
"""lmms-eval model id of vtprune on Gemma 3 (``--model vtprune_gemma3``)."""

INTERNVL_MODEL_ID = "vtprune_internvl"
"""lmms-eval model id of vtprune on InternVL3 / InternVL3.5 (``--model vtprune_internvl``)."""

LLAVA_ONEVISION_MODEL_ID = "vtprune_llava_onevision"
"""lmms-eval model id of vtprune on LLaVA-OneVision (``--model vtprune_llava_onevision``)."""

MODEL_IDS = (MODEL_ID, QWEN2_VL_MODEL_ID, QWEN2_5_VL_MODEL_ID, QWEN3_VL_MODEL_ID, GEMMA3_MODEL_ID, INTERNVL_MODEL_ID,
             LLAVA_ONEVISION_MODEL_ID)
"""Every model id the plugin registers."""

CHAT_CLASS_PATH = "vtprune.lmms_eval_plugin.llava_hf.VTPruneLlavaHf"
SIMPLE_CLASS_PATH = "vtprune.lmms_eval_plugin.llava_hf.VTPruneLlavaHfSimple"

_QWEN = "vtprune.lmms_eval_plugin.qwen."
# model id -> (chat class path or None, simple class path)
CLASS_PATHS: dict[str, tuple[str | None, str | None]] = {
    MODEL_ID: (CHAT_CLASS_PATH, SIMPLE_CLASS_PATH),
    QWEN2_VL_MODEL_ID: (None, _QWEN + "VTPruneQwen2VL"),
    QWEN2_5_VL_MODEL_ID: (_QWEN + "VTPruneQwen2_5_VL", _QWEN + "VTPruneQwen2_5_VLSimple"),
    QWEN3_VL_MODEL_ID: ("vtprune.lmms_eval_plugin.qwen3.VTPruneQwen3VL", "vtprune.lmms_eval_plugin.qwen3.VTPruneQwen3VLSimple"),
    GEMMA3_MODEL_ID: (None, "vtprune.lmms_eval_plugin.gemma3.VTPruneGemma3"),
    INTERNVL_MODEL_ID: ("vtprune.lmms_eval_plugin.internvl.VTPruneInternVL", None),
    LLAVA_ONEVISION_MODEL_ID: ("vtprune.lmms_eval_plugin.llava_onevision.VTPruneLlavaOnevision",
                               "vtprune.lmms_eval_plugin.llava_onevision.VTPruneLlavaOnevisionSimple"),
}


def manifests() -> list:
    """The ``lmms_eval.models`` entry-point payload: one ``ModelManifest`` per id of :data:`MODEL_IDS`, each
    with a chat class (lmms-eval's default) where lmms-eval has one for the family and a simple class
    (``--force_simple``; the only one of ``vtprune_qwen2_vl`` and ``vtprune_gemma3``, which lmms-eval then
    uses either way; none for ``vtprune_internvl``, whose chat class lmms-eval then uses either way).

    Raises:
        ImportError: lmms-eval is not installed (it only calls this function when it is).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=model_id, chat_class_path=chat, simple_class_path=simple)
            for model_id, (chat, simple) in CLASS_PATHS.items()]


__all__ = ["GEMMA3_MODEL_ID", "INTERNVL_MODEL_ID", "LLAVA_ONEVISION_MODEL_ID", "MODEL_ID", "MODEL_IDS",
           "QWEN2_5_VL_MODEL_ID", "QWEN2_VL_MODEL_ID", "QWEN3_VL_MODEL_ID", "manifests"]
