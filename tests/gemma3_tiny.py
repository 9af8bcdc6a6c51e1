"""A tiny random-weight Gemma 3 (``Gemma3ForConditionalGeneration``) from the real config classes, and its
inputs from the real ``Gemma3Processor`` (its PIL image processor and a word-level tokenizer built offline
carrying Gemma's image tokens), so the prompt layout (``<start_of_image>``, the image tokens,
``<end_of_image>``) and ``token_type_ids`` are the processor's.

Images: 32 x 32 px, 4 px SigLIP patches (8 x 8 = 64 per image) average-pooled 2 x 2 into N = 16 image
tokens (4 x 4; the real model: 64 x 64 patches pooled 4 x 4 into 256). Language model: 6 layers typed
sliding, sliding, full, sliding, sliding, full (the real pattern is 5 : 1) with a window of WINDOW tokens,
``query_pre_attn_scalar`` 24 for a 16-wide head (scale 24 ** -0.5, not 16 ** -0.5), the two rotary bases
of the real model.
"""

from __future__ import annotations

import numpy as np
import torch
from conftest import STANDARD_PROMPTS, ready, word_tokenizer
from PIL import Image
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

IMAGE_TOKEN, BOI, EOI = 250, 251, 252
N = 16  # image tokens per image
SIDE = 32  # px
PATCH = 4
WINDOW = 64  # sliding window (tokens)
LAYERS = 6
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
SCALAR = 24  # query_pre_attn_scalar
SPECIAL = {"<image_soft_token>": IMAGE_TOKEN, "<start_of_image>": BOI, "<end_of_image>": EOI}


def tiny_gemma3(attn: str = "sdpa", seed: int = 0, window: int = WINDOW) -> Gemma3ForConditionalGeneration:
    """The tiny Gemma 3 in eval mode (:func:`conftest.ready`: no EOS, LM head scaled). Untied embeddings, so
    that scaling the LM head leaves the input embeddings alone; the projector's ``mm_input_projection_weight``,
    zero-initialised by the model (the image would be ignored), is re-drawn."""
    torch.manual_seed(seed)
    text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=256, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                num_hidden_layers=LAYERS, layer_types=LAYER_TYPES, sliding_window=window, query_pre_attn_scalar=SCALAR)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=SIDE, patch_size=PATCH)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=N, image_token_index=IMAGE_TOKEN,
                       boi_token_index=BOI, eoi_token_index=EOI, tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return ready(model, attn)


def tiny_processor() -> Gemma3Processor:
    tokenizer = word_tokenizer(SPECIAL, extra_special_tokens={
        "image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    images = Gemma3ImageProcessorPil(size={"height": SIDE, "width": SIDE})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=N)


PROCESSOR = tiny_processor()


def image(seed: int, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


def prompt(prefix: int, question: int, seed: int, images: int = 1) -> str:
    """``<s>``, ``prefix`` words, one ``<start_of_image>`` per image (the processor expands each), then
    ``question`` words."""
    words = [f"w{w}" for w in np.random.RandomState(100 + seed).randint(4, 240, prefix + question)]
    return " ".join(["<s>"] + words[:prefix] + ["<start_of_image>"] * images + words[prefix:])


PROMPTS = [prompt(*p) for p in STANDARD_PROMPTS]


def inputs(prompts: list[str], images: list[list[Image.Image]], **kwargs) -> dict:
    """The processor's left-padded batch: input_ids, attention_mask, token_type_ids [B, S]; pixel_values
    [n_images, 3, 32, 32] (sample-major)."""
    return dict(PROCESSOR(images=images, text=prompts, return_tensors="pt", padding=True, **kwargs))


def batch(idx: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Samples ``idx`` of PROMPTS, each with its own image (same content whatever the batch)."""
    return inputs([PROMPTS[i] for i in idx], [[image(i)] for i in idx])
