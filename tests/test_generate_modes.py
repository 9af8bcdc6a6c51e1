"""Every generate mode a user runs under a method, on every family (the conformance matrix's models):

* beam search and several sequences per prompt: keep-all = stock; pruned beams of a batch = each sample
  alone; ST³'s decode-time evictions follow the cache's beam reordering (the beam's score equals the
  pruned model's log-likelihood of that beam, decoded by hand);
* a conversation from the returned cache (transformers' multi-turn pattern): keep-all = stock over three
  turns; a pruned conversation = a by-hand reference (the stock model on the kept tokens at their
  original positions) and batched = one by one; a new image in a later turn is scheduled for its own tokens;
* text-only prompts run as stock, and a batch mixing prompts with and without images is refused;
* a second ``apply`` on a model with a run attached, a cache no run (or another run) filled, and the
  modes vtprune does not support are refused with a clear error, nothing changed.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import output_cache
from families import FAMILIES
from test_conformance import BATCH, METHODS, assert_stock_model, inputs, model, options

import vtprune
from vtprune.engine.modes import REFUSED

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 4
EXTRA = (11, 12, 13)  # the user's next turn (text tokens present in every family's tiny vocabulary)
TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token inputs that follow the conversation


# ---------------------------------------------------------------- beams and several sequences
def beams(m, x, n: int = 2) -> torch.Tensor:
    return m.generate(**x, max_new_tokens=NEW, do_sample=False, num_beams=n, early_stopping=False)[:, -NEW:]


def sampled(m, x) -> torch.Tensor:
    torch.manual_seed(0)
    return m.generate(**x, max_new_tokens=NEW, do_sample=True, num_return_sequences=2)[:, -NEW:]


@functools.cache
def stock_beams(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    m, x = model(family, "sdpa"), inputs(family, BATCH)
    return beams(m, x), sampled(m, x)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_beams_and_sequences_keep_all_equal_stock_and_pruned_beams_batch(family, method):
    m, x = model(family, "sdpa"), inputs(family, BATCH)
    ref_beams, ref_sampled = stock_beams(family)
    with vtprune.apply(m, method, **options(method, "keep_all")):
        assert torch.equal(beams(m, x), ref_beams)
        assert torch.equal(sampled(m, x), ref_sampled)
    with vtprune.apply(m, method, **options(method, "prune")) as run:
        together = beams(m, x)
        counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
        for i in BATCH:
            assert torch.equal(beams(m, inputs(family, (i,)))[0], together[i]), f"sample {i}"
        assert sampled(m, x).shape == (2 * len(BATCH), NEW)
    if method != "none":
        assert min(counts) < FAMILIES[family].n_visual
    assert_stock_model(m)


def test_beam_search_follows_the_cache_reordering_under_decode_time_evictions():
    """ST³ evicts per beam while decoding, so the rows of one sample's beams hold different entries and
    beam search's reordering must carry the engine's bookkeeping along. The returned beam's score (sum
    of its tokens' log-probabilities, length_penalty 0) must equal its log-likelihood under the same
    pruned model decoded by hand, token by token, with no beams."""
    m, x = model("llava", "sdpa"), inputs("llava", (1,))
    st3 = {**options("st3", "prune"), "anneal_every": 1, "anneal_steps": 6, "floor_ratio": 0.1}
    with vtprune.apply(m, "st3", **st3):
        out = m.generate(**x, max_new_tokens=6, do_sample=False, num_beams=3, length_penalty=0.0,
                         early_stopping=False, return_dict_in_generate=True, output_scores=True)
    tokens = out.sequences[0, x["input_ids"].shape[1]:]
    with vtprune.apply(m, "st3", **st3) as run, torch.no_grad():
        logits = m(**x, use_cache=True)
        total, cache = 0.0, output_cache(logits)
        for t, token in enumerate(tokens.tolist()):
            total += float(torch.log_softmax(logits.logits[0, -1].float(), -1)[token])
            if t + 1 < len(tokens):
                logits = m(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        evicted = run.report()["samples"][0]["visual_tokens_per_layer_last_decode"]
    assert min(evicted) < min(run.report()["samples"][0]["visual_tokens_per_layer_prefill"])  # ST³ annealed
    assert float(out.sequences_scores[0]) == pytest.approx(total, abs=1e-4)


# ---------------------------------------------------------------- conversations from the returned cache
def next_turn(x: dict, sequences: torch.Tensor) -> dict:
    """The next turn's generate inputs: the conversation so far plus the user's new text (no new image)."""
    ids = torch.cat([sequences, torch.tensor([EXTRA]).expand(sequences.shape[0], -1)], 1)
    grow = ids.shape[1] - x["input_ids"].shape[1]
    out = {"input_ids": ids, "attention_mask": torch.cat([x["attention_mask"], torch.ones(ids.shape[0], grow,
                                                                                         dtype=x["attention_mask"].dtype)], 1)}
    for key in TOKEN_KEYS:
        if key in x:
            out[key] = torch.cat([x[key], torch.zeros(ids.shape[0], grow, dtype=x[key].dtype)], 1)
    return out


def conversation(m, x: dict, turns: int = 3, after_first=None) -> list[torch.Tensor]:
    """Greedy answers of ``turns`` turns, each continuing from the cache the previous one returned."""
    answers, cache = [], None
    for t in range(turns):
        kw = {**x, "past_key_values": cache} if cache is not None else x
        out = m.generate(**kw, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        if t == 0 and after_first is not None:
            after_first()
        answers.append(out.sequences[:, -NEW:])
        cache = out.past_key_values
        x = next_turn(x, out.sequences)
    return answers


@functools.cache
def stock_conversation(family: str) -> list[torch.Tensor]:
    return conversation(model(family, "sdpa"), inputs(family, BATCH))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_conversation_from_the_returned_cache_keep_all_equals_stock(family, method):
    m = model(family, "sdpa")
    with vtprune.apply(m, method, **options(method, "keep_all")) as run:
        answers = conversation(m, inputs(family, BATCH))
        later = run.report()["samples"][0]
    assert all(torch.equal(a, b) for a, b in zip(answers, stock_conversation(family), strict=True))
    assert later["visual_tokens_in"] == 0  # the third turn carried no image
    assert_stock_model(m)


@pytest.mark.parametrize("method", METHODS)
def test_a_pruned_conversation_batched_equals_one_by_one(method):
    m = model("llava", "sdpa")
    with vtprune.apply(m, method, **options(method, "prune")) as run:
        together = conversation(m, inputs("llava", BATCH))
        report = run.report()
        for i in BATCH:
            alone = conversation(m, inputs("llava", (i,)))
            assert all(torch.equal(a[0], b[i]) for a, b in zip(alone, together, strict=True)), f"sample {i}"
    # the later turn's keys include the earlier turns' pruned cache: its KV bytes stay below the stock ones
    if method not in ("none", "vtw"):
        assert report["kv_cache"]["ratio"] < 1.0


def test_a_pruned_conversation_equals_the_stock_model_on_the_kept_tokens():
    """By hand: ``random`` keeps the same visual tokens in every layer (it selects before layer 0), so the
    pruned model is the stock language model on the kept tokens' embeddings at their original positions;
    the later turns continue that stock cache at the conversation's positions."""
    m, x = model("llava", "sdpa"), inputs("llava", (1,))
    opts = options("random", "prune")
    kept: list[int] = []
    with vtprune.apply(m, "random", **opts) as run:
        answers = conversation(m, x, after_first=lambda: kept.extend(run.kept_visual()[0]))
    embeds: list[torch.Tensor] = []
    hook = m.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: embeds.append(kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            m(**x)
    finally:
        hook.remove()
    ids = x["input_ids"][0]
    image = (ids == m.config.image_token_id).nonzero().flatten()
    keep = torch.cat([(ids != m.config.image_token_id).nonzero().flatten(), image[kept]]).sort().values
    with torch.no_grad():
        out = m(inputs_embeds=embeds[0][:, keep], position_ids=keep[None], use_cache=True)
        cache, length, token = output_cache(out), ids.shape[0], int(out.logits[0, -1].argmax())
        for turn in range(3):
            got = []
            for _ in range(NEW):
                got.append(token)
                if len(got) == NEW:
                    break
                out = m(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length]]), past_key_values=cache)
                length, token = length + 1, int(out.logits[0, -1].argmax())
            assert got == answers[turn][0].tolist(), f"turn {turn}"
            feed = torch.tensor([[token, *EXTRA]])
            out = m(input_ids=feed, position_ids=torch.arange(length, length + feed.shape[1])[None], past_key_values=cache)
            length, token = length + feed.shape[1], int(out.logits[0, -1].argmax())


