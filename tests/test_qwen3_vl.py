"""Qwen3-VL's own through the engine (a tiny random-weight ``Qwen3VLForConditionalGeneration``): DeepStack
injections that follow the kept tokens, interleaved M-RoPE and 4-row position ids kept at the original
positions, and the refusal of a config the engine cannot make exact. What Qwen3-VL shares with Qwen2-VL
(positions against the stock model, counts, KV lengths, saliency, spans, mixed sizes, video refusal) runs in
test_qwen2_vl.py; keep-all = stock and batched = one by one for every method in test_conformance.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from qwen_tiny import DEEPSTACK, N_VISUAL, batch, make_prompt, tiny_qwen

import vtprune

NEW = 4
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]
LEVELS = len(DEEPSTACK)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_qwen("qwen3_vl")


def generate(model, inputs, new: int = NEW) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, -new:]


class Spy:
    """What each decoder layer of the prefill receives (after vtprune's own pre-hook: hidden states,
    position embeddings, text position ids, and the layout's index / group under ``run``) and returns."""

    def __init__(self, model, run=None):
        self.run, self.inputs, self.outputs = run, {}, {}
        layers = model.model.language_model.layers
        self.handles = [h for i, layer in enumerate(layers) for h in (
            layer.register_forward_pre_hook(functools.partial(self._pre, i), with_kwargs=True),
            layer.register_forward_hook(functools.partial(self._post, i)))]

    def _pre(self, layer, module, args, kwargs):
        if layer in self.inputs:  # decode steps
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        lay = self.run.gen.layout if self.run is not None else None
        self.inputs[layer] = dict(hidden=hidden.clone(), cos=kwargs["position_embeddings"][0].clone(),
                                  pos=kwargs["position_ids"].clone(),
                                  index=None if lay is None else lay.index.clone(),
                                  group=None if lay is None or lay.group is None else lay.group.clone())

    def _post(self, layer, module, args, output):
        self.outputs.setdefault(layer, output.clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def deepstack_by_token(model, inputs) -> list[torch.Tensor]:
    """Per level, FloatTensor [B, S, d]: each visual token's DeepStack feature at its prompt position (zero
    elsewhere), computed from the tower's own output outside the engine."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    mask = ids == model.config.image_token_id
    levels = []
    for level in out.deepstack_features:  # per image (transformers >= 5.2x) or all images in one tensor
        level = torch.cat(level) if isinstance(level, list | tuple) else level
        full = torch.zeros(*ids.shape, level.shape[-1])
        full[mask] = level
        levels.append(full)
    return levels


def test_the_tiny_model_uses_its_deepstack_levels(model):
    """Without its DeepStack injections the tiny model generates something else: the tests below can see
    a wrong injection."""
    inputs = batch(PROMPTS)
    stock = generate(model, inputs, new=8)
    lm = model.model.language_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm, "_deepstack_process", lambda hidden, mask, embeds: hidden)
        assert not torch.equal(generate(model, inputs, new=8), stock)


@pytest.mark.parametrize("method,opts", [("none", {}), ("parvts", {"budget": N_VISUAL}), ("fastv", {"budget": N_VISUAL})])
def test_keep_all_layer_inputs_equal_stock(model, method, opts):
    """Nothing pruned: every prefill layer's input (the DeepStack sums included) is the stock model's, bit
    for bit."""
    inputs = batch(PROMPTS)
    with Spy(model) as stock:
        generate(model, inputs)
    with vtprune.apply(model, method, **opts) as run, Spy(model, run) as spy:
        generate(model, inputs)
    for layer, seen in stock.inputs.items():
        assert torch.equal(spy.inputs[layer]["hidden"], seen["hidden"]), f"layer {layer}"


PRUNING = [("random", {"budget": 4}), ("fastv", {"budget": 4, "layer": 1}), ("parvts", {"budget": 4}),
           ("visionzip", {"budget": 5}), ("st3", {"start_layer": 1, "stride": 1, "ratio": 0.3})]


@pytest.mark.parametrize("method,opts", PRUNING)
def test_deepstack_injections_follow_the_kept_tokens(model, method, opts):
    """Before layer i = 1 .. n_levels, each slot holding visual token t gets exactly t's level-(i - 1) feature
    added to what layer i - 1 returned for t (by hand from the tower's own features), wherever t sits in
    the (pruned, packed) sequence; every other slot, PAD slots of packed paths included, gets nothing; a
    token pruned before layer i is in no slot, so none of its later levels reach the model."""
    inputs = batch(PROMPTS)
    features = deepstack_by_token(model, inputs)
    ids = inputs["input_ids"]
    with vtprune.apply(model, method, **opts) as run, Spy(model, run) as spy:
        generate(model, inputs)
    pruned_before_an_injection = False
    for layer in range(1, LEVELS + 1):
        before, now = spy.inputs[layer - 1], spy.inputs[layer]
        out = spy.outputs[layer - 1]  # on the sequence of layout `before`
        feature = features[layer - 1]
        for b in range(ids.shape[0]):
            visual = ids[b, now["index"][b]] == model.config.image_token_id
            if now["group"] is not None:
                visual &= now["group"][b] >= 0  # a PAD slot's index (0) means nothing
            for j in visual.nonzero().flatten().tolist():
                t = int(now["index"][b, j])
                (src,) = (before["index"][b] == t).nonzero().flatten().tolist()  # a visual token sits in one slot
                assert torch.equal(now["hidden"][b, j], out[b, src] + feature[b, t]), (layer, b, t)
        kept = {int(t) for t in now["index"][0] if ids[0, t] == model.config.image_token_id}
        pruned_before_an_injection |= len(kept) < N_VISUAL
        same = torch.equal(before["index"], now["index"]) and (
            (before["group"] is None and now["group"] is None)
            or (before["group"] is not None and now["group"] is not None and torch.equal(before["group"], now["group"])))
        if same:  # nothing acted at this layer: the injection is the whole difference, zero outside visual slots
            visual = ids.gather(1, now["index"]) == model.config.image_token_id
            if now["group"] is not None:
                visual &= now["group"] >= 0
                assert (now["group"] < 0).any() == (method == "parvts")  # packed paths of 3 lengths: PAD slots
            delta = now["hidden"] - out
            assert torch.equal(delta[~visual], torch.zeros_like(delta[~visual])), layer
            assert (delta[visual].abs().sum(-1) > 0).all(), layer
    assert pruned_before_an_injection  # the case in question was exercised


def interleaved_cos(model, positions: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's rotary cos for M-RoPE positions [3, n] (t, h, w), by hand: frequency k of the rotary half
    turns with the h position where k % 3 == 1 and k < 3 * section_h, with w where k % 3 == 2 and
    k < 3 * section_w, with t elsewhere (the interleaved layout of Qwen3-VL, not Qwen2-VL's contiguous
    sections). Returns [n, head_dim]."""
    rotary = model.model.language_model.rotary_emb
    inv_freq = rotary.inv_freq.float()
    sections = rotary.mrope_section
    k = torch.arange(inv_freq.numel())
    axis = torch.zeros_like(k)
    axis[(k % 3 == 1) & (k < 3 * sections[1])] = 1
    axis[(k % 3 == 2) & (k < 3 * sections[2])] = 2
    angle = positions[axis].T.float() * inv_freq  # [n, head_dim / 2]
    return torch.cat([angle.cos(), angle.cos()], dim=-1)


@pytest.mark.parametrize("method,opts", [("random", {"budget": 4}), ("fastv", {"budget": 5, "layer": 2}),
                                         ("parvts", {"budget": 4})])
def test_kept_tokens_keep_their_interleaved_mrope_and_text_positions(model, method, opts):
    """``generate`` hands the language model 4-row position ids (row 0 text, rows 1-3 the M-RoPE (t, h, w));
    every prefill layer sees, at each kept token, row 0 as its position ids and the interleaved rotary of
    rows 1-3 (computed by hand), at the token's original positions."""
    inputs = batch(PROMPTS)
    seen: dict = {}

    def record(module, args, kwargs):
        seen.setdefault("position_ids", kwargs["position_ids"].clone())

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with vtprune.apply(model, method, **opts) as run, Spy(model, run) as spy:
            generate(model, inputs)
    finally:
        handle.remove()
    pos = seen["position_ids"]
    s = inputs["input_ids"].shape[1]
    assert pos.shape == (4, 3, s)
    mrope, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])
    valid = inputs["attention_mask"].bool()
    assert torch.equal(pos[1:][:, valid], mrope[:, valid])
    assert torch.equal(pos[0][valid], (inputs["attention_mask"].cumsum(-1) - 1)[valid])
    visual = run.gen.visual_index[0, 0]
    assert len({int(h) for h in mrope[1, 0, visual]}) > 1 and len({int(w) for w in mrope[2, 0, visual]}) > 1
    shortened = False
    for layer, got in spy.inputs.items():
        index = got["index"]
        shortened |= index.shape[1] < s
        assert torch.equal(got["pos"], torch.gather(pos[0], 1, index)), layer
        for b in range(3):
            real = valid[b, index[b]]
            if got["group"] is not None:
                real &= got["group"][b] >= 0
            want = interleaved_cos(model, mrope[:, b, index[b, real]])
            assert torch.allclose(got["cos"][b, real], want, atol=1e-5), (layer, b)
    assert shortened


def test_a_config_with_a_deepstack_level_past_the_last_layer_is_refused():
    small = tiny_qwen("qwen3_vl", layers=LEVELS)
    with pytest.raises(ValueError, match=r"3 DeepStack levels .* for 3 decoder layers"):
        vtprune.apply(small, "fastv", budget=4, layer=1)
    assert not small._forward_pre_hooks
