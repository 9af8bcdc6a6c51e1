"""Every supported model family as a tiny random-weight model of its real class plus its inputs: what the
conformance matrix (``test_conformance.py``) runs each registered method on. A ``*_video`` entry is a family
whose prompts hold a video instead of an image (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision; Qwen2-VL shares
Qwen2.5-VL's code path and is covered in ``test_qwen_video.py``).

A :class:`Family` builds the model for an attention implementation and a batch of the three standard
prompts, each sample with its own image (or video) whose content does not depend on the batch it is in (so a
sample alone is the same sample). Adding a family: its builders (a ``*_tiny.py`` module like ``qwen_tiny.py``)
and one entry in :data:`FAMILIES`.

:data:`METHODS` and :func:`method_options` are the other axis of the matrix: every registered method and its
conformance options (``test_conformance.py`` on CPU, ``test_cuda.py`` on a CUDA device).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import conftest
import gemma3_tiny
import internvl_tiny
import next_tiny
import onevision_tiny
import qwen_tiny
import torch

import vtprune


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family. ``build(attn)`` returns a tiny model in eval mode with attention ``attn`` (no EOS:
    every generation runs its full length); ``batch(indices)`` the left-padded inputs of those prompts;
    ``one(indices, i)`` sample ``i`` of that batch alone (as a batch of one); ``n_visual`` the visual
    tokens of each image; ``layers`` the decoder layers."""

    name: str
    build: Callable[[str], torch.nn.Module]
    batch: Callable[[tuple[int, ...]], dict]
    n_visual: int
    layers: int = 6

    def one(self, i: int) -> dict:
        return self.batch((i,))


def _attn(model, attn: str):
    model.config.text_config._attn_implementation = attn
    return model


def _llava_batch(idx: tuple[int, ...]) -> dict:
    prompts = [conftest.make_prompt(*conftest.STANDARD_PROMPTS[i]) for i in idx]
    ids, mask = conftest.left_pad(prompts)
    pixels = torch.cat([torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(100 + i)) for i in idx])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _qwen_batch(idx: tuple[int, ...]) -> dict:
    prompts = [qwen_tiny.make_prompt(*conftest.STANDARD_PROMPTS[i]) for i in idx]
    ids, mask = conftest.left_pad(prompts)
    images = [qwen_tiny.pixels([(32, 32)], seed=100 + i) for i in idx]
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == qwen_tiny.IMAGE_TOKEN).int(),
            "pixel_values": torch.cat([im["pixel_values"] for im in images]),
            "image_grid_thw": torch.cat([im["image_grid_thw"] for im in images])}


FAMILIES: dict[str, Family] = {
    "llava": Family("llava", lambda attn: conftest.tiny_llava(attn=attn), _llava_batch, conftest.N_VISUAL),
    "llava_next": Family("llava_next", lambda attn: _attn(next_tiny.tiny_llava_next(), attn), next_tiny.batch,
                         next_tiny.N),
    "qwen2_vl": Family("qwen2_vl", lambda attn: _attn(qwen_tiny.tiny_qwen("qwen2_vl"), attn), _qwen_batch,
                       qwen_tiny.N_VISUAL),
    "qwen2_5_vl": Family("qwen2_5_vl", lambda attn: _attn(qwen_tiny.tiny_qwen("qwen2_5_vl"), attn), _qwen_batch,
                         qwen_tiny.N_VISUAL),
    "qwen3_vl": Family("qwen3_vl", lambda attn: _attn(qwen_tiny.tiny_qwen("qwen3_vl"), attn), _qwen_batch,
                       qwen_tiny.N_VISUAL),
    "qwen2_5_vl_video": Family("qwen2_5_vl_video", lambda attn: _attn(qwen_tiny.tiny_qwen("qwen2_5_vl"), attn),
                               functools.partial(qwen_tiny.video_batch, "qwen2_5_vl"), qwen_tiny.N_VIDEO),
    "qwen3_vl_video": Family("qwen3_vl_video", lambda attn: _attn(qwen_tiny.tiny_qwen("qwen3_vl"), attn),
                             functools.partial(qwen_tiny.video_batch, "qwen3_vl"), qwen_tiny.N_VIDEO),
    "gemma3": Family("gemma3", gemma3_tiny.tiny_gemma3, gemma3_tiny.batch, gemma3_tiny.N),
    "internvl": Family("internvl", lambda attn: internvl_tiny.tiny_internvl(attn), internvl_tiny.batch, internvl_tiny.N),
    "llava_onevision": Family("llava_onevision", lambda attn: onevision_tiny.tiny_onevision(attn), onevision_tiny.batch,
                              onevision_tiny.N),
    # one 4-frame video per prompt (a video is one visual unit: its frames' pooled patches and the newline)
    "llava_onevision_video": Family("llava_onevision_video", lambda attn: onevision_tiny.tiny_onevision(attn),
                                    lambda idx: onevision_tiny.video_batch(idx), onevision_tiny.VIDEO_N),
}


METHODS: list[str] = sorted(vtprune.METHODS)
"""Every registered method (the registry feeds the matrix: a new method is covered without editing a list)."""


def method_options(method: str, kind: str) -> dict:
    """The method's conformance options (``examples[kind]``: ``"prune"`` options that prune a tiny model, or
    ``"keep_all"`` options that keep every visual token)."""
    return dict(vtprune.METHODS[method].examples[kind])
