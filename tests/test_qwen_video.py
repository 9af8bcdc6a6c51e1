"""Video on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: what the conformance matrix (its ``*_video`` families) does not
check. A video is one visual unit (every frame's tokens): its tokens, kinds and counts, saliency per temporal
patch from the tower's own eager attention, original M-RoPE positions (the temporal row included), prompts of
several videos and of images with videos (saliency put in prompt order), batches whose videos differ (groups),
``pool`` over frames x rows x cols, and the layout of the synthetic inputs against the real video processor
(where torchvision imports).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import qwen_tiny
import torch
from conftest import left_pad
from qwen_tiny import FAMILIES, FRAMES, IMAGE_TOKEN, MERGE, N_VIDEO, N_VISUAL, VIDEO_TOKEN, video_batch

import vtprune

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 4
BATCH = (0, 1, 2)


@functools.cache
def model(family: str):
    return qwen_tiny.tiny_qwen(family)


def generate(m, x, new: int = NEW) -> torch.Tensor:
    return m.generate(**x, max_new_tokens=new, do_sample=False)[:, -new:]


# ---------------------------------------------------------------- tokens, kinds, counts
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parts,frames", [(("video",), FRAMES), (("video", "video"), FRAMES), (("image", "video"), 2),
                                          (("video", "image"), 2)])
def test_videos_and_images_are_units_in_prompt_order(family, parts, frames):
    """Every image and video is one unit of the right tokens and kind, in prompt order; keep-all equals stock,
    a pruned batch equals its samples one by one, and the report counts the video tokens per layer."""
    m, x = model(family), video_batch(family, BATCH, parts, frames)
    ids = x["input_ids"]
    stock = generate(m, x)
    with vtprune.apply(m, "none") as run:
        assert torch.equal(generate(m, x), stock)
    n = N_VIDEO if frames == FRAMES else N_VISUAL
    assert run.gen.visual_index.shape == (3, len(parts), n)
    assert run.gen.kinds == parts
    for i, part in enumerate(parts):
        token = VIDEO_TOKEN if part == "video" else IMAGE_TOKEN
        assert (torch.gather(ids, 1, run.gen.visual_index[:, i]) == token).all()
    assert int(torch.isin(ids, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])).sum()) == run.gen.visual_index.numel()
    with vtprune.apply(m, "parvts", budget=4) as run:
        together = generate(m, x)
        report = run.report()["samples"][0]
        for b in BATCH:
            assert torch.equal(generate(m, video_batch(family, (b,), parts, frames))[0], together[b]), b
    assert report["visual_kinds"] == list(parts)
    layers = report["visual_tokens_per_layer_prefill"]
    assert layers[-1] == 4 * len(parts) and layers[0] == n * len(parts)
    videos = parts.count("video")
    assert report["video_tokens_per_layer_prefill"] == [v * videos // len(parts) for v in layers]


def test_qwen3_vl_video_tokens_sit_between_timestamps():
    """Qwen3-VL writes a timestamp before each temporal patch: a video's tokens are several runs, one unit."""
    x = video_batch("qwen3_vl", (0,))
    with vtprune.apply(model("qwen3_vl"), "none") as run:
        generate(model("qwen3_vl"), x, 1)
    index = run.gen.visual_index[0, 0]
    assert index.numel() == N_VIDEO
    assert int((index[1:] != index[:-1] + 1).sum()) == FRAMES // qwen_tiny.TEMPORAL - 1  # one gap per timestamp


def test_a_prompt_whose_image_and_video_counts_differ_is_refused():
    m = model("qwen2_vl")
    x = video_batch("qwen2_vl", (0,), ("image", "video"), FRAMES)  # 16 image tokens, 32 video tokens
    with vtprune.apply(m, "fastv", budget=4), pytest.raises(ValueError, match=r"mismatched images / videos.*'video', 32"):
        generate(m, x)
    assert torch.equal(generate(m, x), generate(m, x))  # the model is stock again


