"""Checks that the family test files share (positions, decode positions, per-layer counts, mixed-size batches),
each given the family's tiny model and inputs; what differs between families (token counts, grids, saliency)
stays in the family's own file."""

from __future__ import annotations

import torch
from conftest import cache_keyword, output_cache

import vtprune


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


def check_original_positions(model, x: dict, n_visual: int, layer: int = 4) -> None:
    """FastV (budget 6 from layer 2) on a left-padded batch: decoder layer ``layer`` gets the stock 1-D
    positions (and their RoPE cos) at the kept tokens' original indices in the prefill, and the prompt's
    last position + t at decode step t."""
    seen: list = []

    def spy(module, args, kwargs):
        seen.append((kwargs["position_ids"].clone(), kwargs["position_embeddings"][0].clone()))

    with vtprune.apply(model, "fastv", budget=6, layer=2) as run:
        handle = model.model.language_model.layers[layer].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            generate(model, x, 3)
        finally:
            handle.remove()
    index = run.gen.layouts[layer].index
    assert index.shape[1] == x["input_ids"].shape[1] - n_visual * run.gen.n_images + 6 * run.gen.n_images
    stock = (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # generate's positions for a left-padded batch
    pos, cos = seen[0]
    assert torch.equal(pos, torch.gather(stock, 1, index))
    full_cos, _ = model.model.language_model.rotary_emb(torch.zeros(1, 1, cos.shape[-1]), stock)
    assert torch.allclose(cos, torch.gather(full_cos, 1, index[..., None].expand(-1, -1, cos.shape[-1])))
    for t, (pos, _) in enumerate(seen[1:], start=1):
        assert torch.equal(pos, stock[:, -1:] + t), f"decode step {t}"


def check_hand_written_decode_loop(model, x: dict) -> None:
    """A decode loop without ``generate`` or position_ids after ParVTS shortened layer 0's cache gives what
    ``generate`` gives: the adapter's decode positions (stock cache length + step) are the stock ones."""
    with vtprune.apply(model, "parvts", budget=6, discard_layer=2):
        expected = generate(model, x, 5)
        with torch.no_grad():
            out = model(**x, use_cache=True)
            cache, tokens = output_cache(out), [out.logits[:, -1].argmax(-1)]
            for _ in range(4):
                out = model(input_ids=tokens[-1][:, None], use_cache=True, **{cache_keyword(model): cache})
                tokens.append(out.logits[:, -1].argmax(-1))
    assert cache.get_seq_length() < x["input_ids"].shape[1] + 4  # layer 0's cache was shortened
    assert torch.equal(torch.stack(tokens, 1), expected)


def check_fastv_counts_and_kv_lengths(model, x: dict, n_visual: int, new: int, layers: int) -> None:
    """FastV (budget 10 from layer 3): visual tokens per layer in prefill and decode, KV entries per layer."""
    s = x["input_ids"].shape[1]
    with vtprune.apply(model, "fastv", budget=10, layer=3) as run:
        generate(model, x, new)
    sample = run.report()["samples"][0]
    assert sample["visual_tokens_in"] == n_visual
    counts = [n_visual] * 3 + [10] * (layers - 3)
    assert sample["visual_tokens_per_layer_prefill"] == counts
    assert sample["visual_tokens_per_layer_last_decode"] == counts
    assert run.report()["kv_cache"]["entries_per_layer"] == [s - n_visual + c + new - 1 for c in counts]


def check_parvts_subjects(model, x: dict, n_visual: int, new: int, layers: int) -> torch.Tensor:
    """ParVTS (budget 10, discard at layer 3): counts, KV lengths, and the kept tokens are the top-10 by the
    adapter's saliency. Returns the kept positions among each image's tokens, LongTensor [B, I, 10]."""
    s = x["input_ids"].shape[1]
    with vtprune.apply(model, "parvts", budget=10, discard_layer=3) as run:
        generate(model, x, new)
    r = run.report()
    assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [n_visual] * 3 + [10] * (layers - 3)
    assert r["kv_cache"]["entries_per_layer"] == [s - n_visual + 10 + new - 1] * layers
    top = torch.topk(run.gen.saliency, 10, dim=-1).indices.sort(-1).values
    assert torch.equal(run.gen.cache_visual[-1], torch.gather(run.gen.visual_index, 2, top))
    return top


def check_mixed_batch_runs_as_groups(model, inputs, prompts, sizes, method: str, opts: dict, counts, groups) -> None:
    """A ``generate`` batch whose images give different token counts runs as ``groups`` of alike samples and
    gives what each sample gives alone (``inputs(prompts, sizes, seed)`` builds the family's inputs; seeds
    so that a sample alone has the same image as in the batch); with ``none`` it equals the stock batch."""
    x = inputs(prompts, sizes)
    with vtprune.apply(model, method, **opts) as run:
        together = generate(model, x, 4)
        report = run.report()
        assert [s["visual_tokens_in"] for s in report["samples"]] == counts
        assert report["timing"]["groups"] == groups
        for b in range(len(sizes)):
            one = inputs([prompts[b]], [sizes[b]], seed=10 * b)
            assert torch.equal(generate(model, one, 4)[0], together[b]), f"sample {b}"
    if method == "none":  # the stock model batches mixed sizes itself: the groups give its output
        assert torch.equal(generate(model, x, 4), together)
