"""A model larger than its device: loaded with an explicit ``device_map`` that sends half of the decoder layers
and the LM head to disk (``offload_folder``), as ``device_map="auto"`` does with what fits on no GPU or CPU.
Those modules' weights stay on the ``meta`` device and accelerate's hooks load them from disk for each
forward. vtprune's hooks must compose with that: a method gives the tokens it gives on the same model held in
memory, keep-all and ``none`` the stock model's (docs/multi-gpu.md). One method per kind of stage (``none``;
ParVTS's paths; ST3's per-layer ranking and decode-time KV eviction, which reaches the offloaded layers' caches;
VisionZip's selection before the LLM): every method x accelerate's hooks is in the conformance matrix."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from families import FAMILIES, method_options

import vtprune

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 4
BATCH = (0, 1, 2)
METHODS = ("none", "parvts", "st3", "visionzip")
OFFLOADED_FAMILIES = ("llava", "qwen2_5_vl")  # LLaVA-1.5's Llama; Qwen2.5-VL's M-RoPE (the 72B case of the docs)


@functools.cache
def in_memory(family: str):
    return FAMILIES[family].build("sdpa")


@functools.cache
def inputs(family: str, idx: tuple[int, ...]) -> dict:
    return FAMILIES[family].batch(idx)


def generate(m, x: dict) -> torch.Tensor:
    return m.generate(**x, max_new_tokens=NEW, do_sample=False)[:, -NEW:]


@functools.cache
def stock(family: str) -> torch.Tensor:
    return generate(in_memory(family), inputs(family, BATCH))


def device_map(m) -> dict[str, str]:
    """Every top-level part of the model on the CPU, except the second half of the decoder layers and the LM
    head, on disk."""
    lm = "model.language_model"
    n = len(m.model.language_model.layers)
    out = {f"{lm}.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)}
    out.update({f"{lm}.{name}": "cpu" for name, _ in m.model.language_model.named_children() if name != "layers"})
    out.update({f"model.{name}": "cpu" for name, _ in m.model.named_children() if name != "language_model"})
    out.update({f"model.{name}": "cpu" for name, _ in m.model.named_parameters(recurse=False)})
    out["lm_head"] = "disk"
    return out


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """family -> the family's model saved and loaded back with :func:`device_map` (``offload_folder``)."""
    models = {}

    def load(family: str):
        if family not in models:
            m = in_memory(family)
            folder = tmp_path_factory.mktemp(f"{family}-checkpoint")
            m.save_pretrained(folder)
            loaded = type(m).from_pretrained(folder, device_map=device_map(m), attn_implementation="sdpa",
                                             offload_folder=str(tmp_path_factory.mktemp(f"{family}-offload")))
            loaded.eval()
            loaded.generation_config = copy.deepcopy(m.generation_config)
            layers = loaded.model.language_model.layers
            assert layers[-1].mlp.down_proj.weight.device.type == "meta"  # on disk, loaded per forward
            assert layers[0].mlp.down_proj.weight.device.type == "cpu"
            assert hasattr(layers[-1], "_hf_hook") and loaded.lm_head.weight.device.type == "meta"
            models[family] = loaded
        return models[family]

    return load


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", OFFLOADED_FAMILIES)
def test_disk_offloaded_model_gives_the_in_memory_models_tokens(offloaded, family, method):
    m, ref, x = offloaded(family), in_memory(family), inputs(family, BATCH)
    with vtprune.apply(m, method, **method_options(method, "keep_all")):
        assert torch.equal(generate(m, x), stock(family))
    with vtprune.apply(ref, method, **method_options(method, "prune")):
        expected = generate(ref, x)
    with vtprune.apply(m, method, **method_options(method, "prune")) as run:
        assert torch.equal(generate(m, x), expected)
    counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
    assert method == "none" or min(counts) < FAMILIES[family].n_visual  # it pruned, on offloaded layers too
    assert torch.equal(generate(m, x), stock(family))  # detached: accelerate's hooks alone again
