"""``imagenet-category``: yes/no questions about everyday categories above the ImageNet label.

A tabby is also a cat, a mammal and an animal; a church is a building; a lifeboat a boat and a vehicle. The
question is ``"Is there {a category} in the image?"`` (POPE's form, :func:`category_question`) for a
curated list of everyday categories (:data:`CATEGORIES`), each one or more WordNet 3.0 noun synsets. A
photo's class (its ``wnid``) is under a category when one of the category's synsets is among the class's
WordNet hypernyms (:meth:`vtprune.eval.wordnet.NounHierarchy.ancestors`, the class itself included).

Levels (``kind`` = ``category:<level>``), after the basic / superordinate levels of Rosch et al.
("Basic objects in natural categories", Cognitive Psychology 8, 1976): ``basic`` (the everyday name of a
kind: dog, cat, bird, car, boat, building, flower, ...) and ``broad`` (a superordinate that groups many
kinds: animal, mammal, vehicle, food, fruit, clothing, container, furniture, tool, ...). Every photo of
``split`` gets, at each level where some category is above its class, one positive ("yes": one of those
categories, seeded choice) and one negative ("no": a category of the same level that is not above its
class), so each level's yes / no answers are balanced; a photo with no category above it at a level gets
no question at that level. Order: per photo (split order), per level (``broad``, ``basic``): yes then no.
Sizes (seed 0): test 200 photos -> 424 questions (broad 282, basic 142), train 800 -> 1610.

Which categories: everyday object words with at least one ImageNet class below them in both the
``train`` (800) and the ``test`` (200 held-out) split of :func:`~vtprune.eval.datasets.imagenet_split`
(checked by ``tests/test_datasets.py``). Left out: ``person`` (ImageNet-1k's three person classes,
scuba diver, groom and ballplayer, are all in the train split, and a "no" would often be wrong: many
ImageNet photos show people the label does not name), aircraft, bus, hat, shoe, weapon, computer (no
held-out class). Classes whose WordNet sense is not what the photos show are never asked about
(:data:`EXCLUDED_CLASSES`: ImageNet's ``cup`` is WordNet's punch cup, a food; ``menu`` a food).

Known noise, as in POPE on one-label photos: a negative is decided by the label's hierarchy, so a photo
showing an unlabelled object of the category (a dog on a sofa asked "Is there furniture?") counts "no".

Sample ids ``imagenet-category/<split>/<wnid>/<level>/<yes|no>``; ``meta``: ``file``, ``wnid``,
``label``, ``level``, ``category`` (the word asked), ``category_synsets`` (its WordNet ids).

Source: reconstructed for this project (issue 23: category questions at several WordNet levels, so that
category questions generalise to photos outside ImageNet's label set).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from pathlib import Path

from vtprune.eval.datasets.base import Sample, default_data_root, imagenet_split
from vtprune.eval.datasets.registry import register_dataset
from vtprune.eval.wordnet import NounHierarchy, load_hierarchy


@dataclasses.dataclass(frozen=True)
class Category:
    """One category: the word asked (``name``), its phrase in the question (``phrase``: with its article,
    or none for a mass noun), its level (``"broad"`` / ``"basic"``), its WordNet 3.0 synsets, and the
    synsets whose classes it is never asked about (``unsure``: WordNet puts them under it, a viewer would
    not, e.g. wheeled vehicles under container)."""

    name: str
    phrase: str
    level: str
    synsets: tuple[str, ...]
    unsure: tuple[str, ...] = ()


def _c(name: str, level: str, *synsets: str, phrase: str | None = None, unsure: tuple[str, ...] = ()) -> Category:
    article = "an" if name[:1] in "aeiou" else "a"
    return Category(name, phrase if phrase is not None else f"{article} {name}", level, synsets, unsure)


LEVELS = ("broad", "basic")

CATEGORIES: tuple[Category, ...] = (
    _c("animal", "broad", "n00015388"),
    _c("mammal", "broad", "n01861778"),
    _c("vehicle", "broad", "n04524313"),
    # food: WordNet's "food, nutrient" (dishes, drinks) and "food, solid food" (produce, bread)
    _c("food", "broad", "n00021265", "n07555863", phrase="food"),
    _c("fruit", "broad", "n07705931", phrase="fruit"),  # edible fruit
    _c("vegetable", "broad", "n07707451"),
    _c("clothing", "broad", "n03051540", phrase="clothing"),
    # WordNet: a wheeled vehicle "usually has a container for transport" and sits under container
    _c("container", "broad", "n03094503", unsure=("n04524313",)),
    _c("furniture", "broad", "n03405725", phrase="furniture"),
    _c("tool", "broad", "n04451818"),
    _c("musical instrument", "broad", "n03800933"),
    _c("dog", "basic", "n02084071"),
    _c("cat", "basic", "n02121620"),
    _c("bird", "basic", "n01503061"),
    _c("fish", "basic", "n02512053"),
    _c("insect", "basic", "n02159955"),
    _c("spider", "basic", "n01772222"),
    _c("snake", "basic", "n01726692"),
    _c("lizard", "basic", "n01674464"),
    _c("monkey", "basic", "n02484322"),
    _c("bear", "basic", "n02131653"),
    _c("car", "basic", "n02958343"),  # car, auto, automobile (a motor vehicle with four wheels)
    _c("truck", "basic", "n04490091"),
    _c("boat", "basic", "n02858304"),
    _c("bicycle", "basic", "n02834778"),
    _c("ball", "basic", "n02778669"),  # game equipment
    _c("bottle", "basic", "n02876657"),
    _c("building", "basic", "n02913152"),
    _c("flower", "basic", "n11669921"),
    _c("clock", "basic", "n03046257"),
)
"""The curated categories, broad first (30: 11 broad, 19 basic); every synset id is WordNet 3.0."""

EXCLUDED_CLASSES = {
    "n07930864": "cup (WordNet: a punch served in a pitcher, under food; the photos show cups)",
    "n07565083": "menu (WordNet: a dish / course list under food; the photos show printed menus)",
}
"""ImageNet classes never asked about: their WordNet sense differs from what the photos show."""


def category_question(category: Category) -> str:
    """``"Is there {phrase} in the image?"`` (e.g. ``"Is there an animal in the image?"``,
    ``"Is there food in the image?"``)."""
    return f"Is there {category.phrase} in the image?"


def category_answers(hierarchy: NounHierarchy, wnid: str,
                     categories: Iterable[Category] = CATEGORIES) -> dict[str, list[Category]]:
    """Which categories (in the given order) are above the class ``wnid``: ``{"yes": [...], "no": [...]}``.

    "yes": a synset of the category is among ``wnid``'s WordNet ancestors (the class itself included) and
    none of its ``unsure`` synsets is; "no": none of its synsets is; a category with an ``unsure`` synset
    above the class is in neither list (never asked).

    Raises:
        KeyError: ``wnid`` is not a WordNet 3.0 noun synset id.
    """
    up = hierarchy.ancestors(wnid)
    out: dict[str, list[Category]] = {"yes": [], "no": []}
    for c in categories:
        if not any(s in up for s in c.synsets):
            out["no"].append(c)
        elif not any(s in up for s in c.unsure):
            out["yes"].append(c)
    return out


@register_dataset("imagenet-category", splits=("test", "train"))
def load_imagenet_category(split: str = "test", limit: int | None = None, root: Path | None = None,
                           seed: int = 0) -> list[Sample]:
    """Build the set (see the module docstring); ``split`` ``"test"`` (held-out 200) or ``"train"`` (800).

    Raises:
        FileNotFoundError: the ImageNet sample or the WordNet 3.0 files are missing.
        ValueError: unknown split.
    """
    rows = imagenet_split(Path(root) if root is not None else default_data_root(), split)
    hierarchy = load_hierarchy()
    rng = random.Random(f"imagenet-category:{seed}")
    out: list[Sample] = []
    for r in rows:
        if r["wnid"] in EXCLUDED_CLASSES:
            continue
        answers = category_answers(hierarchy, r["wnid"])
        base = {"file": r["file"], "wnid": r["wnid"], "label": r["label"]}
        for level in LEVELS:
            yes = [c for c in answers["yes"] if c.level == level]
            if not yes:
                continue
            no = [c for c in answers["no"] if c.level == level]
            stem = f"imagenet-category/{split}/{r['wnid']}/{level}"
            for answer, c in (("yes", rng.choice(yes)), ("no", rng.choice(no))):
                out.append(Sample(f"{stem}/{answer}", r["path"], category_question(c), answer, f"category:{level}",
                                  dict(base, level=level, category=c.name, category_synsets=list(c.synsets))))
        if limit is not None and len(out) >= limit:
            break
    return out
