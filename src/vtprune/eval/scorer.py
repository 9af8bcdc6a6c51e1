"""What an eval record stores for an answer: :func:`score`, dispatching on the sample's ``meta["scorer"]``:

* ``"names"``: an open answer that must name the object: its label or a WordNet synonym
  (:func:`vtprune.eval.open_answers.names_object`);
* ``"caption"``: a scene caption scored per field (:func:`vtprune.eval.open_answers.score_caption`);
  correct when every field is;
* none: short answers and yes / no (:func:`vtprune.eval.answers.is_correct`).

Source: reconstructed for this project (the scorers' modules say where each rule comes from).
"""

from __future__ import annotations

from vtprune.eval import open_answers
from vtprune.eval.answers import is_correct
from vtprune.eval.datasets import Sample


def score(prediction: str, sample: Sample) -> tuple[bool, dict[str, bool] | None]:
    """``(correct, fields)`` of ``prediction`` for ``sample`` (see the module docstring); ``fields`` is
    None except for captions.

    Raises:
        TypeError: a non-str prediction. ValueError: an unknown ``meta["scorer"]``.
    """
    scorer = sample.meta.get("scorer")
    if scorer is None:
        return bool(is_correct(prediction, sample)), None
    if scorer == "names":
        return bool(open_answers.names_object(prediction, sample.meta["label"], sample.meta.get("wnid"))), None
    if scorer == "caption":
        fields = open_answers.score_caption(prediction, sample.meta)
        return all(fields.values()), fields
    raise ValueError(f"unknown scorer {scorer!r} in sample {sample.id}; accepted: names, caption")


__all__ = ["score"]
