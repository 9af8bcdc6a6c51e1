"""scripts/profile_prefill.py's in-model accounting: the LayerTimer sees every decoder layer's prefill call
at the tokens the method leaves it, changes no output, and leaves the layers as they were; --cases selects
a bench's cases or names the ones it has. (What it measures, the time, is not asserted.)"""

from __future__ import annotations

import pytest
import torch
from conftest import N_VISUAL, batch, import_script, make_prompt

import vtprune


@pytest.fixture(scope="module")
def script():
    return import_script("profile_prefill")


def prefill(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)


def test_layer_timer_records_every_layer_at_the_tokens_fastv_leaves(script, model):
    layers = model.model.language_model.layers
    inputs = batch([make_prompt(3, 5, 1)])
    s = inputs["input_ids"].shape[1]
    stock = prefill(model, inputs)
    timer = script.LayerTimer(layers)
    with vtprune.apply(model, "fastv", budget=4, layer=2), timer:
        pruned_timed = prefill(model, inputs)
    with vtprune.apply(model, "fastv", budget=4, layer=2):
        pruned = prefill(model, inputs)
    n = len(layers)
    prefill_calls = [c for c in timer.calls if c[1] > 1]
    assert [i for i, _, _ in prefill_calls] == list(range(n))
    assert [t for _, t, _ in prefill_calls] == [s] * 2 + [s - N_VISUAL + 4] * (n - 2)
    assert [t for _, t, _ in timer.calls[n:]] == [1] * n  # the one decode step: one token per layer
    assert all(ms >= 0 for _, _, ms in timer.calls)
    assert torch.equal(pruned_timed.sequences, pruned.sequences)
    assert torch.equal(pruned_timed.scores[0], pruned.scores[0])
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward again
    assert torch.equal(prefill(model, inputs).scores[0], stock.scores[0])


def test_layer_timer_restores_the_layers_when_the_forward_raises(script, model):
    layers = model.model.language_model.layers
    with pytest.raises(RuntimeError), script.LayerTimer(layers):
        layers[0](torch.zeros(1, 3, 5))  # wrong hidden size
    assert all("forward" not in vars(layer) for layer in layers)


def test_cases_select_a_subset_with_stock_first_and_name_what_the_bench_has(script):
    cases = [{"name": n} for n in ("stock", "none", "parvts@64", "st3@64")]
    assert [c["name"] for c in script.select_cases(cases, "st3@64, none")] == ["stock", "none", "st3@64"]
    with pytest.raises(SystemExit, match=r"fastv@64: not in the bench JSON, which has stock,none,parvts@64,st3@64"):
        script.select_cases(cases, "none,fastv@64")
