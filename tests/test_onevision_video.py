"""LLaVA-OneVision video on a tiny random-weight ``LlavaOnevisionForConditionalGeneration`` (models and inputs:
``onevision_tiny.py``: 4-frame videos of 32 x 32 px, 17 tokens each, the newline last): video tokens are
visual units (one per video), alone, several per prompt and beside images; keep-all = stock and batched =
one by one for every method on those prompts (one video per prompt: the ``llava_onevision_video`` family of
``test_conformance.py``); original positions; the report's per-layer counts by kind; batches whose samples
differ run as groups; the per-frame saliency against the tower's eager attention; the newline never chosen
by saliency; the video's patch grid; the errors."""

from __future__ import annotations

import functools
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
from families import METHODS
from families import method_options as options
from family_checks import LayerSpy, eager_tower_attentions, generate, layer0_input
from onevision_tiny import (
    FRAMES,
    LAYERS,
    POOLED,
    VIDEO_N,
    VIDEO_TOKEN,
    FrameProcessor,
    P,
    random_video,
    tiny_onevision,
    video_batch,
)

import vtprune
from vtprune.adapters import PatchGrid, adapter_for

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 6
BATCH = (0, 1, 2)
PROMPTS = {"two_videos": ("video", "video"), "video_then_images": ("video", "image", "image")}
KINDS = {"two_videos": ["video", "video"], "video_then_images": ["video", "image", "image"]}


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


@functools.cache
def inputs(prompt: str, idx: tuple[int, ...] = BATCH) -> dict:
    return video_batch(idx, PROMPTS[prompt])


@functools.cache
def stock(model, prompt: str) -> torch.Tensor:
    return generate(model, inputs(prompt), NEW)


# ---------------------------------------------------------------- token counts, units, grids
@pytest.mark.parametrize("frames", [1, FRAMES])
def test_a_video_is_one_unit_of_its_frames_pooled_patches_and_a_newline(model, frames):
    x = video_batch((0, 1), ("video",), frames=frames)
    n = frames * POOLED**2 + 1
    adapter = adapter_for(model)
    assert adapter.video_tokens(frames) == n and adapter.pooled_side == POOLED
    visual = adapter.visual_index(x["input_ids"], x)
    starts = (x["input_ids"] == VIDEO_TOKEN).int().argmax(1)
    assert visual.tolist() == [[list(range(s, s + n))] for s in starts.tolist()]
    assert adapter.visual_kinds(x["input_ids"], x) == ("video",)
    with torch.no_grad():
        model(**x)  # the stock model checks the prompt's video tokens against its features itself
    grid = (PatchGrid(POOLED, POOLED, frames=frames),)  # the newline (last token) in no grid
    assert adapter.visual_grids(visual, x) == grid
    if "mm_encoder_outputs" in inspect.signature(model.model.forward).parameters:  # generate encodes first
        with torch.no_grad():
            encoded = {"mm_encoder_outputs": {"video": model.model.get_video_features(x["pixel_values_videos"])}}
        assert torch.equal(adapter.visual_index(x["input_ids"], encoded), visual)  # as generate's prefill sees it
        assert adapter.visual_grids(visual, encoded) == grid


def test_an_odd_patch_side_pools_to_its_ceiling_half_bilinearly():
    """A 40 px tile of 8 px patches (5 x 5, as the real 27 x 27) pools to 3 x 3 per frame: the count is the
    model's, and the saliency is pooled bilinearly as the features are (each pooled token a mixture)."""
    m = tiny_onevision(layers=1, image_size=40)
    adapter = adapter_for(m)
    pixels = torch.zeros(2, 3, 3, 40, 40)
    assert adapter.video_tokens(3) == 3 * 9 + 1
    ids = torch.tensor([[1, 5] + [VIDEO_TOKEN] * adapter.video_tokens(3) + [6]] * 2)
    with torch.no_grad():
        m(input_ids=ids, pixel_values_videos=pixels)  # the stock model checks the count against its features
        with pytest.raises(ValueError, match="do not match"):
            m(input_ids=ids[:, :-2], pixel_values_videos=pixels)  # one video token short: the check is real
    per_frame = torch.rand(2 * 3, 25)
    packed = adapter.pack_video_saliency(per_frame, {"pixel_values_videos": pixels})
    pooled = F.interpolate(per_frame.view(6, 1, 5, 5), size=(3, 3), mode="bilinear").reshape(2, 27)
    assert len(packed) == 2 and all(p.shape == (28,) and p[-1] == float("-inf") for p in packed)
    torch.testing.assert_close(torch.stack(packed)[:, :-1], pooled)
    assert not any(torch.isin(pooled, per_frame).all(-1))  # mixtures, not single patches


