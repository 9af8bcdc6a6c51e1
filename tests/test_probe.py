"""The migration probe (scripts/probe_migration.py): it reads the question tokens' hidden states counted from
the end of the sequence (the same as the model's own hidden states unpruned, shorter sequences under
pruning), and its linear probe finds a planted signal and not an absent one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, N_VISUAL, import_script, left_pad, make_prompt, tiny_llava


@pytest.fixture(scope="module")
def probe():
    return import_script("probe_migration")


def _inputs(n: int, planted: np.ndarray | None = None, seed: int = 0, question: int = 5) -> list[dict]:
    """Batches of 4 tiny-LLaVA inputs with the same prompt; ``planted`` shifts the pixels of label-1 images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, 4):
        k = min(4, n - i)
        ids, mask = left_pad([make_prompt(3, question, 7)] * k)
        pix = torch.randn(k, 3, 32, 32, generator=g)
        if planted is not None:
            pix[:, 0] += 1.5 * torch.as_tensor(planted[i : i + k], dtype=torch.float32).view(-1, 1, 1)
        out.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pix})
    return out


def test_question_states_are_the_models_own_hidden_states_and_shorter_under_pruning(probe):
    model = tiny_llava(layers=6)
    batches = _inputs(4)
    layers = [3, 4]  # (not the last layer: the model's last hidden state is after the final norm)
    st = probe.question_states(model, batches, "none", layers, IMAGE_TOKEN, visual=True)
    assert st["mean"].shape == st["last"].shape == (4, 2, 64) and st["visual"].shape == (4, 64)
    with torch.no_grad():
        hs = model(**batches[0], output_hidden_states=True).hidden_states
    n_question = 2 + 5  # the two tokens after the image of make_prompt, then the question
    for j, layer in enumerate(layers):  # hidden_states[l + 1] is the output of decoder layer l
        torch.testing.assert_close(torch.from_numpy(st["mean"][:, j]), hs[layer + 1][:, -n_question:].mean(1))
        torch.testing.assert_close(torch.from_numpy(st["last"][:, j]), hs[layer + 1][:, -1])
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(torch.from_numpy(st["visual"]), hs[0][ids == IMAGE_TOKEN].view(4, N_VISUAL, -1).mean(1))
    np.testing.assert_allclose(st["equivalent_budget"], N_VISUAL)
    # ParVTS keeps 4 of 16 after its discard layer 3: other states, a smaller equivalent budget
    par = probe.question_states(model, batches, "parvts:discard_layer=3@4", layers, IMAGE_TOKEN)
    assert par["mean"].shape == (4, 2, 64) and (par["equivalent_budget"] < N_VISUAL).all()
    assert not np.allclose(par["mean"], st["mean"], atol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        probe.question_states(model, batches, "none", [6], IMAGE_TOKEN)


def test_probe_finds_a_planted_signal_and_not_an_absent_one(probe):
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    y = np.where(x[:, 0] + 0.3 * rng.normal(size=400) > 0, "a", "b")
    r = probe.fit_probe(x[:300], y[:300], x[300:], y[300:])
    assert r["accuracy"] > 0.85 and r["n"] == 100 and r["low"] < r["accuracy"] < r["high"]
    noise = rng.permutation(y)
    assert probe.fit_probe(x[:300], noise[:300], x[300:], noise[300:])["accuracy"] < 0.7
    # end to end on a tiny model: images with a planted shift are told apart from the question tokens
    labels = np.array([0, 1] * 20)
    model = tiny_llava(layers=6)
    st = probe.question_states(model, _inputs(40, labels, seed=1), "none", [3], IMAGE_TOKEN)
    assert probe.fit_probe(st["mean"][:28, 0], labels[:28], st["mean"][28:, 0], labels[28:])["accuracy"] >= 0.9
    with pytest.raises(ValueError, match="2 or more classes"):
        probe.fit_probe(x[:10], ["a"] * 10, x[10:20], ["a"] * 10)
