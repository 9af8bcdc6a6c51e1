"""``scene-captions``: "Describe the image." on the ``scenes`` set's scenes (:mod:`.scenes`, the same
scenes and splits: ``test`` on the held-out subjects, ``train`` on the training ones), answered with one
sentence and scored field by field against the generator's truth
(:func:`vtprune.eval.open_answers.score_caption`): the subject named, the background colour (or "photo"),
the set of small shapes at the edges. A record is correct when every field is; the tables also give the
accuracy of each field (kinds ``caption:subject``, ``caption:background``, ``caption:shapes``) and of all
fields together (``caption:fields``). Long answers: this is where decode-time methods (ST³'s annealing of
the visual KV cache) act. Kind ``caption``; ids ``scene-captions/<split>/<scene>``; ``meta``: the scene's,
the reference caption (:func:`caption_for`) as ``answer``, ``scorer``
(``"caption"``).

Source: reconstructed for this project (a template and its scorer, not a published benchmark).
"""

from __future__ import annotations

from pathlib import Path

from vtprune.eval.datasets.base import Sample
from vtprune.eval.datasets.registry import register_dataset
from vtprune.eval.datasets.scenes import iter_scenes

QUESTION = "Describe the image."
TEXTURE_WORDS = {"flat": "", "stripes": " striped", "checkerboard": " checkered", "noise": " speckled"}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _reading_order(shapes: list[dict]) -> list[dict]:
    return sorted(shapes, key=lambda o: (o["bbox"][1], o["bbox"][0]))


def caption_for(meta: dict) -> str:
    """The one-sentence caption of a scene from its ``meta`` (subject, background, shapes in reading
    order: top to bottom, then left to right). See the module docstring.

    Raises:
        KeyError: ``meta`` lacks ``subject`` / ``background`` / ``shapes``.
    """
    label = meta["subject"]["label"]
    bg = meta["background"]
    if bg["kind"] == "photo":
        where = "in front of a photo"
    else:
        where = f"on {_article(bg['color'])} {bg['color']}{TEXTURE_WORDS[bg['kind']]} background"
    shapes = [f"a small {o['color']} {o['shape']}" for o in _reading_order(meta["shapes"])]
    if not shapes:
        edge = "with no shapes at the edges"
    elif len(shapes) == 1:
        edge = f"with {shapes[0]} at the edge"
    else:
        edge = "with " + ", ".join(shapes[:-1]) + f" and {shapes[-1]} at the edges"
    return f"{_article(label).capitalize()} {label} {where}, {edge}."


@register_dataset("scene-captions", splits=("test", "train"), max_new_tokens=40)
def load_scene_captions(split: str = "test", limit: int | None = None, root: Path | None = None,
                        seed: int = 0) -> list[Sample]:
    """One caption request per scene of ``split`` (in the scenes' order; building only ``limit`` scenes).

    Raises:
        FileNotFoundError: the ImageNet sample is missing. ValueError: unknown split.
    """
    out: list[Sample] = []
    for s, image, meta, _ in iter_scenes(split, limit, root, seed):
        out.append(Sample(id=f"scene-captions/{split}/{s}", image=image, question=QUESTION, answer=caption_for(meta),
                          kind="caption", meta={**meta, "scene": s, "scorer": "caption"}))
    return out
