"""Tiny random-weight LLaVA-OneVision models (``LlavaOnevisionForConditionalGeneration``: SigLIP tower +
Qwen2 LM) and their inputs, from the real ``LlavaOnevisionProcessor`` (its PIL image processor and a
word-level tokenizer, built offline), so the number of image tokens per image is the processor's.

Tiles are 32 px with 8 px patches (P = 16 patches per tile, no [CLS]); the grid pinpoints are (32, 64),
(64, 32), (64, 64); ``vision_aspect_ratio="anyres_max_2"``, so an unpadded grid of more than 2 tiles'
worth of patches (32) is downsampled: ``ratio = sqrt(h * w / 32)``, and above 1.1 the h x w grid becomes
``floor(h / ratio) x floor(w / ratio)``. Token counts per image size, derived by hand (base tile 16 +
rows x (cols + 1)):

    (20, 40): 1x2 tiles, 4x8 patches, nothing unpadded, ratio 1       -> 16 + 4 * 9 = 52
    (16, 64): 1x2 tiles, 4x8 patches, rows 1-2 kept, ratio 0.71       -> 16 + 2 * 9 = 34
    (32, 32): 1x2 tiles, 4x8 patches, cols 2-5 kept, ratio 0.71       -> 16 + 4 * 5 = 36
    (64, 48): 2x2 tiles, 8x8 patches, cols 1-6 kept (8x6), ratio 1.22 -> 6x4: 16 + 6 * 5 = 46
    (64, 64): 2x2 tiles, 8x8 patches, ratio 1.41                      -> 5x5: 16 + 5 * 6 = 46

In a sample of several images (the processor's ``batch_num_images`` > 1) every image is one tile and one
newline: 17 tokens, whatever its size.

Videos (:func:`video_batch`): random uint8 frames of 32 x 32 px through the real processor, whose
``LlavaOnevisionVideoProcessor`` is replaced by :class:`FrameProcessor` (the real one needs torchvision); each
frame's 4 x 4 patches are pooled to 2 x 2, so a video of 4 frames gives 4 * 4 + 1 = 17 tokens (the newline
last), as many as an image of a multi-image sample.
"""

from __future__ import annotations

import os

import conftest
import numpy as np
import torch
from conftest import IMAGE_TOKEN, processor_without_video, ready, tiny_qwen2_config, word_tokenizer
from processor_inputs import ProcessorInputs, image
from transformers import (
    BatchFeature,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)
from transformers.image_transforms import normalize, rescale, resize
from transformers.image_utils import ChannelDimension
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor
from transformers.video_utils import make_batched_videos

VIDEO_TOKEN = 251
PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ASPECT = "anyres_max_2"
P = 16
SIZE = (64, 64)  # the image size of most tests: its grid is downsampled
N = 46  # its visual tokens
COUNTS = {(20, 40): 52, (16, 64): 34, (32, 32): 36, (64, 48): 46, (64, 64): 46}
GRIDS = {(20, 40): (4, 8), (16, 64): (2, 8), (32, 32): (4, 4), (64, 48): (6, 4), (64, 64): (5, 5)}  # high-res grid
DOWNSAMPLED = {(64, 48), (64, 64)}
MULTI = P + 1  # tokens of each image in a multi-image sample
MIXED = [[SIZE], [(16, 64)], [SIZE], [(20, 40)]]  # 46, 34, 46, 52 visual tokens
NEW = 10
LAYERS = 6


