"""``Run.kept_visual`` and ``vtprune show`` (the kept tokens drawn over the image)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import N_VISUAL, batch, make_prompt

import vtprune
from vtprune import cli
from vtprune.eval import show
from vtprune.eval.runner import conditions

PHOTO = "../shared/data/photos/COCO_val2017_000000039769_two_cats.jpg"


def test_kept_visual_per_layer(model):
    inputs = batch([make_prompt(2, 4, 1), make_prompt(3, 3, 2)])
    with vtprune.apply(model, "fastv", budget=5, layer=3) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kept = run.kept_visual(sample=1)
    assert [len(k) for k in kept] == [N_VISUAL] * 3 + [5] * 3
    assert kept[3] == sorted(kept[3]) and set(kept[3]) <= set(range(N_VISUAL))
    with vtprune.apply(model, "parvts", budget=4) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kept = run.kept_visual()
    assert all(k == kept[0] for k in kept) and len(kept[0]) == 4  # path A (subjects) in every layer
    subjects = torch.topk(run.gen.saliency[0, 0], 4).indices.sort().values.tolist()
    assert kept[0] == subjects
    with pytest.raises(IndexError, match="out of range"):
        run.kept_visual(sample=2)


def test_panels_follow_changes_of_the_kept_set():
    kept = [[0, 1, 2, 3]] * 2 + [[0, 1, 2]] * 2 + [[1]] * 2
    assert show.panels(kept, 4) == [("from layer 0: 4/4 tokens", [0, 1, 2, 3]),
                                    ("from layer 2: 3/4 tokens", [0, 1, 2]), ("from layer 4: 1/4 tokens", [1])]
    many = [list(range(20 - i)) for i in range(20)]
    titles = [t for t, _ in show.panels(many, 20)]
    assert len(titles) == show.MAX_PANELS and titles[0].startswith("from layer 0") and "layer 19" in titles[-1]


def test_method_labels_may_carry_fixed_options():
    conds = conditions(["visionzip:contextual=0", "parvts:fusion=fixed:alpha=0.7"], ["25%"])
    assert conds[1].method == "visionzip:contextual=0"
    assert dict(conds[1].options) == {"contextual": 0, "keep_ratio": 0.25}
    assert dict(conds[2].options) == {"fusion": "fixed", "alpha": 0.7, "keep_ratio": 0.25}


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed (eval extra)")
@pytest.mark.parametrize("method", ["parvts", "st3"])
def test_cli_show_writes_a_png(method, tmp_path, capsys):
    pytest.importorskip("vtprune.models.default", reason="bundled model packages not installed")
    out = tmp_path / f"{method}.png"
    code = cli.main(["show", "--image", PHOTO, "--prompt", "Is there a cat in the image?", "--method", method,
                     "--keep-ratio", "0.25", "--out", str(out), "--max-new-tokens", "2"])
    assert code == 0 and out.stat().st_size > 10_000
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_show_bad_method_is_a_one_line_error(capsys):
    assert cli.main(["show", "--image", PHOTO, "--prompt", "q", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
