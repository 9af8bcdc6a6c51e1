"""Baselines (VTW, PDrop, VisionZip, random, pool): per-layer counts, selections and merges, errors.

Parity with the stock model when nothing is pruned and batched == one by one are in test_engine.py
(KEEP_ALL / PRUNING lists)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import N_VISUAL, batch, make_prompt

import vtprune
from vtprune.adapters import PatchGrid
from vtprune.engine.state import Generation
from vtprune.engine.view import GenerationView
from vtprune.methods import make_method
from vtprune.methods.pdrop import stages
from vtprune.methods.pool import pooled_grid, split_budget, window_centres
from vtprune.methods.visionzip import merge_contextual

PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]


def generate(model, inputs, new=8):
    return model.generate(**inputs, max_new_tokens=new, do_sample=False)[:, -new:]


def test_vtw_withdraws_every_visual_token_at_layer_k(model):
    inputs = batch(PROMPTS)
    s = inputs["input_ids"].shape[1]
    with vtprune.apply(model, "vtw", layer=4) as run:
        generate(model, inputs)
    r = run.report()
    assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 4 + [0] * 2
    assert r["samples"][0]["equivalent_budget"] == pytest.approx(4 * N_VISUAL / 6)
    assert r["kv_cache"]["entries_per_layer"] == [s + 7] * 4 + [s - N_VISUAL + 7] * 2


@pytest.mark.parametrize("target,layer", [(4, 2), (0, 0), (8, 3), (N_VISUAL, 6)])
def test_vtw_budget_picks_the_smallest_layer_meeting_the_equivalent_budget(target, layer):
    plan = make_method("vtw", budget=target).plan(6, N_VISUAL)
    assert plan.layer == layer  # K * 16 / 6 >= target, smallest such K


def test_pdrop_default_stages_and_counts(model):
    with vtprune.apply(model, "pdrop") as run:
        generate(model, batch(PROMPTS[:1]))
    assert run.plan.layers == (2, 3, 4)  # L/4, L/2, 3L/4 of 6 layers, rounded
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == [16, 16, 8, 4, 2, 2]


def test_pdrop_single_stage_selects_like_fastv(model):
    # one stage at layer 2 keeping half = FastV at K = 2 with budget 8 (same score: last query at layer 1)
    inputs = batch(PROMPTS)
    with vtprune.apply(model, "pdrop", layers=[2], ratio=0.5):
        a = generate(model, inputs)
    with vtprune.apply(model, "fastv", layer=2, budget=8):
        b = generate(model, inputs)
    assert torch.equal(a, b)


def test_pdrop_budget_solves_the_stage_ratio():
    plan = make_method("pdrop", budget=6, layers=[1, 3]).plan(6, N_VISUAL)
    assert sum(plan.per_layer) / 6 >= 6
    assert sum(stages(N_VISUAL, 6, [1, 3], plan.ratio - 1e-3)) / 6 < 6  # the most pruning that meets it


def _gen(hidden_dim=4, saliency=None, n=N_VISUAL, prefix=2, question=3):
    """A bare prefill Generation at layer 0 for one sample, one image of n tokens."""
    s = prefix + n + question
    vis = torch.arange(prefix, prefix + n)[None, None]
    text = torch.tensor([i for i in range(s) if not prefix <= i < prefix + n])[None]
    gen = Generation(visual_index=vis, text_index=text, valid=torch.ones(1, s, dtype=torch.bool), num_layers=2,
                     max_new_tokens=None)
    gen.hidden = torch.randn(1, s, hidden_dim, generator=torch.Generator().manual_seed(0))
    gen.saliency = saliency
    side = math.isqrt(n)
    gen.visual_grids = (PatchGrid(side, side),) if side * side == n else None
    return gen


def _act(m, gen):
    """Plan ``m`` for ``gen``'s image and apply its actions before the current prefill layer, as the run
    does; returns the plan."""
    plan = m.plan(gen.num_layers, gen.n_visual)
    for action in m.on_prefill_layer(GenerationView(gen), plan):
        action.apply(gen)
    return plan


def test_random_keeps_a_seeded_uniform_subset():
    picks = []
    for seed in (0, 0, 1):
        gen = _gen()
        m = make_method("random", budget=5, seed=seed)
        _act(m, gen)
        assert gen.visual.shape == (1, 1, 5)
        picks.append(gen.visual.flatten().tolist())
    assert picks[0] == picks[1] != picks[2]
    assert picks[0] == sorted(picks[0])


def test_pool_averages_windows_and_keeps_centre_positions():
    gen = _gen(saliency=None)
    emb = gen.hidden.clone()
    m = make_method("pool", budget=4)  # 4x4 grid -> 2x2
    _act(m, gen)
    # windows of 2x2 patches; centre patch = top-left of the 2x2 (rounded down)
    assert gen.visual.flatten().tolist() == [2 + p for p in (0, 2, 8, 10)]
    grid = emb[0, 2:18].view(4, 4, -1)
    slots = [gen.layout.index[0].tolist().index(i) for i in gen.visual.flatten().tolist()]
    for slot, (r, c) in zip(slots, [(0, 0), (0, 2), (2, 0), (2, 2)], strict=True):
        assert torch.allclose(gen.hidden[0, slot], grid[r:r + 2, c:c + 2].mean((0, 1)), atol=1e-6)
    assert gen.layout.length == 2 + 4 + 3  # prefix + pooled + question


@pytest.mark.parametrize("budget,h,w,grid", [(64, 24, 24, (8, 8)), (192, 24, 24, (12, 16)), (13, 14, 14, (3, 4)),
                                             (25, 14, 14, (5, 5)), (98, 14, 14, (7, 14)), (6, 4, 8, (2, 3))])
def test_pooled_grid(budget, h, w, grid):
    assert pooled_grid(budget, h, w) == grid


def test_window_centres_are_distinct_and_inside_their_windows():
    for h in range(1, 25):
        for a in range(1, h + 1):
            pos = window_centres(h, 1, a, 1).tolist()
            assert len(set(pos)) == a
            for i, p in enumerate(pos):
                assert (i * h) // a <= p < math.ceil((i + 1) * h / a)


def test_pool_splits_the_budget_over_grids_and_keeps_a_separator_per_row():
    gen = _gen(n=12)  # base 2x2 (tokens 0-3), then a 2x3 grid with a separator closing each row (4-11)
    base, hires = PatchGrid(2, 2), PatchGrid(2, 3, start=4, stride=4)
    gen.visual_grids = (base, hires)
    assert split_budget(6, gen.visual_grids) == [2, 4]  # least 1 + 2, spare 3 split 4:8
    emb = gen.hidden.clone()
    m = make_method("pool", budget=6)
    _act(m, gen)
    # base 2x2 -> 1x2 (columns); high-res 2x3 -> 1x3 (a * (b + 1) <= 4) + the separator of row 0
    assert gen.visual.flatten().tolist() == [2 + p for p in (0, 1, 4, 5, 6, 7)]
    vis = emb[0, 2:14]
    expected = [vis[[0, 2]].mean(0), vis[[1, 3]].mean(0), vis[[4, 8]].mean(0), vis[[5, 9]].mean(0),
                vis[[6, 10]].mean(0), vis[7]]
    for token, value in zip(gen.visual.flatten().tolist(), expected, strict=True):
        slot = gen.layout.index[0].tolist().index(token)
        assert torch.allclose(gen.hidden[0, slot], value, atol=1e-6)
    with pytest.raises(ValueError, match="below the 3"):
        split_budget(2, gen.visual_grids)


@pytest.mark.parametrize("method,reads", [("fastv", 0), ("parvts", 0), ("pool", 1)])
def test_patch_grids_are_asked_of_the_adapter_only_by_methods_that_read_them(model, monkeypatch, method, reads):
    from vtprune.adapters.llava import LlavaAdapter

    calls = []
    real = LlavaAdapter.visual_grids
    monkeypatch.setattr(LlavaAdapter, "visual_grids", lambda self, *a: calls.append(1) or real(self, *a))
    with vtprune.apply(model, method, budget=4) as run:
        generate(model, batch(PROMPTS[:1]), new=2)
    assert len(calls) == reads
    assert run.gen.visual_grid == (4, 4) and len(calls) == 1  # read on demand, then kept


def test_pool_refuses_tokens_that_form_no_grid():
    gen = _gen(n=15)
    m = make_method("pool", budget=4)
    with pytest.raises(ValueError, match="do not form known patch grids"):
        _act(m, gen)


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest():
    sal = torch.arange(N_VISUAL, dtype=torch.float)[None, None]  # the last tokens are the most salient
    gen = _gen(saliency=sal)
    emb = gen.hidden.clone()
    m = make_method("visionzip", budget=6, contextual=2)
    _act(m, gen)
    kept = gen.visual.flatten().tolist()
    assert len(kept) == 6
    dominant = [2 + p for p in range(12, 16)]
    assert set(dominant) <= set(kept)
    row = gen.layout.index[0].tolist()
    for p in dominant:  # dominant tokens keep their embeddings
        assert torch.equal(gen.hidden[0, row.index(p)], emb[0, p])
    # the two contextual tokens: every 6th of the 12 remaining (positions 0 and 6), each the mean of its group
    targets, merged = merge_contextual(emb[:, 2:18][None], torch.tensor([[[12, 13, 14, 15]]]), 2)
    assert targets.flatten().tolist() == [0, 6]
    for t, vec in zip(targets.flatten().tolist(), merged[0, 0], strict=True):
        assert torch.allclose(gen.hidden[0, row.index(2 + t)], vec, atol=1e-6)
    unit = torch.nn.functional.normalize(emb[0, 2:14], dim=-1)
    assign = (unit @ unit[[0, 6]].T).argmax(-1)
    assign[[0, 6]] = torch.tensor([0, 1])
    assert torch.allclose(merged[0, 0, 1], emb[0, 2:14][assign == 1].mean(0), atol=1e-6)


def test_visionzip_default_split_follows_the_paper():
    for budget, contextual in ((64, 10), (128, 20), (192, 30)):
        assert make_method("visionzip", budget=budget).plan(32, 576).contextual == contextual


@pytest.mark.parametrize("method,opts,match", [
    ("vtw", {"layer": 2, "budget": 4}, "not both"),
    ("vtw", {"layer": 6}, "layer must be an int in"),
    ("pdrop", {"layers": [3, 2]}, "strictly increasing"),
    ("pdrop", {"layers": [0, 2]}, "layers must be an int in"),
    ("pdrop", {"ratio": 0.0}, "ratio must be"),
    ("pdrop", {"ratio": 0.5, "keep_ratio": 0.2}, "not both"),
    ("visionzip", {"budget": 4, "contextual": 5}, "contextual must be an int in"),
    ("pool", {"budget": 17}, "budget must be an int in"),
    ("random", {"keep_ratio": 0.0}, "keep_ratio must be in"),
])
def test_bad_baseline_options_raise_and_attach_nothing(model, method, opts, match):
    with pytest.raises(ValueError, match=match):
        vtprune.apply(model, method, **opts)
    assert "generate" not in model.__dict__


def test_pdrop_budget_below_its_stages_floor_warns_and_runs_at_the_floor():
    method = make_method("pdrop", budget=2, layers=[2, 4])
    with pytest.warns(UserWarning, match=r"smallest equivalent budget is 6.0 visual tokens per image \(37.5 %\), above the 2 asked.* layer 2"):
        plan = method.plan(6, N_VISUAL)
    assert list(plan.per_layer) == [N_VISUAL, N_VISUAL, 1, 1, 1, 1]  # the floor: 1 token after the first stage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_method("pdrop", budget=8, layers=[2, 4]).plan(6, N_VISUAL)  # reachable: no warning