def tiny_onevision(attn: str = "sdpa", layers: int = LAYERS, seed: int = 0,
                   image_size: int = 32) -> LlavaOnevisionForConditionalGeneration:
    """The tiny model; ``image_size`` (px, 8 px patches) is its tile's size (32: the 4 x 4 patches of this module)."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size, patch_size=8)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=tiny_qwen2_config(layers), image_token_id=IMAGE_TOKEN,
                               video_token_id=VIDEO_TOKEN, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=ASPECT,
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    return ready(LlavaOnevisionForConditionalGeneration(cfg), attn)


def tiny_processor(chat_template: str | None = None) -> LlavaOnevisionProcessor:
    """The real ``LlavaOnevisionProcessor`` (no video processor: :func:`conftest.processor_without_video`)."""
    tokenizer = word_tokenizer({"<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN}, chat_template=chat_template,
                               extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    return processor_without_video(LlavaOnevisionProcessor, image_processor=images, tokenizer=tokenizer,
                                   num_image_tokens=P, vision_feature_select_strategy="full",
                                   vision_aspect_ratio=ASPECT, chat_template=chat_template)


PROCESSOR = tiny_processor()
_INPUTS = ProcessorInputs(PROCESSOR, "<image>", SIZE, nested=True)
prompt, inputs, batch, PROMPTS = _INPUTS.prompt, _INPUTS.inputs, _INPUTS.batch, _INPUTS.prompts


# ---------------------------------------------------------------- video
FRAMES = 4  # frames per video
POOLED = 2  # a frame's 4 x 4 patches pooled to 2 x 2 (ceil(4 / 2))
VIDEO_N = FRAMES * POOLED**2 + 1  # 17: the frames' pooled patches, then one newline


class FrameProcessor:
    """What ``LlavaOnevisionVideoProcessor`` does to a batch of videos, without torchvision (which the real one
    needs and this CPU venv lacks: PyPI's torchvision wheels are CUDA builds): every frame resized to the
    processor's ``size`` (bicubic, skipped when the frame has that size already, as in all the tests here),
    rescaled by its ``rescale_factor`` and normalised with its mean / std (OpenAI CLIP's), channels first.
    The settings are read off a real ``LlavaOnevisionVideoProcessor`` (``size`` 32 x 32 px, the tiny tower's);
    ``test_onevision_video.py`` compares the result with the real processor where torchvision imports.

    Called as the processor calls its video processor: ``(videos, return_tensors=..., **ignored)`` with a list
    of uint8 videos [frames, height, width, 3]; returns ``pixel_values_videos`` [n_videos, frames, 3, 32, 32]
    (a list of [frames, 3, 32, 32] without ``return_tensors``). A video file's path raises ValueError: the real
    one would decode the file with torchcodec, which this venv lacks too (an ImportError there)."""

    def __init__(self):
        self.real = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        real, last = self.real, ChannelDimension.LAST
        size = (real.size.height, real.size.width)
        out = []
        for video in make_batched_videos(videos):
            if isinstance(video, str | os.PathLike):
                raise ValueError(f"FrameProcessor takes frames, not a video file: {video}")
            frames = []
            for frame in np.asarray(video):
                if frame.shape[:2] != size:
                    frame = resize(frame, size, resample=real.resample, input_data_format=last)
                x = rescale(frame, real.rescale_factor, input_data_format=last)
                frames.append(normalize(x, real.image_mean, real.image_std, data_format=ChannelDimension.FIRST,
                                        input_data_format=last))
            out.append(torch.from_numpy(np.stack(frames)))
        return BatchFeature({"pixel_values_videos": out}, tensor_type=return_tensors)


def video_processor() -> LlavaOnevisionProcessor:
    """:func:`tiny_processor` with :class:`FrameProcessor` as its video processor: the real processor expands
    each ``<video>`` into its tokens (``replace_video_token``: frames x 2 x 2 + 1)."""
    processor = tiny_processor()
    processor.video_processor = FrameProcessor()
    return processor


VIDEO_PROCESSOR = video_processor()


def random_video(seed: int, frames: int = FRAMES, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """A random uint8 video [frames, height, width, 3] (synthetic frames: no file, no download)."""
    return np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


def video_batch(idx: tuple[int, ...] = (0, 1, 2), parts: tuple[str, ...] | list[tuple[str, ...]] = ("video",),
                frames: int = FRAMES, size: tuple[int, int] = SIZE) -> dict:
    """The processor's left-padded output for the standard prompts ``idx`` (``conftest.STANDARD_PROMPTS``: prefix
    words, the parts, question words), each holding ``parts`` in order (one tuple for every sample, or a list
    of one per sample): ``"video"`` a random video of ``frames`` frames, ``"image"`` a random image of ``size``
    (tiled when alone in its sample, as the processor decides); part j of sample i is drawn with seed
    ``100 + 10 * i + j`` whatever the batch, so a sample alone is the same sample."""
    per_sample = parts if isinstance(parts, list) else [parts] * len(idx)
    texts, videos, images = [], [], []
    for i, mine in zip(idx, per_sample, strict=True):
        prefix, question, seed = conftest.STANDARD_PROMPTS[i]
        words = [f"w{w}" for w in np.random.RandomState(100 + seed).randint(4, 240, prefix + question)]
        texts.append(" ".join(words[:prefix] + [f"<{p}>" for p in mine] + words[prefix:]))
        videos += [random_video(100 + 10 * i + j, frames) for j, p in enumerate(mine) if p == "video"]
        images.append([image(size, 100 + 10 * i + j) for j, p in enumerate(mine) if p == "image"])
    given = {"videos": videos} if videos else {}
    if any(images):
        given["images"] = images
    return dict(VIDEO_PROCESSOR(text=texts, return_tensors="pt", padding=True, **given))
