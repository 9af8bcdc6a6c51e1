"""Engine behaviour on tiny random-weight LLaVA models (CLIP tower + Llama LM, real classes)."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
import warnings
import weakref

import pytest
import torch
from conftest import IMAGE_TOKEN, N_VISUAL, batch, cache_keyword, make_prompt, output_cache, tiny_llava

import vtprune
from vtprune.engine.decisions import LastQuery
from vtprune.methods import NoPruning
from vtprune.methods.st3 import annealed, schedule

NEW = 20
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]

# option variants beyond each method's examples (test_conformance.py runs the examples of every registered
# method on every family): options that prune, and options that keep every token
PRUNING = [
    ("fastv", {"budget": 4}),
    ("st3", {}),
    ("st3", {"keep_ratio": 0.25, "anneal": "linear"}),
    ("st3", {"anneal_every": 3}),
    ("st3", {"anneal_every": 1}),  # the paper's per-step annealing (the default batches it every 8 steps)
    ("parvts", {"budget": 4}),
    ("parvts", {"budget": 4, "fusion": "fixed", "alpha": 0.7, "fuse_every_layer": True}),
    ("parvts", {"budget": 5, "subject_score": "random", "fusion": "size"}),
    ("parvts", {"budget": 5, "schedule": "sequential_subject_first"}),
    ("parvts", {"budget": 5, "schedule": "sequential_non_subject_first"}),
    ("vtw", {"layer": 3}),
    ("vtw", {"keep_ratio": 0.25}),
    ("pdrop", {}),
    ("pdrop", {"budget": 4, "layers": [1, 3]}),
    ("visionzip", {"budget": 6}),
    ("visionzip", {"budget": 4, "contextual": 0}),
    ("random", {"budget": 4, "seed": 3}),
    ("pool", {"budget": 4}),
    ("pool", {"keep_ratio": 0.5}),
]
KEEP_ALL = [
    ("none", {}),
    ("fastv", {"budget": N_VISUAL}),
    ("fastv", {"keep_ratio": 1.0}),
    ("parvts", {"budget": N_VISUAL}),
    ("st3", {"ratio": 0.0, "anneal": "none"}),
    ("vtw", {"budget": N_VISUAL}),
    ("pdrop", {"ratio": 1.0}),
    ("visionzip", {"budget": N_VISUAL}),
    ("random", {"keep_ratio": 1.0}),
    ("pool", {"budget": N_VISUAL}),
]


def generate(model, inputs, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, **kw)[:, -kw["max_new_tokens"]:]


@pytest.mark.parametrize("method,opts", KEEP_ALL)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "batched"])
def test_keeping_every_token_equals_stock(model, method, opts, prompts):
    inputs = batch(prompts)
    stock = generate(model, inputs)
    with vtprune.apply(model, method, **opts) as run:
        out = generate(model, inputs)
    assert torch.equal(out, stock)
    sample = run.report()["samples"][0]
    assert sample["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 6
    assert sample["flops"]["prefill"]["exact_ratio"] == 1.0


def test_sampling_with_nothing_pruned_equals_stock(model):
    inputs = batch(PROMPTS)
    torch.manual_seed(7)
    stock = generate(model, inputs, do_sample=True, top_k=20)
    with vtprune.apply(model, "none"):
        torch.manual_seed(7)
        out = generate(model, inputs, do_sample=True, top_k=20)
    assert torch.equal(out, stock)


@pytest.mark.parametrize("method,opts", PRUNING + KEEP_ALL[:1])
def test_batched_equals_one_by_one(model, method, opts):
    full = batch(PROMPTS)
    with vtprune.apply(model, method, **opts):
        together = generate(model, full)
        for i, p in enumerate(PROMPTS):
            one = batch([p])
            one["pixel_values"] = full["pixel_values"][i:i + 1]
            assert torch.equal(generate(model, one)[0], together[i]), f"sample {i}"


@pytest.mark.parametrize("method,opts", PRUNING)
def test_pruning_changes_work_and_sampling_runs(model, method, opts):
    inputs = batch(PROMPTS)
    with vtprune.apply(model, method, **opts) as run:
        torch.manual_seed(0)
        out = model.generate(**inputs, do_sample=True, max_new_tokens=6, return_dict_in_generate=True)
    assert out.sequences.shape == (3, inputs["input_ids"].shape[1] + 6)
    r = run.report()
    assert r["samples"][0]["equivalent_budget"] < N_VISUAL
    assert r["kv_cache"]["bytes"] == sum(
        layer.keys.numel() * 4 * 2 for layer in output_cache(out).layers)  # fp32 K and V, measured


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"budget": 5}), ("st3", {"anneal_every": 1})])
def test_the_run_keeps_no_kv_cache_alive_after_generate(model, method, opts):
    """Once generate returns, the caller's dropping its output frees the KV cache (the run held the last
    generation's cache until the next one: 667 MiB at batch 16 on llava-cpu-small); the report still counts it."""
    inputs = batch(PROMPTS)
    with vtprune.apply(model, method, **opts) as run:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        cache = output_cache(out)
        lengths = [layer.keys.shape[2] for layer in cache.layers]
        nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        alive = weakref.ref(cache)
        del out, cache
        gc.collect()
        assert alive() is None
        kv = run.report()["kv_cache"]
        assert kv["entries_per_layer"] == lengths and kv["bytes"] == nbytes > 0


