"""What several model families' adapters must keep, one parametrised test per shape over a per-family table of
what differs (token counts, grids, budgets, the saliency reference): the tokens per image, the positions the
kept tokens keep, per-layer counts and KV lengths, ParVTS's subjects, per-image budgets, several images in a
prompt, batches of mixed image sizes, saliency against the tower's own eager attention, pool's grids and
windows.

Adding a family: after its entry in ``families.FAMILIES`` (its tiny model), its row in :data:`TINY` (its
standard batch), then a row in the table of each shape it has. What only one family has (DeepStack, M-RoPE interleaving, tiles, bidirectional
image blocks, downsampled grids, video) stays in the family's own file (``test_<family>.py``); keep-all
= stock, batched = one by one and stock after exit for every method run in ``test_conformance.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable

import gemma3_tiny
import internvl_tiny
import next_tiny
import onevision_tiny
import pytest
import qwen_tiny
import torch
import torch.nn.functional as F
from conftest import IMAGE_TOKEN, cache_keyword, output_cache
from families import FAMILIES
from family_checks import LayerSpy, eager_tower_attentions, generate, layer0_input

import vtprune
from vtprune.adapters import PatchGrid, adapter_for, gemma3, qwen2_vl
from vtprune.adapters.internvl import InternVLAdapter
from vtprune.adapters.llava_next import NEWLINE, LlavaNextAdapter
from vtprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vtprune.methods.st3 import annealed, schedule

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN = qwen_tiny.FAMILIES  # qwen2_vl, qwen2_5_vl, qwen3_vl
QWEN_PROMPTS = [qwen_tiny.make_prompt(2, 4, 1), qwen_tiny.make_prompt(5, 9, 2), qwen_tiny.make_prompt(3, 2, 3)]


def qwen_batch(idx: tuple[int, ...] = (0, 1, 2)) -> dict:
    return qwen_tiny.batch([QWEN_PROMPTS[i] for i in idx])


@dataclasses.dataclass(frozen=True)
class Tiny:
    """A family of ``families.FAMILIES`` as its tests here run it: its standard left-padded batch (``batch(idx)``:
    the three standard prompts, each with its own image, the inputs of the family's own file) and the tokens
    generated (``new``); the visual tokens ``n`` of each image and the decoder ``layers`` are the registry's."""

    name: str
    batch: Callable[..., dict]
    new: int

    @property
    def n(self) -> int:
        return FAMILIES[self.name].n_visual

    @property
    def layers(self) -> int:
        return FAMILIES[self.name].layers


TINY: dict[str, Tiny] = {t.name: t for t in [
    Tiny("llava_next", next_tiny.batch, next_tiny.NEW), Tiny("internvl", internvl_tiny.batch, internvl_tiny.NEW),
    Tiny("llava_onevision", onevision_tiny.batch, onevision_tiny.NEW),
    *[Tiny(f, qwen_batch, 8) for f in QWEN], Tiny("gemma3", gemma3_tiny.batch, 6)]}

# the families whose inputs come from their real processor with any image size (``*_tiny.inputs``)
PROCESSOR = {"llava_next": next_tiny, "internvl": internvl_tiny, "llava_onevision": onevision_tiny}


@functools.cache
def model(family: str) -> torch.nn.Module:
    return FAMILIES[family].build("sdpa")


# ---------------------------------------------------------------- tokens per image = the processor's = the model's
def packed_feature_tokens(m, x: dict) -> list[int]:
    """Tokens of each image in the model's own packed features (any-resolution families)."""
    extra = {"batch_num_images": x["batch_num_images"]} if "batch_num_images" in x else {}
    with torch.no_grad():
        feats = m.model.get_image_features(x["pixel_values"], x["image_sizes"], **extra).pooler_output
    return [f.shape[0] for f in feats]


def tile_feature_tokens(m, x: dict) -> list[int]:
    """Tokens of the one image of ``x`` in the model's own features: tiles x tokens per tile (InternVL)."""
    with torch.no_grad():
        feats = m.model.get_image_features(x["pixel_values"]).pooler_output
    return [feats.shape[0] * feats.shape[1]]


TOKENS = {"llava_next": (LlavaNextAdapter, packed_feature_tokens), "internvl": (InternVLAdapter, tile_feature_tokens),
          "llava_onevision": (LlavaOnevisionAdapter, packed_feature_tokens)}


@pytest.mark.parametrize("family,size", [pytest.param(f, s, id=f"{f}-{s[0]}x{s[1]}") for f in TOKENS
                                         for s in PROCESSOR[f].COUNTS])
def test_visual_tokens_per_image_follow_its_size(family, size):
    tiny, (adapter_class, feature_tokens), m = PROCESSOR[family], TOKENS[family], model(family)
    x = tiny.inputs([tiny.prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(m)
    assert isinstance(adapter, adapter_class) and adapter.tokens_per_image() is None
    visual = adapter.visual_index(x["input_ids"], x)
    start = int((x["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    assert visual.tolist() == [[list(range(start, start + tiny.COUNTS[size]))]]  # hand count = processor's
    assert feature_tokens(m, x) == [tiny.COUNTS[size]]  # = the model's own features


# ---------------------------------------------------------------- positions (1-D rotary)
@pytest.mark.parametrize("call", ["forward", "generate"])
@pytest.mark.parametrize("family", ["llava_next", "internvl", "llava_onevision"])
def test_kept_tokens_keep_original_positions(family, call):
    """FastV (budget 6 from layer 2) on a left-padded batch: decoder layer 4 gets the stock 1-D positions (and
    their RoPE cos) at the kept tokens' original indices in the prefill (a direct forward: 0 .. S-1; generate:
    its positions of a left-padded batch), and under generate the prompt's last position + t at decode step t."""
    m, x, n, layer = model(family), TINY[family].batch(), TINY[family].n, 4
    seen: list = []

    def spy(module, args, kwargs):
        seen.append((kwargs["position_ids"].clone(), kwargs["position_embeddings"][0].clone()))

    with vtprune.apply(m, "fastv", budget=6, layer=2) as run:
        handle = m.model.language_model.layers[layer].register_forward_pre_hook(spy, with_kwargs=True)
        try:
            if call == "generate":
                generate(m, x, 3)
            else:
                with torch.no_grad():
                    m(**x)
        finally:
            handle.remove()
    index = run.gen.layouts[layer].index
    assert index.shape[1] == x["input_ids"].shape[1] - n * run.gen.n_images + 6 * run.gen.n_images
    if call == "generate":  # generate's positions for a left-padded batch
        stock = (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    else:
        stock = torch.arange(x["input_ids"].shape[1])[None].expand(x["input_ids"].shape[0], -1)
    pos, cos = seen[0]
    assert torch.equal(pos, torch.gather(stock, 1, index))
    full_cos, _ = m.model.language_model.rotary_emb(torch.zeros(1, 1, cos.shape[-1]), stock)
    assert torch.allclose(cos, torch.gather(full_cos, 1, index[..., None].expand(-1, -1, cos.shape[-1])))
    assert len(seen) == (3 if call == "generate" else 1)
    for t, (pos, _) in enumerate(seen[1:], start=1):
        assert torch.equal(pos, stock[:, -1:] + t), f"decode step {t}"


@pytest.mark.parametrize("family", ["internvl", "llava_onevision"])
def test_hand_written_decode_loop_without_position_ids_matches_generate(family):
    """A decode loop without ``generate`` or position_ids after ParVTS shortened layer 0's cache gives what
    ``generate`` gives: the adapter's decode positions (stock cache length + step) are the stock ones."""
    m, x = model(family), TINY[family].batch((1,))
    with vtprune.apply(m, "parvts", budget=6, discard_layer=2):
        expected = generate(m, x, 5)
        with torch.no_grad():
            out = m(**x, use_cache=True)
            cache, tokens = output_cache(out), [out.logits[:, -1].argmax(-1)]
            for _ in range(4):
                out = m(input_ids=tokens[-1][:, None], use_cache=True, **{cache_keyword(m): cache})
                tokens.append(out.logits[:, -1].argmax(-1))
    assert cache.layers[0].get_seq_length() < x["input_ids"].shape[1] + 4  # layer 0's cache was shortened
    assert torch.equal(torch.stack(tokens, 1), expected)


# ---------------------------------------------------------------- positions against the stock model's own inputs
def mrope_decode_positions(m, x: dict, new: int, stock: LayerSpy, spy: LayerSpy) -> None:
    """Qwen: decoding continues at the prompt's last M-RoPE position + t, whatever the pruned caches hold."""
    mrope, _ = m.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"],
                                      attention_mask=x["attention_mask"])
    rotary, layers = m.model.language_model.rotary_emb, len(m.model.language_model.layers)
    for t in range(1, new):
        cos, _ = rotary(torch.zeros(1, dtype=torch.float32), mrope[:, :, -1:] + t)
        assert torch.equal(spy.calls[t * layers]["cos"], cos), f"decode step {t}"


def two_rotary_types(m, x: dict, new: int, stock: LayerSpy, spy: LayerSpy) -> None:
    """Gemma 3: sliding layers (local base 10k) and full ones (1M) get different rotary embeddings."""
    assert not torch.allclose(stock.calls[0]["cos"], stock.calls[2]["cos"])


QWEN_PRUNING = [("fastv", {"budget": 4}), ("st3", {}), ("parvts", {"budget": 4}), ("vtw", {"layer": 2}),
                ("pdrop", {"layers": [1, 3]}), ("visionzip", {"budget": 4}), ("random", {"budget": 4}),
                ("pool", {"budget": 4})]
STOCK_POSITIONS = {f: QWEN_PRUNING for f in QWEN} | {
    "gemma3": [("fastv", {"budget": 5, "layer": 2}), ("parvts", {"budget": 4}), ("random", {"budget": 4})]}
ROTARY = {f: mrope_decode_positions for f in QWEN} | {"gemma3": two_rotary_types}  # the family's own rotary check
# ParVTS, layer 0's cache length (which the model reads) against the stock one: Qwen's is shorter; Gemma 3's
# layer 0 (sliding) counts every token it was fed, the packed paths included
PARVTS_CACHE = {f: operator.lt for f in QWEN} | {"gemma3": operator.ne}


@pytest.mark.parametrize("family,method,opts", [pytest.param(f, m, o, id=f"{f}-{m}") for f, rows in
                                                STOCK_POSITIONS.items() for m, o in rows])
def test_each_layer_gets_the_stock_rotary_and_positions_at_the_kept_tokens(family, method, opts):
    """Every prefill layer receives the stock model's (cos, sin) and position ids gathered at the kept token
    indices (M-RoPE for Qwen, both rotary types for Gemma 3), every decode step the stock ones."""
    m, x, new, layers = model(family), TINY[family].batch(), TINY[family].new, TINY[family].layers
    s = x["input_ids"].shape[1]
    with LayerSpy(m) as stock:
        generate(m, x, new)
    with vtprune.apply(m, method, **opts) as run, LayerSpy(m, run) as spy:
        out = m.generate(**x, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert len(spy.calls) == len(stock.calls) == layers * new
    prefill = list(zip(spy.calls[:layers], stock.calls[:layers], strict=True))
    for got, want in prefill:
        index = got["index"]
        take = functools.partial(torch.gather, dim=1, index=index[..., None].expand(-1, -1, want["cos"].shape[-1]))
        assert torch.equal(got["cos"], take(want["cos"])) and torch.equal(got["sin"], take(want["sin"])), got["layer"]
        assert torch.equal(got["pos"], torch.gather(want["pos"], 1, index)), f"prefill layer {got['layer']}"
    assert any(got["index"].shape[1] < s for got, _ in prefill)  # some layer was pruned
    for got, want in zip(spy.calls[layers:], stock.calls[layers:], strict=True):
        assert torch.equal(got["cos"], want["cos"]) and torch.equal(got["sin"], want["sin"]), f"decode {got['layer']}"
        assert torch.equal(got["pos"], want["pos"]), f"decode layer {got['layer']}"
    ROTARY[family](m, x, new, stock, spy)
    if method == "parvts":
        assert PARVTS_CACHE[family](output_cache(out).layers[0].get_seq_length(), s + new - 1)


# ---------------------------------------------------------------- per-layer counts and KV lengths (METHODS.md)
FASTV_BUDGET = {"llava_next": 10, "internvl": 10, "llava_onevision": 10, **dict.fromkeys(QWEN, 5), "gemma3": 5}


@pytest.mark.parametrize("family", list(FASTV_BUDGET))
def test_fastv_counts_and_kv_lengths(family):
    """FastV (from layer 3): visual tokens per layer in prefill and at the last decode step, KV entries per layer."""
    m, x, tiny, budget = model(family), TINY[family].batch(), TINY[family], FASTV_BUDGET[family]
    s, n = x["input_ids"].shape[1], tiny.n
    with vtprune.apply(m, "fastv", budget=budget, layer=3) as run:
        generate(m, x, tiny.new)
    sample = run.report()["samples"][0]
    assert sample["visual_tokens_in"] == n
    counts = [n] * 3 + [budget] * (tiny.layers - 3)
    assert sample["visual_tokens_per_layer_prefill"] == counts
    assert sample["visual_tokens_per_layer_last_decode"] == counts
    assert run.report()["kv_cache"]["entries_per_layer"] == [s - n + c + tiny.new - 1 for c in counts]


# PVTP G(l) with ratio 0.3 from layer 1 every 2 layers, by hand: ceil(0.7 * 52) = 37, ceil(0.7 * 37) = 26, ...
ST3_SCHEDULE = {"llava_next": [52, 37, 37, 26, 26, 19], "internvl": [48, 34, 34, 24, 24, 17],
                **dict.fromkeys(QWEN, [16, 12, 12, 9, 9, 7])}


@pytest.mark.parametrize("family", list(ST3_SCHEDULE))
def test_st3_counts_step_by_step(family):
    """ST3: PVTP's counts per layer in the prefill and VTA's annealed counts at every decode step."""
    m, tiny, g = model(family), TINY[family], ST3_SCHEDULE[family]
    assert schedule(tiny.n, tiny.layers, 0.3, 1, 2) == g
    with vtprune.apply(m, "st3", ratio=0.3, stride=2, start_layer=1, floor_ratio=0.25, anneal_every=1) as run:
        generate(m, tiny.batch(), tiny.new)
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == g
    history = run.ledger.decode_history
    assert len(history) == tiny.new - 1
    for t, counts in enumerate(history, start=1):
        assert counts == [g[0]] + [annealed(g[layer], t, tiny.new, 0.25) for layer in range(1, tiny.layers)], f"step {t}"
    assert history[-1][5] < g[5]


# (budget, discard layer); where tokens are packed with newlines, which packing entries a subject may be
PARVTS = {"llava_next": (10, 3), "internvl": (10, 3), "llava_onevision": (10, 3), **dict.fromkeys(QWEN, (4, 3)),
          "gemma3": (4, 2)}
SUBJECTS = {"llava_next": lambda source: source >= 0,  # patches, never newline tokens
            "llava_onevision": lambda source: source != NEWLINE}  # patches or downsampled patches, never newlines


@pytest.mark.parametrize("family", list(PARVTS))
def test_parvts_counts_kv_lengths_and_subjects(family):
    """ParVTS: counts and KV lengths, and the kept tokens are the top ``budget`` by the adapter's saliency."""
    m, x, tiny, (budget, discard) = model(family), TINY[family].batch(), TINY[family], PARVTS[family]
    s, n = x["input_ids"].shape[1], tiny.n
    with vtprune.apply(m, "parvts", budget=budget, discard_layer=discard) as run:
        generate(m, x, tiny.new)
    r = run.report()
    assert r["samples"][0]["visual_tokens_per_layer_prefill"] == [n] * discard + [budget] * (tiny.layers - discard)
    assert r["kv_cache"]["entries_per_layer"] == [s - n + budget + tiny.new - 1] * tiny.layers
    top = torch.topk(run.gen.saliency, budget, dim=-1).indices.sort(-1).values  # subjects: the most salient
    assert torch.equal(run.gen.cache_visual[-1], torch.gather(run.gen.visual_index, 2, top))
    if family in SUBJECTS:
        source, _ = adapter_for(m).packing(PROCESSOR[family].SIZE)
        assert SUBJECTS[family](source[top.flatten()]).all()


# ---------------------------------------------------------------- budgets per image, several images
KEEP_RATIO = {"llava_next": ([(20, 40), (16, 64), (64, 64)], ["fastv", "parvts"]),  # 13, 9, 22
              "internvl": ([(32, 32), (32, 64), (64, 64)], ["fastv", "parvts", "pool"])}  # 4, 12, 20 (all tiles)


@pytest.mark.parametrize("family,method", [pytest.param(f, m, id=f"{f}-{m}") for f, (_, methods) in
                                           KEEP_RATIO.items() for m in methods])
def test_keep_ratio_is_per_image_for_each_size(family, method):
    tiny, m, (sizes, _) = PROCESSOR[family], model(family), KEEP_RATIO[family]
    with vtprune.apply(m, method, keep_ratio=0.25) as run:
        for size in sizes:
            generate(m, tiny.inputs([tiny.prompt(3, 4, 0)], [[size]]), 2)
            sample = run.report()["samples"][0]
            assert sample["visual_tokens_in"] == tiny.COUNTS[size]
            assert sample["final_budget"] <= math.ceil(0.25 * tiny.COUNTS[size])  # pool: at most
            if method != "pool":
                assert sample["final_budget"] == math.ceil(0.25 * tiny.COUNTS[size])


def processor_two_images(family: str):
    """Two samples of two images each (the family's default size) and sample b alone (the same images)."""
    tiny = PROCESSOR[family]
    prompts, sizes = [tiny.prompt(2, 3, 5, images=2), tiny.prompt(4, 6, 6, images=2)], [[tiny.SIZE] * 2] * 2
    return tiny.inputs(prompts, sizes), lambda b: tiny.inputs([prompts[b]], [sizes[b]], seed=10 * b)


def qwen_two_images(family: str):
    x = qwen_tiny.batch([qwen_tiny.make_prompt(2, 3, 5, images=2), qwen_tiny.make_prompt(4, 6, 6, images=2)], images=2)
    return x, lambda b: qwen_tiny.sample(x, b, images=2)


# inputs, runs of image tokens per sample, tokens between the two images' spans, tokens generated
TWO_IMAGES = {"llava_next": (processor_two_images, 1, 0, 6),  # "<image> <image>": one run of 2 N tokens
              "internvl": (processor_two_images, 2, 2, 6),  # </img> <img> between
              **dict.fromkeys(QWEN, (qwen_two_images, 2, 4, 8))}  # <|vision_end|>, 2 words, <|vision_start|>


@pytest.mark.parametrize("family", list(TWO_IMAGES))
def test_two_images_in_one_prompt_each_pruned_separately(family):
    """Two images per prompt are two spans (only the counts split adjacent ones), each pruned to its own budget;
    batched = one by one."""
    make, runs, between, new = TWO_IMAGES[family]
    m, n = model(family), TINY[family].n
    x, alone = make(family)
    starts = (x["input_ids"] == IMAGE_TOKEN).long().diff(dim=1).eq(1).sum(1)
    assert starts.tolist() == [runs] * 2
    stock = generate(m, x, new)
    with vtprune.apply(m, "none") as run:
        assert torch.equal(generate(m, x, new), stock)
    assert run.gen.visual_index.shape == (2, 2, n)
    assert torch.equal(run.gen.visual_index[:, 1, 0], run.gen.visual_index[:, 0, -1] + 1 + between)
    for method in ("fastv", "parvts"):
        with vtprune.apply(m, method, budget=3) as run:
            together = generate(m, x, new)
            gen, report = run.gen, run.report()
            for b in range(2):
                assert torch.equal(generate(m, alone(b), new)[0], together[b]), (method, b)
        first = gen.visual_index[:, 1, 0]
        assert (gen.visual_index[:, 0, -1] < first).all()  # two spans, in prompt order
        full = 2 if method == "fastv" else 3  # FastV prunes at layer 2, ParVTS discards at layer 3
        assert report["samples"][1]["visual_tokens_per_layer_prefill"] == [2 * n] * full + [6] * (6 - full)
        kept = gen.cache_visual[5]
        assert kept.shape == (2, 2, 3)
        assert (kept[:, 0] < first[:, None]).all() and (kept[:, 1] >= first[:, None]).all()  # three from each image
    with vtprune.apply(m, "parvts", budget=5) as run:
        generate(m, x, new)
    assert run.report()["samples"][1]["visual_tokens_per_layer_prefill"][-1] == 10
    top = torch.topk(run.gen.saliency, 5, dim=-1).indices.sort(-1).values  # per image
    assert torch.equal(run.gen.cache_visual[5], torch.gather(run.gen.visual_index, 2, top))


MISMATCHED = {"llava_next": ((16, 64), r"mismatched images.*\[\[52, 34\]\]"),
              "internvl": ((32, 32), r"mismatched images.*\[\[48, 16\]\]")}


@pytest.mark.parametrize("family", list(MISMATCHED))
def test_images_of_different_sizes_in_one_prompt_raise(family):
    tiny, m, (other, message) = PROCESSOR[family], model(family), MISMATCHED[family]
    x = tiny.inputs([tiny.prompt(2, 3, 5, images=2)], [[tiny.SIZE, other]])
    with pytest.raises(ValueError, match=message):
        with vtprune.apply(m, "fastv", budget=4):
            generate(m, x, 2)
    assert "get_image_features" not in m.model.__dict__


# methods and options; visual tokens of the four samples of ``MIXED``; rows of their pixel_values
MIXED = {"llava_next": ([("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 8}), ("st3", {}),
                         ("pool", {"keep_ratio": 0.25}), ("none", {})], [52, 34, 52, 72], 4),
         "internvl": ([("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 8}), ("visionzip", {"budget": 8}),
                       ("pool", {"keep_ratio": 0.25}), ("none", {})], [48, 16, 48, 80], 3 + 1 + 3 + 5),  # tiles
         "llava_onevision": ([("fastv", {"keep_ratio": 0.25}), ("parvts", {"budget": 8}), ("visionzip", {"budget": 8}),
                              ("pool", {"keep_ratio": 0.25}), ("none", {})], [46, 34, 46, 52], 4)}


@pytest.mark.parametrize("family,method,opts", [pytest.param(f, m, o, id=f"{f}-{m}") for f, (rows, *_) in
                                                MIXED.items() for m, o in rows])
def test_a_batch_of_mixed_image_sizes_runs_as_groups_and_equals_one_by_one(family, method, opts):
    """A ``generate`` batch whose images give different token counts runs as groups of alike samples and gives
    what each sample gives alone; with ``none`` it equals the stock batch; the caller gets its prompt back and
    ``return_dict_in_generate`` (the call's or the model's default) is refused."""
    tiny, m, (_, counts, rows) = PROCESSOR[family], model(family), MIXED[family]
    prompts = [tiny.prompt(2 + b, 3 + 2 * b, 20 + b) for b in range(len(tiny.MIXED))]
    x = tiny.inputs(prompts, tiny.MIXED)
    assert x["pixel_values"].shape[0] == rows
    full = vtprune.apply(m, method, **opts)
    with full as run:
        out = m.generate(**x, do_sample=False, max_new_tokens=4)
        together = out[:, -4:]
        assert torch.equal(out[:, :x["input_ids"].shape[1]], x["input_ids"])  # the caller's prompt, then new tokens
        report = run.report()
        assert [s["visual_tokens_in"] for s in report["samples"]] == counts
        assert report["timing"]["groups"] == [[0, 2], [1], [3]]
        with pytest.raises(RuntimeError, match="ran as groups"):
            run.kept_visual(1)
        for b in range(len(tiny.MIXED)):
            one = tiny.inputs([prompts[b]], [tiny.MIXED[b]], seed=10 * b)  # the same image as in the batch
            assert torch.equal(generate(m, one, 4)[0], together[b]), f"sample {b}"
    if method == "none":  # the stock model batches mixed sizes itself: the groups give its output
        assert torch.equal(generate(m, x, 4), together)
    with pytest.raises(ValueError, match="return_dict_in_generate is not supported"), full:
        m.generate(**x, do_sample=False, max_new_tokens=2, return_dict_in_generate=True)
    m.generation_config.return_dict_in_generate = True  # the model's own default, not the call's
    try:
        with pytest.raises(ValueError, match="return_dict_in_generate is not supported"), full:
            m.generate(**x, do_sample=False, max_new_tokens=2)
    finally:
        m.generation_config.return_dict_in_generate = False


# ---------------------------------------------------------------- saliency = the tower's own eager attention
def next_cls_attention(m, x: dict, case: tuple, monkeypatch) -> torch.Tensor:
    """LLaVA-NeXT: [CLS] attention of every tile from the tower run eagerly (output_attentions), packed by hand:
    base tile, then the (grid[0] * 4) x (grid[1] * 4) patch map cropped to ``rows`` x ``cols``, -inf after each
    row. [B, 1, tokens]."""
    _, n_tiles, grid, rows, cols = case
    out = []
    for b in range(x["pixel_values"].shape[0]):
        attn = eager_tower_attentions(m, x["pixel_values"][b, :n_tiles])
        cls = attn[1][:, :, 0, 1:].sum(1)  # feature layer -2 of 3 = output of encoder layer 1; drop [CLS]
        packed = cls[0].tolist()
        for r in rows:
            for c in cols:
                tile = 1 + (r // 4) * grid[1] + c // 4
                packed.append(float(cls[tile, (r % 4) * 4 + c % 4]))
            packed.append(float("-inf"))
        out.append(torch.tensor(packed)[None])
    return torch.stack(out)


def onevision_received_attention(m, x: dict, case: tuple, monkeypatch) -> torch.Tensor:
    """LLaVA-OneVision: the attention each patch of every tile receives in SigLIP's last layer (feature layer
    -1; tower run eagerly, mean over heads and queries; each tile's sums to 1), packed by hand: base tile, then
    the tiles' patch map cropped to the unpadded rows and columns, bilinearly resized to the downsampled grid
    where ``anyres_max_2`` downsamples, -inf after each row. [B, 1, tokens]."""
    size, tiles, (tile_rows, tile_cols), rows, cols = case
    out = []
    for b in range(x["pixel_values"].shape[0]):
        per_tile = eager_tower_attentions(m, x["pixel_values"][b, :tiles])[-1].mean(1).mean(1)  # [tiles, 16]
        torch.testing.assert_close(per_tile.sum(-1), torch.ones(tiles))
        grid = per_tile[1:].view(tile_rows, tile_cols, 4, 4).permute(0, 2, 1, 3).reshape(4 * tile_rows, 4 * tile_cols)
        grid = grid[rows, cols]
        if size in onevision_tiny.DOWNSAMPLED:
            grid = F.interpolate(grid[None, None], size=onevision_tiny.GRIDS[size], mode="bilinear")[0, 0]
        with_newlines = torch.cat([grid, torch.full((grid.shape[0], 1), float("-inf"))], 1)
        out.append(torch.cat([per_tile[0], with_newlines.flatten()])[None])
    return torch.stack(out)


def internvl_cls_attention(m, x: dict, case: tuple, monkeypatch) -> torch.Tensor:
    """InternVL: [CLS] attention of every tile from the tower run eagerly (last block = feature layer -1),
    summed over heads, [CLS] column dropped, then summed over each 2 x 2 patch block (the pixel shuffle's
    token); each tile's at most the 4 heads' sum. [B, images, tokens]: 3 tiles an image, in order."""
    attn = eager_tower_attentions(m, x["pixel_values"])[-1]
    cls = attn[:, :, 0, 1:].sum(1).view(-1, 4, 2, 4, 2)  # [tiles, token row, patch row, token col, patch col]
    expected = cls.sum((2, 4)).flatten(1).view(2, 2, internvl_tiny.N)
    assert (expected.view(4, 3, internvl_tiny.P).sum(-1) <= 4 + 1e-5).all()
    return expected


def qwen_received_attention(m, x: dict, case: tuple, monkeypatch) -> torch.Tensor:
    """Qwen: the attention each patch receives in the tower's last full-attention block (its own eager weights,
    per image; mean over heads and queries), summed over the merger's 2 x 2 groups, back from Qwen2.5-VL's
    window order (:func:`qwen_tiny.tower_received_attention`). [B, 1, tokens]."""
    tokens = qwen_tiny.tower_received_attention(m, x["pixel_values"], x["image_grid_thw"], monkeypatch)
    return tokens.view(3, 1, qwen_tiny.N_VISUAL)


def gemma3_received_attention(m, x: dict, case: tuple, monkeypatch) -> torch.Tensor:
    """Gemma 3: the attention each patch receives in the tower's last layer (eager; mean over heads and
    queries), summed over each 2 x 2 pooling window. [B, 1, tokens]."""
    weights = eager_tower_attentions(m, x["pixel_values"])[-1]  # [3, H, 64, 64]
    received = weights.float().mean(1).mean(1).view(3, 4, 2, 4, 2)  # per patch, in 4 x 4 windows of 2 x 2
    return received.sum((2, 4)).view(3, 1, gemma3_tiny.N)


def two_prompts(family: str, size, images: int = 1) -> dict:
    tiny = PROCESSOR[family]
    return tiny.inputs([tiny.prompt(2, 3, 1, images=images), tiny.prompt(4, 2, 2, images=images)], [[size] * images] * 2)


def chunk_rows(module, heads: Callable[[torch.nn.Module], int], elements_per_row: int):
    """Make ``module.attention_received`` work in chunks of ``rows`` query rows."""
    def chunk(monkeypatch, m, rows):
        monkeypatch.setattr(module, "attention_received", functools.partial(
            module.attention_received, max_elements=heads(m) * elements_per_row * rows))
    return chunk


@dataclasses.dataclass(frozen=True)
class Saliency:
    """A family's saliency check: ``inputs(case)``, ``reference(model, inputs, case, monkeypatch)`` (the tower's
    own eager attention as the adapter should hand it over, [B, I, tokens], -inf at tokens that are no patch),
    the cases (case, shape of the saliency), the calls (generate / forward) and query-row chunks it runs
    under, ParVTS's budget, the tolerance, and whether each image's saliency sums to 1."""

    inputs: Callable[[tuple], dict]
    reference: Callable
    cases: list
    calls: tuple = ("generate", "forward")
    chunks: tuple = (None,)
    chunk: Callable | None = None
    budget: int = 6
    atol: float = 1e-5
    sums_to_one: bool = False


# LLaVA-NeXT: (size, tiles, tile grid, unpadded rows, unpadded cols); LLaVA-OneVision: read off onevision_tiny
NEXT_CASES = [((16, 64), 3, (1, 2), range(1, 3), range(8)),  # wide: rows unpadded
              ((64, 48), 5, (2, 2), range(8), range(1, 7))]  # tall: columns unpadded
ONEVISION_CASES = [((16, 64), 3, (1, 2), slice(1, 3), slice(0, 8)), ((64, 48), 5, (2, 2), slice(0, 8), slice(1, 7)),
                   ((64, 64), 5, (2, 2), slice(0, 8), slice(0, 8))]
QWEN_SALIENCY = Saliency(lambda case: qwen_batch(), qwen_received_attention, [("standard", (3, 1, qwen_tiny.N_VISUAL))],
                         calls=("generate",), chunks=(None, 5), budget=4, atol=1e-6, sums_to_one=True,
                         chunk=chunk_rows(qwen2_vl, lambda m: m.config.vision_config.num_heads, qwen_tiny.N_PATCHES))
SALIENCY = {
    "llava_next": Saliency(lambda case: two_prompts("llava_next", case[0]), next_cls_attention,
                           [(c, (2, 1, next_tiny.COUNTS[c[0]])) for c in NEXT_CASES]),
    "llava_onevision": Saliency(lambda case: two_prompts("llava_onevision", case[0]), onevision_received_attention,
                                [(c, (2, 1, onevision_tiny.COUNTS[c[0]])) for c in ONEVISION_CASES]),
    "internvl": Saliency(lambda case: two_prompts("internvl", internvl_tiny.SIZE, images=2), internvl_cls_attention,
                         [("two-images", (2, 2, internvl_tiny.N))]),
    **dict.fromkeys(QWEN, QWEN_SALIENCY),
    "gemma3": Saliency(lambda case: gemma3_tiny.batch(), gemma3_received_attention, [("standard", (3, 1, gemma3_tiny.N))],
                       calls=("generate",), chunks=(None, 5), budget=4, atol=1e-6, sums_to_one=True,
                       chunk=chunk_rows(gemma3, lambda m: m.config.vision_config.num_attention_heads, 3 * 64)),
}


def saliency_cases() -> list:
    out = []
    for f, sal in SALIENCY.items():
        for i, (case, _) in enumerate(sal.cases):
            name = f"{case[0][0]}x{case[0][1]}" if isinstance(case, tuple) else case
            for call in sal.calls:
                for rows in sal.chunks:
                    chunks = "one-chunk" if rows is None else f"chunks-of-{rows}-query-rows"
                    out.append(pytest.param(f, i, call, rows, id=f"{f}-{name}-{call}-{chunks}"))
    return out


@pytest.mark.parametrize("family,case,call,rows", saliency_cases())
def test_saliency_is_the_towers_eager_attention(family, case, call, rows, monkeypatch):
    """ParVTS's saliency, under generate or a direct forward (and in chunks of query rows), is the tower's own
    eager attention as the family's reference packs it. A direct forward passes pixel_values; generate passes
    them too (transformers < 5.23) or encodes the images before the prefill (through the wrapped
    get_image_features, whose signature it inspects) and passes mm_encoder_outputs instead: the saliency must
    come out the same either way."""
    sal, m = SALIENCY[family], model(family)
    spec, shape = sal.cases[case]
    if rows is not None:
        sal.chunk(monkeypatch, m, rows)
    x = sal.inputs(spec)
    calls = []
    spy = m.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        with vtprune.apply(m, "parvts", budget=sal.budget) as run:
            if call == "generate":
                generate(m, x, 1)
            else:
                with torch.no_grad():
                    m(**x)
    finally:
        spy.remove()
    encoded = "image" in (calls[0].get("mm_encoder_outputs") or {})
    assert (calls[0].get("pixel_values") is None) == encoded
    assert not encoded or call == "generate"
    ours = run.gen.saliency
    assert ours.shape == shape
    expected = sal.reference(m, x, spec, monkeypatch)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)], atol=sal.atol, rtol=1e-5)
    if sal.sums_to_one:
        assert torch.allclose(ours.sum(-1), torch.ones(ours.shape[:-1]))


# ---------------------------------------------------------------- pool: grids and windows
def next_grids(size) -> tuple[PatchGrid, ...]:
    rows, cols = {(20, 40): (4, 8), (16, 64): (2, 8), (64, 48): (8, 6), (64, 64): (8, 8)}[size]  # unpadded (docstring)
    return PatchGrid(4, 4), PatchGrid(rows, cols, start=16, stride=cols + 1)


def onevision_grids(size) -> tuple[PatchGrid, ...]:
    rows, cols = onevision_tiny.GRIDS[size]  # unpadded or downsampled
    return PatchGrid(4, 4), PatchGrid(rows, cols, start=onevision_tiny.P, stride=cols + 1)


def internvl_grids(size) -> tuple[PatchGrid, ...]:
    return tuple(PatchGrid(4, 4, start=16 * t) for t in range(internvl_tiny.TILES[size]))  # one 4 x 4 grid per tile


# sizes, grids of a size, the keyword arguments generate consumes before the prefill (the engine hands them on),
# whether the grids follow from the token count alone (without the call's inputs)
GRIDS = {"llava_next": (next_grids, ("image_sizes",), False),
         "llava_onevision": (onevision_grids, ("image_sizes", "batch_num_images"), False),
         "internvl": (internvl_grids, (), True)}


@pytest.mark.parametrize("family,size", [pytest.param(f, s, id=f"{f}-{s[0]}x{s[1]}") for f in GRIDS
                                         for s in PROCESSOR[f].COUNTS])
def test_grids_of_each_image_size(family, size):
    tiny, m, (grids, consumed, from_count) = PROCESSOR[family], model(family), GRIDS[family]
    x = tiny.inputs([tiny.prompt(3, 4, 0)], [[size]])
    adapter = adapter_for(m)
    visual = adapter.visual_index(x["input_ids"], x)
    expected = grids(size)
    assert adapter.visual_grids(visual, x) == expected
    assert adapter.visual_grids(visual, {"generate_kwargs": {k: x[k] for k in consumed}}) == expected
    assert adapter.visual_grids(visual, {}) == (expected if from_count else None)
    assert adapter.visual_grid(visual, x) is None  # not one grid


def next_pool():
    """LLaVA-NeXT, 52 = base 4x4 + 4x8 grid with a newline per row; least 1 + 2, spare 9 split 16:36 -> base
    4, high-res 8; base 4x4 -> 2x2; high-res: a * (b + 1) <= 8 -> 2x3 + 2 newlines."""
    base = [0, 2, 8, 10]  # 2x2 windows of 2x2 patches: centre = top-left
    hires_rows, hires_cols = [0, 2], [1, 3, 6]  # adaptive windows of 8 cols into 3: [0,3) [2,6) [5,8)
    hires = [16 + r * 9 + c for r in hires_rows for c in hires_cols]
    newlines = [16 + r * 9 + 8 for r in hires_rows]
    windows = {0: [0, 1, 4, 5], 16 + 2 * 9 + 3: [16 + r * 9 + c for r in (2, 3) for c in (2, 3, 4, 5)]}
    return sorted(base + hires + newlines), windows, newlines


def internvl_pool():
    """InternVL, 3 tiles of 4 x 4: least 1 each, spare 9 split 16:16:16 -> 4 per tile -> 2 x 2 windows of 2 x 2
    tokens (centres: top-left)."""
    windows = {16 * t + r * 4 + c: [16 * t + (r + a) * 4 + c + b for a in (0, 1) for b in (0, 1)]
               for t in range(3) for r in (0, 2) for c in (0, 2)}
    return [16 * t + c for t in range(3) for c in (0, 2, 8, 10)], windows, []


POOL = {"llava_next": next_pool, "internvl": internvl_pool}  # kept, {kept: the window it pools}, kept unchanged


@pytest.mark.parametrize("family", list(POOL))
def test_pool_pools_each_grid_on_its_own(family):
    """Pool (budget 12) on one image: the kept tokens, each the mean of its window of the layer-0 input, tokens
    that are no patch (newlines) unchanged."""
    m, x, n = model(family), TINY[family].batch((0,)), TINY[family].n
    kept, windows, unchanged = POOL[family]()
    stock_h = layer0_input(m, x)
    with vtprune.apply(m, "pool", budget=12) as run:
        pooled_h = layer0_input(m, x)  # the spy runs after the engine's own layer-0 hook
    start = int(run.gen.visual_index[0, 0, 0])
    assert run.gen.visual[0, 0].tolist() == [start + k for k in kept]
    index = run.gen.layouts[0].index[0].tolist()
    vis = stock_h[0, start:start + n]
    for k, window in windows.items():
        torch.testing.assert_close(pooled_h[0, index.index(start + k)], vis[window].mean(0))
    for k in unchanged:
        assert torch.equal(pooled_h[0, index.index(start + k)], vis[k])  # the newline embedding itself
    assert run.report()["samples"][0]["visual_tokens_per_layer_prefill"] == [12] * TINY[family].layers
