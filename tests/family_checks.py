"""Helpers the family test files share: greedy generation, the vision tower's eager attention (the saliency
reference), the input of decoder layer 0, a spy on what each decoder layer receives, a prompt one image token
short. The checks every family runs are parametrised tests over a per-family table in
``test_family_invariants.py``."""

from __future__ import annotations

import functools

import torch
from conftest import IMAGE_TOKEN


def generate(model, x, new: int) -> torch.Tensor:
    return model.generate(**x, do_sample=False, max_new_tokens=new)[:, -new:]


def eager_tower_attentions(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The vision tower's attention probabilities of every layer, [n_tiles, heads, T, T] each, from the tower
    run eagerly with ``output_attentions`` (the reference the adapters' saliency is checked against)."""
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return tower(pixel_values, output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = impl


def layer0_input(model, x: dict) -> torch.Tensor:
    """The hidden states decoder layer 0 receives in a direct forward of ``x`` ([B, S', d]): under a run,
    after the engine's own layer-0 hook (the spy is registered after it)."""
    seen = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**x)
    finally:
        handle.remove()
    return seen[0]


def one_image_token_short(input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids`` [1, S] without its first image token ([1, S - 1]): a prompt that disagrees with its image."""
    first = int((input_ids[0] == IMAGE_TOKEN).nonzero()[0])
    return torch.cat([input_ids[:, :first], input_ids[:, first + 1:]], 1)


class LayerSpy:
    """What each decoder layer receives (after vtprune's own pre-hook), per call: layer, attention mask,
    (cos, sin), position ids, and under ``run`` in the prefill the layout's index. A context manager; the
    first ``layers`` calls (:meth:`prefill`) are the prefill's."""

    def __init__(self, model, run=None):
        self.run, self.calls = run, []
        self.layers = len(model.model.language_model.layers)
        self.handles = [layer.register_forward_pre_hook(functools.partial(self._pre, i), with_kwargs=True)
                        for i, layer in enumerate(model.model.language_model.layers)]

    def _pre(self, layer, module, args, kwargs):
        mask, (cos, sin), pos = kwargs.get("attention_mask"), kwargs["position_embeddings"], kwargs.get("position_ids")
        index = self.run.gen.layout.index.clone() if self.run is not None and self.run.gen.phase == "prefill" else None
        self.calls.append(dict(layer=layer, mask=None if mask is None else mask.clone(), cos=cos.clone(),
                               sin=sin.clone(), pos=None if pos is None else pos.clone(), index=index))

    def prefill(self) -> list[dict]:
        return self.calls[:self.layers]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
