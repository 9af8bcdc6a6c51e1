"""Tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built from the real config classes, and their
inputs.

Images are random 32 x 32 px RGB pictures made into pixel values by the real image processor
(``Qwen2VLImageProcessor``, which all three families use) with 4 px patches: 8 x 8 patches (t = 1), merged
2 x 2 into N_VISUAL = 16 LLM tokens; one row of 3 x 2 x 4 x 4 values per patch.
"""

from __future__ import annotations

import sys

import conftest
import numpy as np
import torch
from conftest import left_pad
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253
PATCH, MERGE, TEMPORAL = 4, 2, 2
GRID = (1, 8, 8)  # (t, h, w) in patches
N_PATCHES = GRID[0] * GRID[1] * GRID[2]
N_VISUAL = N_PATCHES // MERGE**2  # 16
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEEPSTACK = (0, 1, 2)  # Qwen3-VL: the tower blocks whose features are added after LM layers 0, 1, 2

TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)


def tiny_qwen(family: str = "qwen2_vl", layers: int = 6, seed: int = 0, patch: int = PATCH):
    """A tiny ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` or
    ``Qwen3VLForConditionalGeneration`` (SDPA).

    Qwen2.5-VL's tower has 3 blocks, only block 1 attending over the whole image (the others over
    windows of 2 x 2 merged tokens: 4 windows per image), so its saliency block is not the last one.
    Qwen3-VL's tower has 3 blocks, each a DeepStack level (:data:`DEEPSTACK`, as the real model's 3 levels),
    a 4 x 4 learned position grid (interpolated to each image), and its LM interleaved M-RoPE with sections
    (4, 2, 2) of the 8 rotary frequencies (the real (24, 20, 20) of 64, scaled down). ``patch``: the ViT's
    patch size in px (default 4, the inputs of this module; the real models' 14 / 16 for photos).
    """
    torch.manual_seed(seed)
    text = dict(TEXT, num_hidden_layers=layers)
    common = dict(num_heads=4, patch_size=patch, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    if family == "qwen2_vl":
        vision = dict(common, depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **TOKENS))
    elif family == "qwen2_5_vl":
        vision = dict(common, depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                      window_size=2 * MERGE * PATCH, fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **TOKENS))
    elif family == "qwen3_vl":
        text = dict(text, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                        "mrope_interleaved": True, "rope_theta": 10000.0})
        vision = dict(common, depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                      num_position_embeddings=16, deepstack_visual_indexes=list(DEEPSTACK))
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **TOKENS))
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    model.eval()
    # random init gives near-uniform logits; a larger LM head scale makes greedy decoding decisive
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    assert model.config.text_config._attn_implementation == "sdpa"
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def make_prompt(prefix_len: int, question_len: int, seed: int, images: int = 1) -> list[int]:
    """BOS, prefix text, then per image ``<vision_start> <image_pad> x 16 <vision_end>`` and 2 text tokens,
    then the question."""
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, 240, (prefix_len,), generator=g).tolist()
    for _ in range(images):
        ids += [VISION_START] + [IMAGE_TOKEN] * N_VISUAL + [VISION_END] + torch.randint(3, 240, (2,), generator=g).tolist()
    return ids + torch.randint(3, 240, (question_len,), generator=g).tolist()


def pixels(sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """Random RGB images of the given (height, width) in px through the real image processor:
    ``pixel_values`` [n_patches, 96] and ``image_grid_thw`` [n_images, 3]."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processor = Qwen2VLImageProcessor(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE,
                                      min_pixels=16 * 16, max_pixels=32 * 32)
    return dict(processor(images=images, return_tensors="pt"))


def batch(prompts: list[list[int]], seed: int = 0, images: int = 1, sizes: list[tuple[int, int]] | None = None) -> dict:
    """Left-padded batch: input_ids, attention_mask, mm_token_type_ids [B, S]; pixel_values
    [B * images * 64, 96]; image_grid_thw [B * images, 3] (sample-major, as the processor emits them).
    ``sizes`` gives each image's (height, width) in px (default 32 x 32: 16 visual tokens)."""
    ids, mask = left_pad(prompts)
    out = pixels(sizes or [(32, 32)] * (len(prompts) * images), seed)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_TOKEN).int(), **out}


