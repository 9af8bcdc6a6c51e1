"""The conformance matrix: every registered method x every model family x attention implementation, for
the invariants every method must keep (fed by the registry, so a new method or family is covered without
editing a list):

* keep-all = stock: with options that keep every visual token (the method's ``examples["keep_all"]``),
  greedy outputs equal the stock model's exactly, single and in a left-padded batch;
* batched = one by one: with options that prune (``examples["prune"]``), a left-padded batch generates
  exactly what each sample generates alone;
* stock after exit and after an exception: no hook, no override, the attention implementation restored,
  outputs equal to stock;
* no host sync in the decode loop (SDPA; the detector of ``sync_detector.py``);
* a model dispatched by accelerate with a device map (its ``AlignDevicesHook`` s attached, as
  ``device_map=`` gives users of several GPUs): vtprune's hooks compose with accelerate's.

What is special to one method (its math) or one family (positions, grids, saliency) stays in that method's
or family's test file.
"""

from __future__ import annotations

import functools

import pytest
import torch
from families import FAMILIES, METHODS
from families import method_options as options
from sync_detector import SyncDetector

import vtprune

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 8
BATCH = (0, 1, 2)
ATTENTION = ("sdpa", "eager")


@functools.cache
def model(family: str, attn: str):
    return FAMILIES[family].build(attn)


@functools.cache
def inputs(family: str, idx: tuple[int, ...]) -> dict:
    return FAMILIES[family].batch(idx)


def generate(m, x, new: int = NEW) -> torch.Tensor:
    return m.generate(**x, max_new_tokens=new, do_sample=False)[:, -new:]


@functools.cache
def stock(family: str, attn: str, idx: tuple[int, ...]) -> torch.Tensor:
    return generate(model(family, attn), inputs(family, idx))


def assert_stock_model(m) -> None:
    assert "generate" not in m.__dict__
    assert not m._forward_pre_hooks and not m._forward_hooks
    layers = vtprune.Run(m, vtprune.NoPruning()).adapter.decoder_layers
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert not m.config.text_config._attn_implementation.startswith("vtprune_")


def test_every_registered_method_is_in_the_matrix_with_both_examples():
    assert METHODS == sorted(vtprune.METHODS) and len(METHODS) >= 9
    for name, cls in vtprune.METHODS.items():
        assert set(cls.examples) >= {"prune", "keep_all"}, name
        cls(**cls.examples["prune"])  # valid options
        cls(**cls.examples["keep_all"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_keeping_every_token_equals_stock(family, attn, method):
    m, fam = model(family, attn), FAMILIES[family]
    opts = options(method, "keep_all")
    for idx in ((0,), BATCH):
        with vtprune.apply(m, method, **opts) as run:
            out = generate(m, inputs(family, idx))
        assert torch.equal(out, stock(family, attn, idx)), idx
        sample = run.report()["samples"][0]
        assert sample["visual_tokens_per_layer_prefill"] == [fam.n_visual] * fam.layers
        assert sample["flops"]["prefill"]["exact_ratio"] == 1.0
    assert_stock_model(m)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_equals_one_by_one_with_pruning(family, attn, method):
    m, fam = model(family, attn), FAMILIES[family]
    opts = options(method, "prune")
    with vtprune.apply(m, method, **opts) as run:
        together = generate(m, inputs(family, BATCH))
        counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
        for i in BATCH:
            alone = generate(m, inputs(family, (i,)))
            assert torch.equal(alone[0], together[i]), f"sample {i}"
    if method != "none":
        assert min(counts) < fam.n_visual  # the example really prunes
    assert_stock_model(m)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_is_stock_after_exit_and_after_exception(family, method):
    m = model(family, "sdpa")
    opts = options(method, "prune")
    with vtprune.apply(m, method, **opts):
        generate(m, inputs(family, BATCH), new=3)
    assert_stock_model(m)
    assert torch.equal(generate(m, inputs(family, BATCH)), stock(family, "sdpa", BATCH))
    with pytest.raises(RuntimeError, match="boom"), vtprune.apply(m, method, **opts):
        generate(m, inputs(family, BATCH), new=2)
        raise RuntimeError("boom")
    assert_stock_model(m)
    assert torch.equal(generate(m, inputs(family, BATCH)), stock(family, "sdpa", BATCH))


@functools.cache
def stock_decode_syncs(family: str) -> int:
    m = model(family, "sdpa")
    with torch.no_grad(), SyncDetector(m) as det:
        generate(m, inputs(family, BATCH))
    assert not det.of("prefill") and not det.of("decode")
    return len(det.of("decode", "other"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_host_sync_from_vtprune_in_the_decode_loop(family, method):
    m = model(family, "sdpa")
    stock_syncs = stock_decode_syncs(family)
    with vtprune.apply(m, method, **options(method, "prune")), torch.no_grad(), SyncDetector(m) as det:
        generate(m, inputs(family, BATCH))
    assert det.decode_calls == NEW - 1
    assert not det.of("decode"), "vtprune synced in the decode loop:\n" + "\n".join(map(str, det.of("decode")))
    assert len(det.of("decode", "other")) <= stock_syncs


# ---------------------------------------------------------------- accelerate's device map
@functools.cache
def dispatched(family: str):
    """The family's model dispatched by accelerate over a device map that puts each decoder layer on its own
    entry (all on the CPU here), with accelerate's hooks forced onto every module as on several GPUs."""
    from accelerate import dispatch_model

    m = FAMILIES[family].build("sdpa")
    lm = "model.language_model"
    layers = [f"{lm}.layers.{i}" for i in range(len(m.model.language_model.layers))]
    rest = [f"{lm}.{n}" for n, _ in m.model.language_model.named_children() if n != "layers"]
    rest += [f"model.{n}" for n, _ in m.model.named_children() if n != "language_model"] + ["lm_head"]
    rest += [f"model.{n}" for n, _ in m.model.named_parameters(recurse=False)]  # e.g. NeXT's image_newline
    dispatch_model(m, device_map=dict.fromkeys(layers + rest, "cpu"), force_hooks=True)
    assert all(hasattr(layer, "_hf_hook") for layer in m.model.language_model.layers)
    return m


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vtprune_composes_with_accelerate_device_map_hooks(family, method):
    m = dispatched(family)
    assert any(hasattr(mod, "_hf_hook") for mod in m.modules())  # accelerate's hooks are attached
    stocks = generate(m, inputs(family, BATCH))
    assert torch.equal(stocks, stock(family, "sdpa", BATCH))
    with vtprune.apply(m, method, **options(method, "keep_all")):
        assert torch.equal(generate(m, inputs(family, BATCH)), stocks)
    with vtprune.apply(m, method, **options(method, "prune")) as run:
        together = generate(m, inputs(family, BATCH))
        alone = [generate(m, inputs(family, (i,)))[0] for i in BATCH]
    assert all(torch.equal(a, together[i]) for i, a in enumerate(alone))
    device = next(m.parameters()).device
    assert run.gen.visual_index.device == device and run.gen.cache_visual[-1].device == device
    assert torch.equal(generate(m, inputs(family, BATCH)), stocks)  # stock again, accelerate's hooks intact
    assert any(hasattr(mod, "_hf_hook") for mod in m.modules())