def test_fastv_counts_and_kv_lengths(model):
    inputs = batch(PROMPTS)
    s = inputs["input_ids"].shape[1]
    with vtprune.apply(model, "fastv", budget=5, layer=3) as run:
        generate(model, inputs, max_new_tokens=NEW)
    sample = run.report()["samples"][0]
    assert sample["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 3 + [5] * 3
    assert sample["visual_tokens_per_layer_last_decode"] == [N_VISUAL] * 3 + [5] * 3
    assert sample["equivalent_budget"] == pytest.approx((3 * N_VISUAL + 3 * 5) / 6)
    real = s - run.gen.pads[0]  # the sample's real tokens per layer: all of them, then N_VISUAL - 5 fewer
    assert sample["tokens_per_layer_prefill"] == [real] * 3 + [real - N_VISUAL + 5] * 3
    assert sample["paths_per_layer_prefill"] == [1] * 6
    fed = NEW - 1  # the last new token is never fed back
    assert run.report()["kv_cache"]["entries_per_layer"] == [s + fed] * 3 + [s - N_VISUAL + 5 + fed] * 3
    # decode FLOPs of sample 0 (pads p): step t reads s - p + t keys in layers 0-2, 11 fewer after K
    p, dims = run.gen.pads[0], run.dims
    expected = sum(3 * dims.fastv(1, s - p + t) + 3 * dims.fastv(1, s - p - N_VISUAL + 5 + t) for t in range(1, NEW))
    assert sample["flops"]["decode"]["fastv"] == expected


def test_st3_pvtp_then_vta_cosine_step_by_step(model):
    inputs = batch(PROMPTS)
    s = inputs["input_ids"].shape[1]
    steps = 12
    with vtprune.apply(model, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=1) as run:
        generate(model, inputs, max_new_tokens=steps)
    g = schedule(N_VISUAL, 6, 0.3, 1, 2)
    assert g == [16, 12, 12, 9, 9, 7]  # ceil(0.7 * 16) = 12, ceil(0.7 * 12) = 9, ceil(0.7 * 9) = 7
    sample = run.report()["samples"][0]
    assert sample["visual_tokens_per_layer_prefill"] == g
    history = run.ledger.decode_history
    assert len(history) == steps - 1
    for t, counts in enumerate(history, start=1):
        expected = [g[0]] + [annealed(g[layer], t, steps, 0.25) for layer in range(1, 6)]
        assert counts == expected, f"step {t}"
        # cosine: G_min + (G - G_min) * 0.5 * (1 + cos(pi t / T)), rounded up
        g_min = math.ceil(0.25 * g[5])
        assert counts[5] == math.ceil(g_min + (g[5] - g_min) * 0.5 * (1 + math.cos(math.pi * t / steps)) - 1e-9)
    fed = steps - 1
    assert run.report()["kv_cache"]["entries_per_layer"] == [s - N_VISUAL + c + fed for c in history[-1]]


def test_st3_batched_evictions_every_k_steps_follow_the_schedule_from_behind(model):
    steps, k = 12, 4
    with vtprune.apply(model, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=k) as run:
        generate(model, batch(PROMPTS), max_new_tokens=steps)  # batched = one by one: PRUNING list
    history = run.ledger.decode_history
    g = schedule(N_VISUAL, 6, 0.3, 1, 2)
    held = list(g)
    for t, counts in enumerate(history, start=1):
        if t % k == 0:  # evict to the schedule's count at this step
            held = [g[0]] + [annealed(g[layer], t, steps, 0.25) for layer in range(1, 6)]
        assert counts == held, f"step {t}"
        # never below the per-step schedule, never above where it stood at the last eviction
        assert all(c >= annealed(g[layer], t, steps, 0.25) for layer, c in enumerate(counts) if layer)
    assert history[-1][5] < g[5]
    with pytest.raises(ValueError, match="anneal_every must be an int >= 1"):
        vtprune.apply(model, "st3", anneal_every=0)


def test_st3_target_budget_solves_ratio(model):
    with vtprune.apply(model, "st3", budget=8, anneal="none") as run:
        generate(model, batch(PROMPTS[:1]), max_new_tokens=2)
    sample = run.report()["samples"][0]
    assert 8 <= sample["equivalent_budget"] < 9


@pytest.mark.parametrize("schedule_name,kept", [("parallel", 4), ("sequential_non_subject_first", 4),
                                                ("sequential_subject_first", N_VISUAL - 4)])
def test_parvts_path_a_in_every_layer_after_discard(model, schedule_name, kept):
    inputs = batch(PROMPTS)
    s = inputs["input_ids"].shape[1]
    with vtprune.apply(model, "parvts", budget=4, discard_layer=3, schedule=schedule_name) as run:
        generate(model, inputs, max_new_tokens=NEW)
    r = run.report()
    sample = r["samples"][0]
    # both paths' visual tokens are present before the discard, one path's after it
    assert sample["visual_tokens_per_layer_prefill"] == [N_VISUAL] * 3 + [kept] * 3
    assert r["kv_cache"]["entries_per_layer"] == [s - N_VISUAL + kept + NEW - 1] * 6
    # the kept subject tokens are the most salient patches of each image ([CLS] attention)
    if schedule_name == "parallel":
        top = torch.topk(run.gen.saliency, 4, dim=-1).indices.sort(-1).values
        assert torch.equal(run.gen.cache_visual[5], torch.gather(run.gen.visual_index, 2, top))


def test_parvts_flops_follow_two_path_formula(model):
    inputs = batch(PROMPTS[:1])
    n = inputs["input_ids"].shape[1]
    with vtprune.apply(model, "parvts", budget=4, discard_layer=2) as run:
        generate(model, inputs, max_new_tokens=1)
    dims = run.dims
    n_a, n_b = n - N_VISUAL + 4, n - 4
    expected = 2 * (dims.fastv(n_a, n_a) + dims.fastv(n_b, n_b)) + 4 * dims.fastv(n_a, n_a)
    sample = run.report()["samples"][0]
    assert sample["flops"]["prefill"]["fastv"] == expected
    # the packed layers hold the shared prefix (BOS + 2), each path's visual tokens and its own copy of the
    # 6 question tokens: n_a + n_b - 3 = n + 6 tokens; path 1 alone after the discard
    assert sample["tokens_per_layer_prefill"] == [n + 6] * 2 + [n_a] * 4
    assert sample["paths_per_layer_prefill"] == [2, 2, 1, 1, 1, 1]


def test_multiple_images_each_span_pruned_separately(model):
    prompts = [make_prompt(2, 3, 5, images=2), make_prompt(4, 6, 6, images=2)]
    inputs = batch(prompts, images=2)
    stock = generate(model, inputs, max_new_tokens=8)
    with vtprune.apply(model, "none"):
        assert torch.equal(generate(model, inputs, max_new_tokens=8), stock)
    with vtprune.apply(model, "fastv", budget=3) as run:
        generate(model, inputs, max_new_tokens=8)
    assert run.report()["samples"][1]["visual_tokens_per_layer_prefill"] == [32, 32, 6, 6, 6, 6]
    kept = run.gen.cache_visual[5]
    assert kept.shape == (2, 2, 3)
    assert torch.all(kept[:, 0] < run.gen.visual_index[:, 1, :1])  # three from each image


def test_kept_tokens_keep_original_positions(model):
    inputs = batch(PROMPTS)
    seen = {}

    def spy(module, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0].clone()
        seen["pos"] = kwargs["position_ids"].clone()

    with vtprune.apply(model, "fastv", budget=4, layer=2) as run:
        handle = model.model.language_model.layers[4].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    index = run.gen.layouts[4].index
    rotary = model.model.language_model.rotary_emb
    hidden = torch.zeros(1, 1, 64)
    full_pos = torch.arange(inputs["input_ids"].shape[1])[None].expand(3, -1)
    cos, _ = rotary(hidden, full_pos)
    assert torch.equal(seen["pos"], torch.gather(full_pos, 1, index))
    assert torch.allclose(seen["cos"], torch.gather(cos, 1, index[..., None].expand(-1, -1, cos.shape[-1])))


@dataclasses.dataclass(frozen=True)
class ScoreEveryLayer(NoPruning):
    """Prunes nothing, asks for the last query's attention row at every layer."""

    name = "score-every-layer"

    def score_request(self, view, plan):
        return LastQuery()


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "padded-batch"])
def test_partial_scores_equal_eager_attention_rows(prompts):
    sdpa, eager = tiny_llava(attn="sdpa"), tiny_llava(attn="eager")
    inputs = batch(prompts)
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions
    for model in (sdpa, eager):
        with vtprune.apply(model, ScoreEveryLayer()) as run:
            with torch.no_grad():
                model(**inputs)
        for layer in range(5):
            ours = torch.softmax(run.gen.logits[layer][:, :, -1, :], -1)
            assert torch.allclose(ours, ref[layer][:, :, -1, :].float(), atol=1e-5), layer