def with_new_image(x: dict, sequences: torch.Tensor, seed: int) -> dict:
    """A later LLaVA turn that shows a new image: the conversation so far, the new image's tokens and a
    question; ``pixel_values`` of the new image only (the earlier ones are in the cache)."""
    from conftest import IMAGE_TOKEN, N_VISUAL

    rows = sequences.shape[0]
    turn = torch.tensor([[5, *([IMAGE_TOKEN] * N_VISUAL), *EXTRA]]).expand(rows, -1)
    ids = torch.cat([sequences, turn], 1)
    mask = torch.cat([x["attention_mask"], torch.ones(rows, ids.shape[1] - x["attention_mask"].shape[1],
                                                        dtype=x["attention_mask"].dtype)], 1)
    pixels = torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def image_conversation(m, x: dict) -> list[torch.Tensor]:
    """The greedy answers of two turns, the second with a new image."""
    out = m.generate(**x, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    follow = {**with_new_image(x, out.sequences, seed=7), "past_key_values": out.past_key_values}
    second = m.generate(**follow, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    return [out.sequences[:, -NEW:], second.sequences[:, -NEW:]]


@pytest.mark.parametrize("method", METHODS)
def test_a_new_image_in_a_later_turn_is_scheduled_for_its_own_tokens(method):
    m, x = model("llava", "sdpa"), inputs("llava", BATCH)
    stock = image_conversation(m, x)
    with vtprune.apply(m, method, **options(method, "keep_all")):
        kept_all = image_conversation(m, x)
    assert all(torch.equal(a, b) for a, b in zip(kept_all, stock, strict=True))
    with vtprune.apply(m, method, **options(method, "prune")) as run:
        image_conversation(m, x)
        later = run.report()["samples"][0]
    assert later["visual_tokens_in"] == FAMILIES["llava"].n_visual  # the new image's tokens only
    if method != "none":
        assert min(later["visual_tokens_per_layer_prefill"]) < FAMILIES["llava"].n_visual  # pruned in turn 2
    assert_stock_model(m)


def test_a_cache_filled_without_the_run_or_under_another_run_is_refused():
    m, x = model("llava", "sdpa"), inputs("llava", (0,))
    first = m.generate(**x, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    follow = {**next_turn(x, first.sequences), "past_key_values": first.past_key_values}
    with vtprune.apply(m, "fastv", **options("fastv", "prune")), pytest.raises(ValueError, match="no vtprune run filled it"):
        m.generate(**follow, max_new_tokens=NEW)
    with vtprune.apply(m, "fastv", **options("fastv", "prune")):
        mine = m.generate(**x, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    follow = {**next_turn(x, mine.sequences), "past_key_values": mine.past_key_values}
    with vtprune.apply(m, "st3", **options("st3", "prune")), pytest.raises(ValueError, match="another vtprune run"):
        m.generate(**follow, max_new_tokens=NEW)
    assert_stock_model(m)


# ---------------------------------------------------------------- text-only prompts
def text_only(family: str, idx: tuple[int, ...]) -> dict:
    """The family's prompts with their image and video tokens removed, left-padded again."""
    x, cfg = inputs(family, idx), model(family, "sdpa").config
    placeholders = torch.tensor([t for t in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if t is not None])
    rows = [row[mask.bool() & ~torch.isin(row, placeholders)]
            for row, mask in zip(x["input_ids"], x["attention_mask"], strict=True)]
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, n - len(r):], mask[b, n - len(r):] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_only_prompts_run_as_stock(family, method):
    m, x = model(family, "sdpa"), text_only(family, BATCH)
    stock = m.generate(**x, max_new_tokens=NEW, do_sample=False)
    with vtprune.apply(m, method, **options(method, "prune")) as run:
        assert torch.equal(m.generate(**x, max_new_tokens=NEW, do_sample=False), stock)
        sample = run.report()["samples"][0]
    assert sample["visual_tokens_in"] == 0
    assert sample["visual_tokens_per_layer_prefill"] == [0] * FAMILIES[family].layers
    assert_stock_model(m)


def test_a_batch_mixing_prompts_with_and_without_images_is_refused():
    m = model("llava", "sdpa")
    x, t = inputs("llava", (0, 1)), text_only("llava", (0, 1))
    n = max(x["input_ids"].shape[1], t["input_ids"].shape[1])

    def pad(v):
        return torch.nn.functional.pad(v, (n - v.shape[1], 0))

    mixed = {"input_ids": torch.cat([pad(x["input_ids"][:1]), pad(t["input_ids"][1:])]),
             "attention_mask": torch.cat([pad(x["attention_mask"][:1]), pad(t["attention_mask"][1:])]),
             "pixel_values": x["pixel_values"][:1]}
    with vtprune.apply(m, "fastv", **options("fastv", "prune")), pytest.raises(ValueError, match="mixes prompts with images"):
        m.generate(**mixed, max_new_tokens=NEW)
    assert_stock_model(m)


# ---------------------------------------------------------------- refusals
def test_a_second_apply_is_refused_and_changes_nothing():
    m, x = model("llava", "sdpa"), inputs("llava", BATCH)
    with vtprune.apply(m, "fastv", **options("fastv", "prune")) as run:
        before = m.generate(**x, max_new_tokens=NEW, do_sample=False)
        with pytest.raises(ValueError, match="already attached.*detach"):
            vtprune.apply(m, "st3")
        assert torch.equal(m.generate(**x, max_new_tokens=NEW, do_sample=False), before)
        assert run.method.name == "fastv"
    assert_stock_model(m)
    with vtprune.apply(m, "st3"):  # after detaching, another run attaches
        pass
    assert_stock_model(m)


REFUSED_CALLS = {
    "assistant_model": {"assistant_model": "draft"},
    "prompt_lookup_num_tokens": {"prompt_lookup_num_tokens": 3},
    "assistant_early_exit": {"assistant_early_exit": 2},
    "dola_layers": {"dola_layers": "high"},
    "penalty_alpha": {"penalty_alpha": 0.6, "top_k": 4},
    "custom_generate": {"custom_generate": "transformers-community/contrastive-search"},
    "prefill_chunk_size": {"prefill_chunk_size": 8},
    "cache_implementation": {"cache_implementation": "static"},
}


@pytest.mark.parametrize("mode", sorted(REFUSED_CALLS))
def test_unsupported_generate_modes_are_refused_before_anything_runs(mode):
    assert set(REFUSED) | {"cache_implementation"} == set(REFUSED_CALLS)
    m, x = model("llava", "sdpa"), inputs("llava", (0,))
    with vtprune.apply(m, "fastv", **options("fastv", "prune")) as run:
        with pytest.raises(ValueError, match=mode):
            m.generate(**x, max_new_tokens=NEW, **REFUSED_CALLS[mode])
        assert run.gen is None  # no model call ran
    assert_stock_model(m)
