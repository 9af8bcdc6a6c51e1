"""Hub kernels (transformers' ``use_kernels``, the ``kernels`` package) and vtprune (vtprune.models.loading).

vtprune's own loads attach none, on every supported transformers (5.25 made ``use_kernels=True`` the
default of ``from_pretrained``; 5.17, the oldest, defaults to none and accepts the keyword): this file also
runs on the oldest transformers (``make test-oldest``). ``vtprune.apply`` refuses a model whose hooked
modules (decoder layers, attention modules) a hub kernel replaced, and accepts kernels elsewhere (norms).
The kernels are real ``kernels.kernelize`` replacements from a local repository whose layer computes what
the stock layer computes (nothing is downloaded); they need the ``kernels`` package (transformers >= 5.25).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import batch, make_prompt, tiny_checkpoint
from transformers import AutoModelForImageTextToText

import vtprune
from vtprune.inputs import load_model
from vtprune.models.loading import HUB_KERNELS_ENV, hub_kernels_off_by_default

HAS_KERNELS = importlib.util.find_spec("kernels") is not None
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="no `kernels` package (transformers < 5.25)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def kernels_default(monkeypatch):
    """transformers' own default: ``USE_HUB_KERNELS`` unset."""
    monkeypatch.delenv(HUB_KERNELS_ENV, raising=False)


def stock_default_attaches_kernels() -> bool:
    """Whether this transformers' ``from_pretrained`` attaches hub kernels by default (5.25 and later)."""
    import inspect

    from transformers import PreTrainedModel

    return HAS_KERNELS and "reset_kernels" in dict(inspect.getmembers(PreTrainedModel))


def test_load_model_attaches_no_hub_kernels(checkpoint, kernels_default):
    model, processor = load_model(str(checkpoint), torch.float32, "cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert not model.use_kernels
    if stock_default_attaches_kernels():  # what the keyword changes: the stock default load has them
        assert AutoModelForImageTextToText.from_pretrained(checkpoint).use_kernels


def test_hub_kernels_off_by_default_for_loads_vtprune_does_not_write(checkpoint, kernels_default, monkeypatch):
    with hub_kernels_off_by_default():
        assert os.environ[HUB_KERNELS_ENV] == "0"
        assert not AutoModelForImageTextToText.from_pretrained(checkpoint).use_kernels
    assert HUB_KERNELS_ENV not in os.environ  # unset again
    with pytest.raises(RuntimeError, match="inside"), hub_kernels_off_by_default():
        raise RuntimeError("inside")
    assert HUB_KERNELS_ENV not in os.environ
    monkeypatch.setenv(HUB_KERNELS_ENV, "1")  # the user's choice is kept
    with hub_kernels_off_by_default():
        assert os.environ[HUB_KERNELS_ENV] == "1"
    assert os.environ[HUB_KERNELS_ENV] == "1"


# ------------------------------------------------------------------------------ models loaded with kernels
class _LocalRepository:
    """A kernels repository (``kernels``' ``RepositoryProtocol``: ``load()`` returns the layer class) whose
    layer runs the stock class's own forward: a kernel that computes what the stock layer computes."""

    def __init__(self, stock: type[torch.nn.Module]):
        self.stock = stock

    def load(self) -> type[torch.nn.Module]:
        return type(f"Hub{self.stock.__name__}", (torch.nn.Module,), {"forward": self.stock.forward})

    def __str__(self) -> str:
        return f"local/{self.stock.__name__}"


def load_with_kernels(checkpoint, monkeypatch, stock: type[torch.nn.Module]):
    """``from_pretrained(checkpoint, use_kernels=True)`` on CPU with a kernel for ``stock`` (marked for hub
    kernels as transformers marks its norms, for this test only), the way a user's load attaches them."""
    from kernels import Device, use_kernel_mapping

    name = getattr(stock, "kernel_layer_name", None) or f"VTPruneTest{stock.__name__}"
    monkeypatch.setattr(stock, "kernel_layer_name", name, raising=False)
    with use_kernel_mapping({name: {Device(type="cpu"): _LocalRepository(stock)}}):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, use_kernels=True)
    model.generation_config.eos_token_id = None
    return model


def generate(model):
    inputs = batch([make_prompt(3, 4, 1), make_prompt(5, 2, 2)])
    return model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)


@needs_kernels
def test_apply_refuses_a_model_whose_decoder_layers_a_hub_kernel_replaced(checkpoint, kernels_default, monkeypatch):
    from kernels import get_kernelized_layers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = load_with_kernels(checkpoint, monkeypatch, LlamaDecoderLayer)
    assert "model.language_model.layers.0" in get_kernelized_layers(model).layers
    with pytest.raises(ValueError, match=r"hub kernels replaced the forward of modules vtprune hooks: "
                                         r"model\.language_model\.layers\.0 \(local/LlamaDecoderLayer\), .*"
                                         r"use_kernels=False"):
        vtprune.apply(model, "fastv", budget=4)
    layer = model.model.language_model.layers[0]
    assert not layer._forward_pre_hooks and "generate" not in model.__dict__  # nothing attached
    # the fix the message names: the stock forwards back, and the run attaches
    model.use_kernels = False
    assert not get_kernelized_layers(model).layers
    stock = generate(model)
    with vtprune.apply(model, "none"):
        assert torch.equal(generate(model), stock)


@needs_kernels
def test_apply_accepts_hub_kernels_on_other_layers(checkpoint, kernels_default, monkeypatch):
    """A kernel on the norms (transformers' ``RMSNorm`` mapping) leaves what vtprune hooks as it was: with
    nothing pruned the run computes what the kernelized model computes, and pruning runs."""
    from kernels import get_kernelized_layers
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = load_with_kernels(checkpoint, monkeypatch, LlamaRMSNorm)
    kernelized = get_kernelized_layers(model).layers
    assert "model.language_model.layers.0.input_layernorm" in kernelized and "model.language_model.norm" in kernelized
    stock = generate(model)
    with vtprune.apply(model, "none"):
        assert torch.equal(generate(model), stock)
    with vtprune.apply(model, "fastv", budget=4, layer=2) as run:
        generate(model)
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == [16, 16, 4, 4, 4, 4]
