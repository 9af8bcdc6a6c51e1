"""Prompts and images through a family's real processor, for the tiny models that come with one
(``next_tiny``, ``internvl_tiny``, ``onevision_tiny``): word prompts with the family's image placeholder,
random RGB images whose content depends only on their seed (so a sample alone is the same sample as in a
batch), and the processor's left-padded output."""

from __future__ import annotations

import numpy as np
from PIL import Image


def image(size, seed) -> Image.Image:
    """A random RGB image of ``size`` (height, width) in px, the same for the same seed."""
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


class ProcessorInputs:
    """Inputs of one family: ``processor`` (a real multimodal processor), its image ``placeholder`` in the
    text, the default image ``size``, and whether the processor takes each sample's images as a list of
    their own (``nested``: LLaVA-OneVision counts images per sample from it)."""

    def __init__(self, processor, placeholder: str, size: tuple[int, int], nested: bool = False):
        self.processor, self.placeholder, self.size, self.nested = processor, placeholder, size, nested
        self.prompts = [self.prompt(2, 4, 1), self.prompt(5, 9, 2), self.prompt(3, 2, 3)]

    def prompt(self, prefix: int, question: int, seed: int, images: int = 1) -> str:
        """``prefix`` random words, ``images`` placeholders, then ``question`` words."""
        words = np.random.RandomState(100 + seed).randint(4, 240, prefix + question)
        text = [f"w{w}" for w in words]
        return " ".join(text[:prefix] + [self.placeholder] * images + text[prefix:])

    def _process(self, prompts: list[str], images: list[list[Image.Image]]) -> dict:
        flat = images if self.nested else [im for row in images for im in row]
        return dict(self.processor(images=flat, text=prompts, return_tensors="pt", padding=True))

    def inputs(self, prompts: list[str], sizes: list[list[tuple[int, int]]], seed: int = 0) -> dict:
        """Processor output for prompts (left-padded) with images ``sizes[b]`` in sample b (image i of
        sample b drawn with seed ``seed + 10 * b + i``)."""
        return self._process(prompts, [[image(s, seed + 10 * b + i) for i, s in enumerate(row)]
                                       for b, row in enumerate(sizes)])

    def batch(self, idx=(0, 1, 2), size=None) -> dict:
        """Samples ``idx`` of :attr:`prompts`, each with its own image (same content whatever the batch)."""
        return self._process([self.prompts[i] for i in idx], [[image(size or self.size, i)] for i in idx])
