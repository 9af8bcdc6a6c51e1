"""Tiny random-weight InternVL models (``InternVLForConditionalGeneration``: InternViT with q / k norms +
pixel shuffle + Qwen2 LM) and their inputs, from the real ``InternVLProcessor`` (the PIL
``GotOcr2ImageProcessorPil`` that crops images into tiles, and a word-level tokenizer with InternVL's
``<img>`` / ``</img>`` / ``<IMG_CONTEXT>`` tokens, built offline), so the number of image tokens per image
is the processor's.

Tiles are 32 px with 4 px patches: 8 x 8 patches + [CLS] in the tower, shuffled 2 x 2 into P = 16 tokens
(a 4 x 4 grid) per tile; at most 4 tiles per image plus the thumbnail. Tiles and tokens per image size,
derived by hand (``get_optimal_tiled_canvas``: the closest aspect among the grids of 1 to 4 tiles; a tie
goes to more tiles while the image covers more than half of them; a thumbnail when more than one tile):

    (32, 32): 1 x 1 grid, no thumbnail          -> 1 tile  -> 16 tokens
    (32, 64): 1 row x 2 cols + thumbnail        -> 3 tiles -> 48
    (64, 32): 2 rows x 1 col + thumbnail        -> 3 tiles -> 48
    (32, 96): 1 row x 3 cols + thumbnail        -> 4 tiles -> 64
    (64, 64): 2 x 2 (ties 1 x 1, image > half) + thumbnail -> 5 tiles -> 80
"""

from __future__ import annotations

import torch
from conftest import IMAGE_TOKEN, processor_without_video, ready, tiny_qwen2_config, word_tokenizer
from processor_inputs import ProcessorInputs
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

START, END, VIDEO = 251, 252, 253  # <img>, </img>, <video>; <IMG_CONTEXT> is IMAGE_TOKEN (250)
P = 16  # tokens per tile
SIZE = (32, 64)  # the image size of most tests
N = 48  # its visual tokens (3 tiles)
TILES = {(32, 32): 1, (32, 64): 3, (64, 32): 3, (32, 96): 4, (64, 64): 5}
COUNTS = {size: P * tiles for size, tiles in TILES.items()}
MIXED = [[SIZE], [(32, 32)], [SIZE], [(64, 64)]]  # 48, 16, 48, 80 visual tokens
NEW = 10
LAYERS = 6


def tiny_internvl(attn: str = "sdpa", layers: int = LAYERS, seed: int = 0) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4, use_qk_norm=True)
    cfg = InternVLConfig(vision_config=vision, text_config=tiny_qwen2_config(layers), image_token_id=IMAGE_TOKEN,
                         image_seq_length=P, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=False)
    return ready(InternVLForConditionalGeneration(cfg), attn)


SPECIAL = {"<IMG_CONTEXT>": IMAGE_TOKEN, "<img>": START, "</img>": END, "<video>": VIDEO}
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"}


def tiny_processor(chat_template: str | None = None) -> InternVLProcessor:
    """The real ``InternVLProcessor`` (no video processor: :func:`conftest.processor_without_video`)."""
    tokenizer = word_tokenizer(SPECIAL, chat_template=chat_template, extra_special_tokens=NAMED)
    images = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    return processor_without_video(InternVLProcessor, image_processor=images, tokenizer=tokenizer, image_seq_length=P,
                                   chat_template=chat_template)


PROCESSOR = tiny_processor()
_INPUTS = ProcessorInputs(PROCESSOR, "<IMG_CONTEXT>", SIZE)
prompt, inputs, batch, PROMPTS = _INPUTS.prompt, _INPUTS.inputs, _INPUTS.batch, _INPUTS.prompts
