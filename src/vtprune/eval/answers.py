"""Turn a model's free-text answers into correctness, and yes/no predictions into POPE's metrics.

* :func:`normalize_answer`: first non-empty line, lower case, number words -> digits, punctuation ->
  spaces, articles (a / an / the) dropped, whitespace collapsed, "grey" -> "gray"; an answer that starts
  with yes / no becomes just that word ("Yes, there is a dog." -> "yes"). The rules follow the VQAv2
  evaluation's answer normalisation (Antol et al., ICCV 2015; punctuation, articles, number words),
  reduced to what short answers of these sets need.
* :func:`parse_yes_no`: the first word that is "yes" or "no" (POPE's evaluation reads yes / no from the
  answer text the same way; anything else is unparsed).
* :func:`is_correct`: yes/no references compare the parsed yes/no; others compare normalised strings
  (exactly, or with ``relaxed=True`` the reference as a whole-word phrase inside the prediction).
* what a record stores, dispatching on the sample's scorer, is :func:`vtprune.eval.scorer.score`.
* :func:`pope_metrics`: accuracy, precision, recall, F1 and yes-ratio over (prediction, label) pairs,
  "yes" the positive class (POPE, Li et al., EMNLP 2023, Sec. 3).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vtprune.eval.datasets import Sample

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}
SYNONYMS = {"grey": "gray", "colour": "color"}
_WORD = re.compile(r"[a-z0-9]+")


def _first_line(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}")
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer (see the module docstring); "" for an empty answer.

    Examples: ``"Yes."`` -> ``"yes"``; ``"Two"`` -> ``"2"``; ``"A great white shark."`` ->
    ``"great white shark"``; ``"Grey"`` -> ``"gray"``; ``"Shih-Tzu"`` -> ``"shih tzu"``.

    Raises:
        TypeError: ``text`` is not a str.
    """
    words = [SYNONYMS.get(w, NUMBER_WORDS.get(w, w)) for w in _WORD.findall(_first_line(text).lower())]
    if words and words[0] in ("yes", "no"):
        return words[0]
    return " ".join(w for w in words if w not in ARTICLES)


def parse_yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"``: the first of these words in the answer's first line; None if neither occurs.

    Raises:
        TypeError: ``text`` is not a str.
    """
    for w in _WORD.findall(_first_line(text).lower()):
        if w in ("yes", "no"):
            return w
    return None


def is_correct(prediction: str, sample: Sample | str, relaxed: bool = False) -> bool:
    """Whether ``prediction`` answers ``sample`` (a :class:`Sample` or its reference answer string).

    Yes/no references: :func:`parse_yes_no` of the prediction equals the reference. Others:
    normalised strings equal, or with ``relaxed`` the normalised reference occurs in the normalised
    prediction as whole words ("it is a tench" matches "tench").

    Raises:
        TypeError: a non-str prediction or reference.
    """
    ref = sample.answer if isinstance(sample, Sample) else sample
    gold = normalize_answer(ref)
    if gold in ("yes", "no"):
        return parse_yes_no(prediction) == gold
    pred = normalize_answer(prediction)
    if pred == gold:
        return True
    return relaxed and bool(gold) and f" {gold} " in f" {pred} "


def pope_metrics(pairs: Iterable[tuple[str | None, str]]) -> dict[str, float | int]:
    """POPE's metrics over ``(prediction, label)`` pairs, "yes" the positive class.

    ``prediction`` is the model's text (parsed with :func:`parse_yes_no`) or None; ``label`` is "yes" /
    "no". An unparsed prediction counts as wrong and as not-yes (a false negative for a yes label).

    Returns:
        ``{"n", "accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed", "tp", "fp", "tn", "fn"}``;
        ratios in [0, 1] (precision / F1 are 0.0 when nothing was predicted yes).

    Raises:
        ValueError: no pairs, or a label other than "yes" / "no".
    """
    tp = fp = tn = fn = unparsed = n = 0
    for pred, label in pairs:
        if label not in ("yes", "no"):
            raise ValueError(f"POPE labels must be 'yes' or 'no', got {label!r}")
        p = None if pred is None else parse_yes_no(pred)
        n += 1
        unparsed += p is None
        if label == "yes":
            tp += p == "yes"
            fn += p != "yes"
        else:
            fp += p == "yes"
            tn += p == "no"
    if n == 0:
        raise ValueError("pope_metrics needs at least one (prediction, label) pair")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "unparsed": unparsed, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
