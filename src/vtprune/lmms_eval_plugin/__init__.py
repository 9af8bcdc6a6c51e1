"""lmms-eval plugin: run lmms-eval's standard benchmarks on a model whose visual tokens vtprune schedules.

No fork and no vendored copy of lmms-eval: the plugin registers the model id :data:`MODEL_ID`
(``vtprune_llava_hf``) through lmms-eval's own model registry, and its classes subclass lmms-eval's stock
``llava_hf`` classes (loading, prompting and the generate loop are lmms-eval's; vtprune only attaches
:func:`vtprune.apply` around the generation, see :mod:`vtprune.lmms_eval_plugin.mixin`).

Registration mechanism (lmms-eval 0.7.x): the Python entry-point group ``lmms_eval.models``. On import,
``lmms_eval.models`` builds its ``ModelRegistryV2`` and calls ``load_entrypoint_manifests()``, which loads
every entry point of that group; a payload may be a ``ModelManifest``, an iterable of them, or a callable
returning either. vtprune's entry point is :func:`manifests`, declared in ``pyproject.toml``::

    [project.entry-points."lmms_eval.models"]
    vtprune = "vtprune.lmms_eval_plugin:manifests"

(the older ``LMMS_EVAL_PLUGINS`` environment variable is deprecated in 0.7 and not used). This module stays
light on purpose: lmms-eval imports it while its own ``lmms_eval.models`` package is still initialising,
so the model classes live in :mod:`vtprune.lmms_eval_plugin.llava_hf` and are imported only when the
model is requested.

Usage::

    python -m lmms_eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=parvts,budget=64,discard_layer=3 \\
        --tasks pope --batch_size 1

``method`` (default ``none``), ``budget`` / ``keep_ratio`` and every option of the method are accepted in
``--model_args`` beside the stock ``llava_hf`` arguments (``pretrained``, ``dtype``, ``device``,
``attn_implementation``, ...); ``pretrained=vtprune-default`` loads the bundled offline model
(:func:`vtprune.models.load_default`). Unknown methods raise ValueError, unknown options TypeError
(vtprune's own errors, listing what is accepted).
"""

from __future__ import annotations

MODEL_ID = "vtprune_llava_hf"
"""lmms-eval model id of vtprune on LLaVA-1.5 / the bundled model (``--model vtprune_llava_hf``)."""

CHAT_CLASS_PATH = "vtprune.lmms_eval_plugin.llava_hf.VTPruneLlavaHf"
SIMPLE_CLASS_PATH = "vtprune.lmms_eval_plugin.llava_hf.VTPruneLlavaHfSimple"


def manifests() -> list:
    """The ``lmms_eval.models`` entry-point payload: one ``ModelManifest`` for :data:`MODEL_ID` with a chat
    class (lmms-eval's default) and a simple class (``--force_simple``).

    Raises:
        ImportError: lmms-eval is not installed (it only calls this function when it is).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS_PATH, simple_class_path=SIMPLE_CLASS_PATH)]


__all__ = ["MODEL_ID", "manifests"]
