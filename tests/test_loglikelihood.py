"""Forward calls outside ``generate`` under every method (what a log-likelihood scorer such as lmms-eval's
``loglikelihood`` does): the logits come back at every prompt position (:mod:`vtprune.engine.outputs`), for
every registered method on every model family (fed by the registry and ``families.FAMILIES``):

* keep-all = stock: with the method's ``examples["keep_all"]`` the logits (and a loss from ``labels``) are
  the stock model's exactly, [B, S, V];
* with pruning (``examples["prune"]``): [B, S, V], NaN rows exactly at the visual tokens the last decoder
  layer no longer holds, finite rows at every other real token; the loss the model computes from labels on
  the text is the cross-entropy of those logits;
* batched = one by one at the positions each sample keeps (left padding);
* ``use_cache=False`` (no KV cache at all) gives what ``use_cache=True`` gives;
* inside ``generate`` nothing is put back (it reads the last position only): its first-step logits are the
  forward's last position.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES
from test_conformance import BATCH, METHODS, inputs, model, options

import vtprune
from vtprune.engine.layout import Layout
from vtprune.engine.outputs import restore_lm_output, restore_positions

pytestmark = pytest.mark.usefixtures("one_thread")



def labels_of(x: dict) -> torch.Tensor:
    """Labels on each sample's last token (text: every standard prompt ends with its question), -100 elsewhere."""
    labels = torch.full_like(x["input_ids"], -100)
    labels[:, -1] = x["input_ids"][:, -1]
    return labels


def forward(m, x: dict, **kwargs):
    with torch.no_grad():
        return m(**x, **kwargs)


@functools.cache
def stock(family: str, idx: tuple[int, ...]):
    x = inputs(family, idx)
    return forward(model(family, "sdpa"), x, labels=labels_of(x))


def under(family: str, method: str, kind: str, idx: tuple[int, ...] = BATCH, **kwargs):
    """The forward's output under the method and the original indices the last decoder layer held, [B, n]."""
    m, x = model(family, "sdpa"), inputs(family, idx)
    with vtprune.apply(m, method, **options(method, kind)) as run:
        out = forward(m, x, labels=labels_of(x), **kwargs)
    layout = run.gen.layouts[-1]
    assert layout is not None and layout.group is None
    return out, layout.index, run


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_keeping_every_token_gives_the_stock_logits(family, method):
    out, _, _ = under(family, method, "keep_all")
    ref = stock(family, BATCH)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_forward_returns_every_position(family, method):
    x = inputs(family, BATCH)
    out, kept, run = under(family, method, "prune")
    batch, length = x["input_ids"].shape
    assert out.logits.shape == (batch, length, stock(family, BATCH).logits.shape[-1])
    held = torch.zeros(batch, length, dtype=torch.bool).scatter_(1, kept, True)
    visual = torch.zeros(batch, length, dtype=torch.bool).scatter_(1, run.gen.visual_index.flatten(1), True)
    assert not (~held & ~visual).any()  # only visual tokens are ever pruned
    if method != "none":
        assert (~held).any()  # the example prunes
    nan_rows = out.logits.isnan().all(-1)
    assert torch.equal(nan_rows, ~held)
    real = x["attention_mask"].bool()
    assert torch.isfinite(out.logits[held & real]).all()
    # the model's loss is computed from these logits (labels on the last token: predicted at a text position)
    expected = F.cross_entropy(out.logits[:, -2].float(), x["input_ids"][:, -1])
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_equals_one_by_one_at_the_kept_positions(family, method):
    together, _, _ = under(family, method, "prune")
    real = inputs(family, BATCH)["attention_mask"].bool()
    for i in BATCH:
        alone, _, _ = under(family, method, "prune", (i,))
        mine = together.logits[i][real[i]]
        assert torch.equal(mine.isnan(), alone.logits[0].isnan()), f"sample {i}: other tokens pruned"
        # a forward without position_ids numbers a left-padded sample from its padding on (stock does too):
        # RoPE is relative, so the same up to rounding
        torch.testing.assert_close(mine, alone.logits[0], equal_nan=True, rtol=1e-4, atol=1e-4, msg=f"sample {i}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_without_a_kv_cache(family, method):
    with_cache, _, _ = under(family, method, "prune", use_cache=True)
    without, _, run = under(family, method, "prune", use_cache=False)
    torch.testing.assert_close(without.logits, with_cache.logits, equal_nan=True, rtol=0, atol=0)
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"]  # reported without a cache too


@pytest.mark.parametrize("method", METHODS)
def test_generate_reads_the_last_position(method):
    """generate gets no restored output (its prefill keeps one position) and the same next-token logits."""
    m, x = model("llava", "sdpa"), inputs("llava", BATCH)
    out, _, _ = under("llava", method, "prune")
    with vtprune.apply(m, method, **options(method, "prune")), torch.no_grad():
        gen = m.generate(**x, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(gen.logits[0], out.logits[:, -1], rtol=1e-4, atol=1e-4)


def test_hidden_states_last_entry_is_restored():
    m, x = model("llava", "sdpa"), inputs("llava", BATCH)
    with vtprune.apply(m, "fastv", **options("fastv", "prune")) as run:
        out = forward(m, x, output_hidden_states=True)
    length = x["input_ids"].shape[1]
    assert out.hidden_states[-1].shape[:2] == (3, length)
    assert out.hidden_states[0].shape[1] == length  # the embeddings: every token
    assert out.hidden_states[-2].shape[1] == run.gen.layouts[-1].length  # a layer's own sequence, as in generate


def test_restore_positions():
    x = torch.arange(12.0).view(2, 3, 2)
    index = torch.tensor([[0, 2, 3], [1, 2, 3]])
    out = restore_positions(x, index, 4)
    assert out.shape == (2, 4, 2)
    assert torch.equal(out[0, [0, 2, 3]], x[0]) and out[0, 1].isnan().all()
    assert torch.equal(out[1, 1:], x[1]) and out[1, 0].isnan().all()


def test_restore_lm_output_refuses_what_it_cannot_place():
    hidden = torch.zeros(1, 3, 2)
    with pytest.raises(RuntimeError, match="packed paths"):
        restore_lm_output((hidden,), Layout(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 2]])), 4)
    with pytest.raises(RuntimeError, match="returned 3 positions but its last decoder layer held 2"):
        restore_lm_output((hidden,), Layout(torch.tensor([[0, 3]])), 4)
    assert restore_lm_output((hidden,), Layout(torch.tensor([[0, 1, 2]])), 3) is None  # nothing pruned
