"""Scorers for open answers: naming the object of a photo, and the one-sentence caption of a scene.

* :func:`names_object`: whether an answer to "What is in the image?" names an ImageNet class: its label
  or one of its WordNet 3.0 lemmas (synonyms, e.g. "tabby cat" for "tabby") occurs in the normalised
  answer as whole words (:func:`vtprune.eval.answers.normalize_answer`).
* :func:`caption_for` (defined with the data set, :mod:`vtprune.eval.datasets.scene_captions`): the caption the
  bundled model is taught for "Describe the image." on a scene, from the scene's ``meta``: "A tabby on a blue
  striped background, with a small red circle and a small green square at the edges."
* :func:`score_caption`: a caption's three fields against the scene's ``meta`` (the generator's truth):
  ``subject`` (the subject's label or a synonym is named), ``background`` (the colour of a coloured
  background, parsed from "on a(n) {colour} [striped|checkered|speckled] background"; for a photo
  background the word "photo"), ``shapes`` (the set of "small {colour} {shape}" phrases equals the set of
  shapes drawn; "no shapes" when there are none).

Source: reconstructed for this project (a template and its scorer, not a published metric).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vtprune.eval.answers import normalize_answer

CAPTION_FIELDS = ("subject", "background", "shapes")
_BACKGROUND = re.compile(r"\bon an? ([a-z]+)(?: striped| checkered| speckled)? background\b")
_SHAPE = re.compile(r"\bsmall ([a-z]+) (circle|square|triangle)s?\b")


def object_names(wnid: str | None, label: str) -> list[str]:
    """The accepted names of a class: its label, then its WordNet 3.0 lemmas when ``wnid`` is given and
    WordNet is installed (:func:`vtprune.eval.wordnet.load_hierarchy`), normalised, without repeats."""
    names = [label]
    if wnid:
        try:
            from vtprune.eval.wordnet import load_hierarchy

            names += list(load_hierarchy().lemmas(wnid))
        except (FileNotFoundError, KeyError, ValueError):
            pass
    out = []
    for n in names:
        n = normalize_answer(n)
        if n and n not in out:
            out.append(n)
    return out


def names_object(prediction: str, label: str, wnid: str | None = None, names: Iterable[str] | None = None) -> bool:
    """Whether ``prediction`` names the object: one of ``names`` (default :func:`object_names`) occurs in
    ``normalize_answer(prediction)`` as whole words ("a tabby cat" names ``tabby``).

    Raises:
        TypeError: a non-str prediction.
    """
    pred = f" {normalize_answer(prediction)} "
    return any(f" {n} " in pred for n in (names if names is not None else object_names(wnid, label)))


def score_caption(caption: str, meta: dict, names: Iterable[str] | None = None) -> dict[str, bool]:
    """Each field of ``caption`` right or wrong against the scene ``meta``: ``{"subject", "background",
    "shapes"}`` (see the module docstring). ``names``: accepted subject names (default
    :func:`object_names` of the subject).

    Raises:
        TypeError: a non-str caption. KeyError: ``meta`` lacks a field.
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a str, got {type(caption).__name__}")
    text = " ".join(re.findall(r"[a-z0-9]+", caption.lower().replace("grey", "gray")))
    subj = meta["subject"]
    bg = meta["background"]
    subject_ok = names_object(caption, subj["label"], subj.get("wnid"), names)
    if bg["kind"] == "photo":
        background_ok = "photo" in text.split() and not _BACKGROUND.search(text)
    else:
        found = _BACKGROUND.findall(text)
        background_ok = found == [bg["color"]]
    said = set(_SHAPE.findall(text))
    truth = {(o["color"], o["shape"]) for o in meta["shapes"]}
    shapes_ok = said == truth and (bool(truth) or "no shapes" in text)
    return {"subject": subject_ok, "background": background_ok, "shapes": shapes_ok}