def test_video_tokens_that_disagree_with_the_grid_are_refused():
    m = model("qwen2_vl")
    x = video_batch("qwen2_vl", (0,))
    x["video_grid_thw"] = torch.tensor([[1, 8, 8]])  # 16 tokens for a prompt that holds 32
    with vtprune.apply(m, "fastv", budget=4), pytest.raises(ValueError, match=r"video tokens disagree .* \[16\] = 16"), \
            torch.no_grad():
        m(**x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,opts", [("fastv", {"budget": 4}), ("pool", {"budget": 8}), ("st3", {})])
def test_a_batch_of_videos_of_different_lengths_runs_as_groups(family, method, opts):
    """Videos of 4 and 2 frames (32 and 16 tokens) in one generate batch: groups, each equal to one by one."""
    m = model(family)
    parts = [video_batch(family, (i,), ("video",), f) for i, f in zip(BATCH, (FRAMES, 2, FRAMES), strict=True)]
    prompts = [p["input_ids"][0].tolist() for p in parts]
    ids, mask = left_pad(prompts)
    x = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": 2 * (ids == VIDEO_TOKEN).int(),
         "pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in parts]),
         "video_grid_thw": torch.cat([p["video_grid_thw"] for p in parts])}
    with vtprune.apply(m, method, **opts):
        together = m.generate(**x, max_new_tokens=NEW, do_sample=False)
        for i, p in enumerate(parts):
            alone = generate(m, p)
            assert torch.equal(together[i, -NEW:], alone[0]), i