def test_frame_processor_is_the_video_processors_rescale_and_normalisation():
    real = FrameProcessor().real
    video = random_video(1)
    got = FrameProcessor()([video, random_video(2, size=(64, 48))], return_tensors="pt")["pixel_values_videos"]
    assert got.shape == (2, FRAMES, 3, 32, 32)  # the second resized to the processor's 32 x 32
    mean, std = torch.tensor(real.image_mean)[:, None, None], torch.tensor(real.image_std)[:, None, None]
    torch.testing.assert_close(got[0], (torch.from_numpy(video).permute(0, 3, 1, 2) / 255 - mean) / std)
    if importlib.util.find_spec("torchvision") is not None:  # the real LlavaOnevisionVideoProcessor needs it
        torch.testing.assert_close(got[:1], real([video], return_tensors="pt")["pixel_values_videos"])


# ---------------------------------------------------------------- several videos, videos beside images
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_keeping_every_token_equals_stock(model, prompt, method):
    with vtprune.apply(model, method, **options(method, "keep_all")) as run:
        out = generate(model, inputs(prompt), NEW)
    assert torch.equal(out, stock(model, prompt))
    sample = run.report()["samples"][0]
    units = len(PROMPTS[prompt])
    assert sample["visual_kinds"] == KINDS[prompt]
    assert sample["visual_tokens_per_layer_prefill"] == [units * VIDEO_N] * LAYERS
    assert sample["video_tokens_per_layer_prefill"] == [KINDS[prompt].count("video") * VIDEO_N] * LAYERS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_batched_equals_one_by_one_with_pruning(model, prompt, method):
    opts = options(method, "prune")
    if method == "pool" and "image" in PROMPTS[prompt]:
        with pytest.raises(ValueError, match="do not form known patch grids"), vtprune.apply(model, method, **opts):
            generate(model, inputs(prompt), 2)  # an image's grid and a video's differ: no common grid
        return
    with vtprune.apply(model, method, **opts) as run:
        together = generate(model, inputs(prompt), NEW)
        counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
        for i in BATCH:
            assert torch.equal(generate(model, inputs(prompt, (i,)), NEW)[0], together[i]), f"sample {i}"
    if method != "none":
        assert min(counts) < len(PROMPTS[prompt]) * VIDEO_N  # the example really prunes


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_per_layer_counts_by_kind_and_budget_per_video(model, prompt):
    """FastV, budget 6 from layer 2: every unit (each video, each image) keeps 6 tokens; the report says which
    units are videos and counts their tokens per layer."""
    with vtprune.apply(model, "fastv", budget=6, layer=2) as run:
        generate(model, inputs(prompt), NEW)
    units, videos = len(PROMPTS[prompt]), KINDS[prompt].count("video")
    for sample in run.report()["samples"]:
        assert sample["visual_kinds"] == KINDS[prompt]
        assert sample["visual_tokens_per_layer_prefill"] == [units * VIDEO_N] * 2 + [units * 6] * (LAYERS - 2)
        assert sample["video_tokens_per_layer_prefill"] == [videos * VIDEO_N] * 2 + [videos * 6] * (LAYERS - 2)
    assert run.gen.cache_visual[-1].shape == (len(BATCH), units, 6)


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_kept_video_tokens_keep_their_original_positions(model, call):
    """FastV (budget 6 from layer 2) on two videos per prompt: each decoder layer gets the stock positions at
    the kept tokens' original indices (generate: those of a left-padded batch), and decode step t the
    prompt's last position + t."""
    x = inputs("two_videos")
    with vtprune.apply(model, "fastv", budget=6, layer=2) as run, LayerSpy(model, run) as spy:
        if call == "generate":
            generate(model, x, 3)
        else:
            with torch.no_grad():
                model(**x)
    if call == "generate":
        positions = (x["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(x["input_ids"].shape[1]).expand(len(BATCH), -1)
    layer4 = spy.prefill()[4]
    kept = run.gen.cache_visual[4].flatten(1)
    assert torch.isin(kept, layer4["index"]).all() and (x["input_ids"].gather(1, kept) == VIDEO_TOKEN).all()
    assert layer4["index"].shape[1] == x["input_ids"].shape[1] - 2 * (VIDEO_N - 6)
    for call_ in spy.prefill():  # (a direct forward's unpruned layers get the model's [1, S] positions)
        expected = positions.gather(1, call_["index"])
        assert torch.equal(call_["pos"].expand_as(expected), expected), call_["layer"]
    for t in range(1, 3 if call == "generate" else 1):
        assert torch.equal(spy.calls[t * LAYERS]["pos"], positions[:, -1:] + t), f"decode step {t}"


# ---------------------------------------------------------------- samples that differ: groups
MIXED = [("video",), ("image",), ("image", "image", "video")]  # 1 x 17, 1 x 46 (a tiled image), 3 x 17 tokens


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"keep_ratio": 0.25}), ("visionzip", {"budget": 8})])
def test_a_batch_of_samples_with_different_units_runs_as_groups(model, method, opts):
    """One video, one tiled image, two images and a video: three groups (``batch_num_images`` recounted for
    each), each sample as alone; with ``none`` the stock model's own batch."""
    x = video_batch(BATCH, MIXED)
    assert x["batch_num_images"].tolist() == [1, 2]  # per sample that has images, as the processor counts
    with vtprune.apply(model, method, **opts) as run:
        together = generate(model, x, 4)
        report = run.report()
        for i in BATCH:
            assert torch.equal(generate(model, video_batch((i,), [MIXED[i]]), 4)[0], together[i]), f"sample {i}"
    assert report["timing"]["groups"] == [[0], [1], [2]]
    assert [s["visual_kinds"] for s in report["samples"]] == [["video"], ["image"], ["image", "image", "video"]]
    assert [s["visual_tokens_in"] for s in report["samples"]] == [VIDEO_N, 46, 3 * VIDEO_N]
    if method == "none":
        assert torch.equal(generate(model, x, 4), together)