@pytest.mark.parametrize("method,opts", [("fastv", {"budget": 4}), ("parvts", {"budget": 4}), ("st3", {})])
def test_model_is_stock_after_exit_and_after_exception(model, method, opts):
    inputs = batch(PROMPTS)
    stock = generate(model, inputs)
    impl = model.config.text_config._attn_implementation
    with vtprune.apply(model, method, **opts):
        generate(model, inputs, max_new_tokens=3)
    assert torch.equal(generate(model, inputs), stock)
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.apply(model, method, **opts):
            generate(model, inputs, max_new_tokens=2)
            raise RuntimeError("boom")
    assert torch.equal(generate(model, inputs), stock)
    assert model.config.text_config._attn_implementation == impl
    assert "generate" not in model.__dict__
    layer = model.model.language_model.layers[0]
    assert not layer._forward_pre_hooks and not model._forward_pre_hooks and not model._forward_hooks


def test_error_inside_generate_leaves_model_stock(model):
    inputs = batch(PROMPTS)
    stock = generate(model, inputs)
    one = batch(PROMPTS[:1])
    text_row = torch.full_like(one["input_ids"], 5)  # a prompt without image tokens beside one with an image
    mixed = {"input_ids": torch.cat([one["input_ids"], text_row]), "attention_mask": one["attention_mask"].repeat(2, 1),
             "pixel_values": one["pixel_values"]}
    with pytest.raises(ValueError, match="mixes prompts with images"):
        with vtprune.apply(model, "fastv", budget=4):
            model.generate(**mixed, max_new_tokens=2)
    assert torch.equal(generate(model, inputs), stock)