# ---------------------------------------------------------------- saliency: per temporal patch, the tower's own
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parts,frames", [(("video",), FRAMES), (("video", "image"), 2)])
def test_video_saliency_is_the_towers_attention_per_temporal_patch(family, parts, frames, monkeypatch):
    """ParVTS's saliency of a video is, per temporal patch, the attention each merged token receives in the
    tower (eager reference), so each temporal patch sums to 1; with an image after the video in the prompt
    the tower ran the image first, and the saliency still comes in prompt order."""
    m, x = model(family), video_batch(family, BATCH, parts, frames)
    with vtprune.apply(m, "parvts", budget=4) as run:
        generate(m, x, 1)
    ours = run.gen.saliency
    n = ours.shape[-1]
    expected = {"video": qwen_tiny.tower_received_attention(m, x["pixel_values_videos"], x["video_grid_thw"], monkeypatch).view(3, -1, n)}
    if "image" in parts:
        expected["image"] = qwen_tiny.tower_received_attention(m, x["pixel_values"], x["image_grid_thw"], monkeypatch).view(3, -1, n)
    seen = dict.fromkeys(expected, 0)
    for i, part in enumerate(parts):
        torch.testing.assert_close(ours[:, i], expected[part][:, seen[part]], atol=1e-6, rtol=1e-5)
        seen[part] += 1
    per_patch = N_VISUAL
    torch.testing.assert_close(ours.view(3, len(parts), -1, per_patch).sum(-1), torch.ones(3, len(parts), n // per_patch))


# ---------------------------------------------------------------- positions: original M-RoPE, temporal row included
class LayerInputs:
    """Each prefill decoder layer's rotary cos and the layout's original indices (under ``run``)."""

    def __init__(self, m, run=None):
        self.run, self.seen = run, {}
        self.handles = [layer.register_forward_pre_hook(functools.partial(self._pre, i), with_kwargs=True)
                        for i, layer in enumerate(m.model.language_model.layers)]

    def _pre(self, layer, module, args, kwargs):
        if layer not in self.seen:
            index = self.run.gen.layout.index.clone() if self.run is not None else None
            group = self.run.gen.layout.group if self.run is not None else None
            self.seen[layer] = (kwargs["position_embeddings"][0].clone(), index, None if group is None else group.clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,opts", [("random", {"budget": 5}), ("parvts", {"budget": 4}), ("pool", {"budget": 8})])
def test_kept_video_tokens_keep_their_original_mrope_positions(family, method, opts):
    """At every prefill layer each kept slot carries the stock rotary of its original token: the video's
    temporal, height and width positions, which do vary across the video's tokens."""
    m, x = model(family), video_batch(family, BATCH)
    with LayerInputs(m) as stock:
        generate(m, x, 1)
    with vtprune.apply(m, method, **opts) as run, LayerInputs(m, run) as pruned:
        generate(m, x, 1)
    valid = x["attention_mask"].bool()
    kwargs = {"video_grid_thw": x["video_grid_thw"], "attention_mask": x["attention_mask"]}
    mrope, _ = m.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], **kwargs)
    video = run.gen.visual_index[0, 0]
    assert all(len(set(mrope[axis, 0, video].tolist())) > 1 for axis in range(3))  # t, h and w all vary
    stock_cos = stock.seen[0][0]
    shortened = False
    for layer, (cos, index, group) in pruned.seen.items():
        shortened |= index.shape[1] < x["input_ids"].shape[1]
        for b in BATCH:
            real = valid[b, index[b]]
            if group is not None:
                real &= group[b] >= 0
            assert torch.equal(cos[b, real], stock_cos[b, index[b, real]]), (layer, b)
    assert shortened


# ---------------------------------------------------------------- pool over frames x rows x cols
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_pool_averages_spatio_temporal_windows_of_a_video(family):
    """8 frames = 4 temporal patches of 4 x 4 merged tokens; budget 16 pools to 2 x 2 x 4 (of the shapes that
    use the whole budget, 1 x 4 x 4, 2 x 2 x 4 and 4 x 2 x 2, the one whose time axis shrinks most like the
    space axes): each kept token is the mean of its 2 x 2 x 1 window's layer-0 inputs and sits at the
    window's centre (frame, row, col)."""
    m = model(family)
    x = video_batch(family, (0,), ("video",), 8)
    inputs: dict = {}

    def record(module, args, kwargs):
        inputs.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).clone())

    layer0 = m.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(m, x, 1)
    finally:
        handle.remove()
    stock = inputs.pop("hidden")
    with vtprune.apply(m, "pool", budget=16) as run:
        handle = layer0.register_forward_pre_hook(record, with_kwargs=True)  # after vtprune's: the pooled input
        try:
            generate(m, x, 1)
        finally:
            handle.remove()
    kept = run.kept_visual()[0]
    assert len(kept) == 16
    frames = torch.tensor(kept) // 16
    assert frames.unique().tolist() == [0, 2] and (frames.bincount()[[0, 2]] == 8).all()
    video = run.gen.visual_index[0, 0]
    cells = stock[0, video].view(4, 4, 4, -1)  # [frame, row, col, d]
    pooled = torch.nn.functional.avg_pool3d(cells.permute(3, 0, 1, 2)[None], (2, 2, 1))[0].permute(1, 2, 3, 0)
    slots = torch.searchsorted(run.gen.layouts[0].index[0], video[torch.tensor(kept)])
    got = inputs["hidden"][0, slots]
    torch.testing.assert_close(got, pooled.reshape(16, -1), atol=1e-5, rtol=1e-5)
    centres = [f * 16 + r * 4 + c for f in (0, 2) for r in (0, 2) for c in range(4)]
    assert kept == centres


# ---------------------------------------------------------------- the synthetic layout = the real video processor
def test_synthetic_video_pixels_match_the_real_video_processor():
    """``qwen_tiny.video_pixels`` lays out frames as ``Qwen2VLVideoProcessor`` does (it needs torchvision)."""
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLVideoProcessor

    video = qwen_tiny.random_video(0)
    processor = Qwen2VLVideoProcessor(patch_size=qwen_tiny.PATCH, temporal_patch_size=qwen_tiny.TEMPORAL,
                                      merge_size=MERGE, min_pixels=16 * 16, max_pixels=32 * 32 * FRAMES,
                                      do_resize=False, do_sample_frames=False)
    real = processor(videos=[video], return_tensors="pt")
    ours = qwen_tiny.video_pixels([video])
    assert torch.equal(real["video_grid_thw"], ours["video_grid_thw"])
    torch.testing.assert_close(real["pixel_values_videos"], ours["pixel_values_videos"], atol=1e-5, rtol=1e-5)
    assert np.array_equal(video, qwen_tiny.random_video(0))