# ---------------------------------------------------------------- saliency per frame
def eager_video_saliency(model, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """The attention each patch of every frame receives in SigLIP's last layer (the feature layer), from the
    tower run eagerly (mean over heads and queries), each frame's 4 x 4 map bilinearly pooled to 2 x 2, the
    frames in order, then -inf for the newline: FloatTensor [n_videos, VIDEO_N]."""
    videos, frames = pixel_values_videos.shape[:2]
    received = eager_tower_attentions(model, pixel_values_videos.flatten(0, 1))[-1].mean(1).mean(1)  # [v * f, 16]
    side = int(P**0.5)
    pooled = F.interpolate(received.view(-1, 1, side, side), size=(POOLED, POOLED), mode="bilinear")
    return torch.cat([pooled.reshape(videos, -1), torch.full((videos, 1), float("-inf"))], 1)


def test_video_saliency_is_each_frames_received_attention_pooled_as_the_features(model):
    """Video first, then two images: the tower runs the images first, the saliency comes in prompt order."""
    x = inputs("video_then_images")
    with vtprune.apply(model, "visionzip", budget=6) as run:
        generate(model, x, 1)
    saliency = run.gen.saliency  # [3, 3, 17]
    videos = eager_video_saliency(model, x["pixel_values_videos"])
    images = eager_tower_attentions(model, x["pixel_values"][:, 0])[-1].mean(1).mean(1).view(3, 2, P)
    expected = torch.cat([videos[:, None], torch.cat([images, torch.full((3, 2, 1), float("-inf"))], -1)], 1)
    assert torch.equal(torch.isinf(saliency), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(saliency[finite], expected[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,opts", [("parvts", {"budget": VIDEO_N - 1}),
                                         ("visionzip", {"budget": VIDEO_N - 1, "contextual": 0})])
def test_saliency_methods_never_choose_the_newline(model, method, opts):
    """Keeping all but one token by saliency drops exactly each unit's newline (the last token)."""
    x = inputs("two_videos")
    with vtprune.apply(model, method, **opts) as run:
        generate(model, x, 2)
    kept = run.gen.cache_visual[-1]
    assert torch.equal(kept, run.gen.visual_index[..., :-1])


def test_parvts_ranks_across_all_frames(model):
    x = inputs("two_videos")
    with vtprune.apply(model, "parvts", budget=5, discard_layer=3) as run:
        generate(model, x, 2)
    reference = eager_video_saliency(model, x["pixel_values_videos"]).view(len(BATCH), 2, VIDEO_N)
    top = torch.topk(reference, 5, dim=-1).indices.sort(-1).values  # over every frame of each video
    assert torch.equal(run.gen.cache_visual[-1], torch.gather(run.gen.visual_index, 2, top))
    frames = top.div(POOLED**2, rounding_mode="floor")
    assert frames.amax() > 0  # not only the first frame


def test_pool_pools_each_video_in_time_and_space_and_keeps_its_newline(model):
    """``pool`` with a budget of 9 per video: the video's 4 x 2 x 2 grid pooled to 8 tokens of equal windows
    (so their mean is the mean of the 16 patches' embeddings), and the newline, in no grid, unchanged."""
    x = inputs("two_videos", (1,))
    stock_h = layer0_input(model, x)
    with vtprune.apply(model, "pool", budget=9) as run:
        pooled_h = layer0_input(model, x)
    assert run.gen.visual_grids == (PatchGrid(POOLED, POOLED, frames=FRAMES),)
    visual, kept = run.gen.visual_index[0], run.gen.visual[0]
    assert kept.shape == (2, 9)
    index = run.gen.layouts[0].index[0].tolist()
    for v in range(2):
        newline = int(visual[v, -1])
        assert newline in kept[v].tolist()
        assert torch.equal(pooled_h[0, index.index(newline)], stock_h[0, newline])
        centres = [int(k) for k in kept[v] if int(k) != newline]  # each pooled token at its window's centre
        assert len(centres) == 8 and len({(k - int(visual[v, 0])) // POOLED**2 for k in centres}) > 1  # in time too
        pooled = [index.index(k) for k in centres]
        torch.testing.assert_close(pooled_h[0, pooled].mean(0), stock_h[0, visual[v, :-1]].mean(0))


# ---------------------------------------------------------------- errors
def test_mismatched_units_and_inconsistent_video_inputs_raise(model):
    adapter = adapter_for(model)
    x = video_batch((0,), ("image", "video"))  # a tiled image (46 tokens) beside a video (17)
    with pytest.raises(ValueError, match=r"mismatched images / videos.*\('image', 46\), \('video', 17\)"):
        with vtprune.apply(model, "fastv", budget=4):
            generate(model, x, 2)
    assert "get_video_features" not in model.model.__dict__  # the saliency override is gone
    x = video_batch((0,), ("video",))
    ids = x["input_ids"]
    first = int((ids[0] == VIDEO_TOKEN).nonzero()[0])
    short = torch.cat([ids[:, :first], ids[:, first + 1:]], 1)
    with pytest.raises(ValueError, match=r"video tokens disagree with the videos: input_ids hold 16 .* \[17\]"):
        adapter.visual_index(short, x)
    with pytest.raises(ValueError, match=r"pixel_values_videos as \[n_videos, frames, 3, height, width\]"):
        adapter.visual_index(ids, {**x, "pixel_values_videos": x["pixel_values_videos"][0]})
