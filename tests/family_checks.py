"""Helpers the family test files share: greedy generation, the vision tower's eager attention (the saliency
reference), the input of decoder layer 0. The checks every family runs are parametrised tests over a
per-family table in ``test_family_invariants.py``."""

from __future__ import annotations

import torch


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