def sample(inputs: dict, i: int, images: int = 1) -> dict:
    """Sample ``i`` of a batch alone: its row (padding removed) and its images."""
    keep = inputs["attention_mask"][i].bool()
    one = {k: inputs[k][i:i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    one["pixel_values"] = inputs["pixel_values"][i * images * N_PATCHES:(i + 1) * images * N_PATCHES]
    one["image_grid_thw"] = inputs["image_grid_thw"][i * images:(i + 1) * images]
    return one


# ---------------------------------------------------------------- video
FRAMES = 4  # frames per video: 2 temporal patches of TEMPORAL frames
N_VIDEO = FRAMES // TEMPORAL * N_VISUAL  # 32 visual tokens per 32 x 32 px video of FRAMES frames
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # the processors' defaults


def video_pixels(videos: list[np.ndarray], patch: int = PATCH) -> dict:
    """``pixel_values_videos`` [n_patches, 3 * TEMPORAL * patch**2] and ``video_grid_thw`` [n_videos, 3] of uint8
    videos [frames, height, width, 3] (heights and widths multiples of patch * MERGE, frames of TEMPORAL), laid
    out as ``Qwen2VLVideoProcessor`` lays them out (rescale, normalise with the CLIP mean / std, then each
    temporal patch of ``TEMPORAL`` frames cut into patch x patch patches in merge-window order; ``patch``: the
    ViT's patch size in px, default PATCH). The real video
    processor needs torchvision, which the CPU venv lacks (PyPI's torchvision needs a CUDA build of torch);
    ``test_qwen_video.py`` checks this layout against it where torchvision imports."""
    rows, grids = [], []
    for video in videos:
        f, h, w, c = video.shape
        x = (video.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        x = x.transpose(0, 3, 1, 2)  # [F, C, H, W]
        t, gh, gw = f // TEMPORAL, h // patch, w // patch
        x = x.reshape(t, TEMPORAL, c, gh // MERGE, MERGE, patch, gw // MERGE, MERGE, patch)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(torch.from_numpy(np.ascontiguousarray(x.reshape(t * gh * gw, c * TEMPORAL * patch * patch))))
        grids.append((t, gh, gw))
    return {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)}


def random_video(seed: int, frames: int = FRAMES, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random uint8 video [frames, height, width, 3] (synthetic frames: no file, no download)."""
    return np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


def video_tokens(family: str, grid: tuple[int, int, int], g: torch.Generator) -> list[int]:
    """The prompt tokens of one video of ``grid`` (t, h, w) in patches, as the family's processor writes them:
    Qwen2-VL / 2.5-VL ``<vision_start> <video_pad> x N <vision_end>``; Qwen3-VL, per temporal patch, a
    timestamp (2 text tokens here) then ``<vision_start> <video_pad> x (h w / merge**2) <vision_end>``."""
    t, h, w = grid
    per_frame = h * w // MERGE**2
    if family != "qwen3_vl":
        return [VISION_START] + [VIDEO_TOKEN] * (t * per_frame) + [VISION_END]
    out = []
    for _ in range(t):
        out += torch.randint(3, 240, (2,), generator=g).tolist() + [VISION_START] + [VIDEO_TOKEN] * per_frame + [VISION_END]
    return out


def video_batch(family: str, idx: tuple[int, ...], parts: tuple[str, ...] = ("video",), frames: int = FRAMES) -> dict:
    """Left-padded inputs of the standard prompts ``idx`` (``conftest.STANDARD_PROMPTS``), each holding
    ``parts`` in order (``"video"``: a 32 x 32 px video of ``frames`` frames, ``"image"``: a 32 x 32 px image),
    each part followed by 2 text tokens; sample i's videos and images depend only on i (so a sample alone is
    the same sample). ``mm_token_type_ids`` marks image tokens 1 and video tokens 2, as the processor does."""
    prompts, videos, images = [], [], []
    for i in idx:
        prefix, question, seed = conftest.STANDARD_PROMPTS[i]
        g = torch.Generator().manual_seed(seed)
        ids = [1] + torch.randint(3, 240, (prefix,), generator=g).tolist()
        for j, part in enumerate(parts):
            if part == "video":
                videos.append(random_video(100 + 10 * i + j, frames))
                ids += video_tokens(family, (frames // TEMPORAL, 8, 8), g)
            else:
                images.append(100 + 10 * i + j)
                ids += [VISION_START] + [IMAGE_TOKEN] * N_VISUAL + [VISION_END]
            ids += torch.randint(3, 240, (2,), generator=g).tolist()
        prompts.append(ids + torch.randint(3, 240, (question,), generator=g).tolist())
    ids, mask = left_pad(prompts)
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()}
    if videos:
        out.update(video_pixels(videos))
    if images:
        pix = [pixels([(32, 32)], seed=s) for s in images]
        out.update(pixel_values=torch.cat([p["pixel_values"] for p in pix]),
                   image_grid_thw=torch.cat([p["image_grid_thw"] for p in pix]))
    return out


# ---------------------------------------------------------------- the saliency reference
def tower_received_attention(m, pixels: torch.Tensor, grid: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The attention each patch receives in the tower's last full-attention block (its own eager weights, per
    attention segment: an image, or one temporal patch of a video; mean over heads and queries), summed over the
    merger's 2 x 2 groups, back from Qwen2.5-VL's window order: FloatTensor [tokens of all units]."""
    visual = m.model.visual
    full = getattr(visual, "fullatt_block_indexes", None)
    block = len(visual.blocks) - 1 if full is None else max(full)
    modeling = sys.modules[type(visual.blocks[0].attn).__module__]
    eager, weights, current = modeling.eager_attention_forward, {}, {}

    def recording(module, *args, **kwargs):
        out, w = eager(module, *args, **kwargs)
        weights.setdefault(current["block"], []).append(w)
        return out, w

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    handles = [b.register_forward_pre_hook(lambda mod, a, i=i: current.update(block=i)) for i, b in enumerate(visual.blocks)]
    impl = visual.config._attn_implementation
    visual.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid)
    finally:
        visual.config._attn_implementation = impl
        for h in handles:
            h.remove()
    segments = weights[block]
    assert len(segments) == int(grid[:, 0].sum())  # one attention segment per image or temporal patch
    assert all(w.shape[-1] == int(h * w_) for w, (_, h, w_) in zip(segments, grid.repeat_interleave(grid[:, 0], 0).tolist(),
                                                                    strict=True))
    received = torch.cat([w[0].float().mean(0).mean(0) for w in segments])
    tokens = received.view(-1, MERGE**2).sum(-1)
    if full is not None:  # Qwen2.5-VL: back from window order to the visual tokens' order
        window_index, _ = get_vision_window_index(grid, MERGE, visual.window_size, visual.patch_size)
        assert not torch.equal(window_index, torch.arange(len(window_index)))
        tokens = tokens[torch.argsort(window_index)]
    return tokens