@pytest.mark.parametrize("method,opts,exc,match", [
    ("fastv", {"budget": 0}, ValueError, r"budget must be an int >= 1"),
    ("fastv", {"budget": N_VISUAL + 1}, ValueError, r"budget must be an int in \[1, 16\]"),
    ("parvts", {"budget": 0}, ValueError, "budget"),
    ("parvts", {"keep_ratio": 1.5}, ValueError, "keep_ratio"),
    ("st3", {"ratio": 1.0}, ValueError, "ratio"),
    ("st3", {"anneal": "exp"}, ValueError, "anneal must be one of"),
    ("parvts", {"discard_layer": 6}, ValueError, "discard_layer must be an int in"),
    ("parvts", {"fusion": "mean"}, ValueError, "fusion must be one of"),
    ("fastv", {"budget": 4, "keep_ratio": 0.5}, ValueError, "budget .* or keep_ratio .* not both"),
    ("fastv", {"k": 2}, TypeError, "has no option"),
    ("magic", {}, ValueError, "unknown method 'magic'"),
])
def test_bad_options_raise_and_attach_nothing(model, method, opts, exc, match):
    with pytest.raises(exc, match=match):
        vtprune.apply(model, method, **opts)
    assert not model._forward_pre_hooks
    assert model.config.text_config._attn_implementation == "sdpa"


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="unsupported model class LlamaForCausalLM"):
        vtprune.apply(lm, "fastv")


