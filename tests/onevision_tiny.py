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
"""

from __future__ import annotations

import torch
from conftest import IMAGE_TOKEN, processor_without_video, ready, tiny_qwen2_config, word_tokenizer
from processor_inputs import ProcessorInputs
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

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


def tiny_onevision(attn: str = "sdpa", layers: int = LAYERS, seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
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
