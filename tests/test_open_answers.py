"""The open-answer scorers: naming an object (label or WordNet synonym) and the scene caption's fields."""

from __future__ import annotations

import pytest

from vtprune.eval.datasets.scene_captions import caption_for
from vtprune.eval.open_answers import names_object, object_names, score_caption

META = {
    "subject": {"label": "tabby", "wnid": "n02123045", "bbox": [100, 100, 300, 300]},
    "background": {"kind": "stripes", "color": "blue"},
    "shapes": [{"shape": "square", "color": "green", "bbox": [380, 380, 420, 420]},
               {"shape": "circle", "color": "red", "bbox": [10, 10, 50, 50]}],
}


def test_caption_names_subject_background_and_shapes_in_reading_order():
    assert caption_for(META) == ("A tabby on a blue striped background, with a small red circle and a small green "
                                 "square at the edges.")
    one = dict(META, shapes=META["shapes"][:1], background={"kind": "flat", "color": "orange"})
    assert caption_for(one) == "A tabby on an orange background, with a small green square at the edge."
    none = dict(META, shapes=[], background={"kind": "photo", "color": None, "label": "cab"})
    assert caption_for(none) == "A tabby in front of a photo, with no shapes at the edges."


@pytest.mark.parametrize("meta", [META, dict(META, shapes=[]), dict(META, background={"kind": "photo", "color": None})])
def test_the_taught_caption_scores_every_field_right(meta):
    assert score_caption(caption_for(meta), meta) == {"subject": True, "background": True, "shapes": True}


def test_caption_fields_scored_one_by_one():
    assert score_caption("A tabby cat on a red background, with a small red circle and a small green square at "
                         "the edges.", META) == {"subject": True, "background": False, "shapes": True}
    assert score_caption("A dog on a blue background, with a small red circle at the edge.", META) == {
        "subject": False, "background": True, "shapes": False}
    # no shapes must be said, not only left out
    assert not score_caption("A tabby on a blue background.", dict(META, shapes=[]))["shapes"]
    assert score_caption("A tabby on a blue background, with no shapes at the edges.", dict(META, shapes=[]))["shapes"]
    with pytest.raises(TypeError):
        score_caption(None, META)


def test_names_object_accepts_the_label_or_a_wordnet_synonym():
    pytest.importorskip("vtprune.eval.wordnet")
    try:
        names = object_names("n02123045", "tabby")
    except FileNotFoundError:
        pytest.skip("WordNet 3.0 not installed")
    assert names[0] == "tabby" and "tabby cat" in names
    assert names_object("A tabby cat.", "tabby", "n02123045")
    assert names_object("tabby", "tabby", None)
    assert not names_object("a cat", "tabby", "n02123045")
    assert not names_object("tabbyish", "tabby", None)