def test_mismatched_images_in_a_batch(model):
    prompts = [make_prompt(2, 3, 5, images=2), make_prompt(4, 6, 6, images=1)]
    inputs = batch(prompts, images=1)
    inputs["pixel_values"] = torch.randn(3, 3, 32, 32)
    with pytest.raises(ValueError, match="mismatched images"):
        with vtprune.apply(model, "fastv", budget=4):
            model(**inputs)


def test_report_before_generation_raises(model):
    with vtprune.apply(model, "fastv", budget=4) as run:
        with pytest.raises(RuntimeError, match="no generation"):
            run.report()


def test_image_token_is_found_from_config_not_offsets():
    model = tiny_llava(layers=4)
    ids = make_prompt(7, 3, 9)
    assert ids.index(IMAGE_TOKEN) == 8
    with vtprune.apply(model, "fastv", budget=2) as run:
        generate(model, batch([ids]), max_new_tokens=2)
    assert run.gen.visual_index[0, 0].tolist() == list(range(8, 8 + N_VISUAL))


def test_unsupported_attention_implementation_is_refused(model):
    model.config.text_config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="attention implementation 'flex_attention' is not supported"):
            vtprune.apply(model, "fastv", budget=4)
        assert model.config.text_config._attn_implementation == "flex_attention"
        assert not model._forward_pre_hooks
    finally:
        model.config.text_config._attn_implementation = "sdpa"


def test_st3_anneals_over_max_length_when_max_new_tokens_is_absent(model):
    inputs = batch(PROMPTS[:1])
    s = inputs["input_ids"].shape[1]
    with vtprune.apply(model, "st3") as run:
        model.generate(**inputs, max_length=s + 6, do_sample=False)
    assert run.gen.max_new_tokens == 6
    assert len(run.ledger.decode_history) == 5


def test_cls_saliency_equals_eager_clip_attention_at_feature_layer(model):
    inputs = batch(PROMPTS)
    with vtprune.apply(model, "parvts", budget=4) as run:
        generate(model, inputs, max_new_tokens=1)
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attn = tower(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = impl
    # vision_feature_layer=-2 of 3 layers -> the output of encoder layer 1; its [CLS] row, summed over heads
    expected = attn[1][:, :, 0, 1:].sum(1)
    assert torch.allclose(run.gen.saliency.view(3, N_VISUAL), expected, atol=1e-5)


def test_decode_only_annealing_on_a_padded_batch(model):
    """ST3 with no prefill pruning still evicts during decoding: the evicted layers need their own masks."""
    opts = {"ratio": 0.0, "floor_ratio": 0.25, "anneal_every": 1}
    full = batch(PROMPTS)
    s = full["input_ids"].shape[1]
    with vtprune.apply(model, "st3", **opts) as run:
        together = generate(model, full, max_new_tokens=10)
        entries = run.report()["kv_cache"]["entries_per_layer"]
        for i, p in enumerate(PROMPTS):
            one = batch([p])
            one["pixel_values"] = full["pixel_values"][i:i + 1]
            assert torch.equal(generate(model, one, max_new_tokens=10)[0], together[i]), f"sample {i}"
    last = [N_VISUAL] + [annealed(N_VISUAL, 9, 10, 0.25)] * 5
    assert entries == [s - N_VISUAL + c + 9 for c in last]


@pytest.mark.parametrize("keyword", ["installed", "past_key_values"])
def test_hand_written_decode_loop_without_position_ids_matches_generate(model, keyword):
    # ParVTS shortens layer 0's cache, from which the stock model would derive decode positions; the
    # engine finds the cache by its type, under the keyword this transformers takes or the older one
    keyword = cache_keyword(model) if keyword == "installed" else keyword  # 5.24 accepts both (one deprecated)
    inputs = batch(PROMPTS[:1])
    with vtprune.apply(model, "parvts", budget=4), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated keyword
        expected = generate(model, inputs, max_new_tokens=5)
        out = model(**inputs, use_cache=True)
        cache, tokens = output_cache(out), [out.logits[:, -1].argmax(-1)]
        for _ in range(4):
            out = model(input_ids=tokens[-1][:, None], use_cache=True, **{keyword: cache})
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), expected)


