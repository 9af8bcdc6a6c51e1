"""Tiny random-weight LLaVA-NeXT models (any-resolution tiles) and their inputs, from the real
``LlavaNextProcessor`` (its PIL image processor and a word-level tokenizer built offline), so the number
of image tokens per image is the processor's. Tiles are 32 px with 8 px patches (16 patches per tile); the
grid pinpoints are (32, 64), (64, 32), (64, 64). Token counts per image size, derived by hand (base tile 16
+ rows x (cols + 1) of the unpadded grid):

    (20, 40): 1x2 tiles, 4x8 patches, nothing unpadded            -> 16 + 4 * 9 = 52
    (16, 64): 1x2 tiles, 4x8 patches, rows 1-2 kept (wider image) -> 16 + 2 * 9 = 34
    (64, 48): 2x2 tiles, 8x8 patches, cols 1-6 kept (taller)      -> 16 + 8 * 7 = 72
    (64, 64): 2x2 tiles, 8x8 patches                              -> 16 + 8 * 9 = 88
"""

from __future__ import annotations

import torch
from conftest import IMAGE_TOKEN, ready, tiny_clip_config, tiny_llama_config, word_tokenizer
from processor_inputs import ProcessorInputs
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

PINPOINTS = [[32, 64], [64, 32], [64, 64]]
SIZE = (20, 40)  # the image size of most tests
N = 52  # its visual tokens
COUNTS = {(20, 40): 52, (16, 64): 34, (64, 48): 72, (64, 64): 88}
NEW = 10
LAYERS = 6


def tiny_llava_next(attn: str = "sdpa") -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=tiny_clip_config(), text_config=tiny_llama_config(LAYERS),
                          image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    return ready(LlavaNextForConditionalGeneration(cfg), attn)


def tiny_processor() -> LlavaNextProcessor:
    tokenizer = word_tokenizer()
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


PROCESSOR = tiny_processor()
_INPUTS = ProcessorInputs(PROCESSOR, "<image>", SIZE)
prompt, inputs, batch, PROMPTS = _INPUTS.prompt, _INPUTS.inputs, _INPUTS.batch, _INPUTS.prompts


MIXED = [[SIZE], [(16, 64)], [SIZE], [(64, 48)]]  # 52, 34, 52, 72 visual tokens