def test_precomputed_vision_features(model):
    # transformers >= 5.24 takes the vision features precomputed (mm_encoder_outputs); a method that needs
    # the tower's saliency says so clearly, one that needs none runs as with pixel_values
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers takes no precomputed vision features")
    inputs = batch(PROMPTS[:1])
    pixels = inputs.pop("pixel_values")
    with torch.no_grad():
        features = {"image": model.model.get_image_features(pixel_values=pixels, return_dict=True)}
    with vtprune.apply(model, "fastv", budget=4):
        expected = generate(model, {**inputs, "pixel_values": pixels}, max_new_tokens=5)
        assert torch.equal(generate(model, {**inputs, "mm_encoder_outputs": features}, max_new_tokens=5), expected)
    with vtprune.apply(model, "parvts", budget=4), pytest.raises(RuntimeError, match="mm_encoder_outputs"):
        generate(model, {**inputs, "mm_encoder_outputs": features}, max_new_tokens=5)


def test_a_generate_call_whose_cache_cannot_be_found_fails_loudly(model, monkeypatch):
    # a future rename that hides the cache from the engine must raise, not re-run the prefill
    import vtprune.engine.lifecycle as lifecycle
    import vtprune.engine.run as run_module

    for module in (lifecycle, run_module):  # phase detection, and the cache the prefill writes
        monkeypatch.setattr(module, "find_cache", lambda args, kwargs: None)
    with vtprune.apply(model, "fastv", budget=4), pytest.raises(ValueError, match="carries no KV cache"):
        generate(model, batch(PROMPTS[:1]), max_new_tokens=3)
    assert not model._forward_pre_hooks and "generate" not in model.__dict__  # detached on the error


@pytest.mark.parametrize("every", [1, 3])
def test_st3_decode_scores_only_before_an_eviction(model, monkeypatch, every):
    from vtprune.engine import attention

    calls = []
    real = attention.row_logits

    def counting(*args, **kwargs):
        calls.append(run.gen.phase if run.gen is not None else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "row_logits", counting)
    run = vtprune.apply(model, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=every)
    with run:
        generate(model, batch(PROMPTS[:1]), max_new_tokens=12)
    history = [run.report()["samples"][0]["visual_tokens_per_layer_prefill"]] + run.ledger.decode_history
    pairs = zip(history, history[1:], strict=False)
    evictions = sum(now < before for prev, cur in pairs for before, now in zip(prev, cur, strict=True))
    assert 0 < evictions < 11 * 5  # some steps, not every (step, layer)
    assert calls.count("decode") == evictions


def test_method_must_be_a_name_or_an_instance(model):
    with pytest.raises(TypeError, match="registered name"):
        vtprune.apply(model, None)
    assert "generate" not in model.__dict__


@dataclasses.dataclass(frozen=True)
class FailsAtLayer3(NoPruning):
    """Raises before decoder layer 3 of the prefill."""

    name = "fails-at-layer-3"

    def on_prefill_layer(self, view, plan):
        if view.layer == 3:
            raise RuntimeError("boom at layer 3")
        return ()


def test_kept_visual_after_a_failed_prefill_is_a_clear_error(model):
    run = vtprune.apply(model, FailsAtLayer3())
    with run, pytest.raises(RuntimeError, match="boom at layer 3"):
        generate(model, batch(PROMPTS[:1]), max_new_tokens=2)
    with pytest.raises(RuntimeError, match="did not run through every decoder layer"):
        run.kept_visual()
    with vtprune.apply(model, "fastv", budget=4) as ok:
        generate(model, batch(PROMPTS[:1]), max_new_tokens=2)
    assert len(ok.kept_visual()) == 6
