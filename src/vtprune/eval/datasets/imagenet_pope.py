"""``imagenet-pope``: POPE-style yes/no object questions on the ImageNet sample's held-out photos.

Every image of the split gets, for each of POPE's three negative-sampling settings, one positive
("Is there a(n) {its label} in the image?" -> yes) and one negative ("Is there a {other label} in the
image?" -> no), so each setting is balanced (test split: 200 images -> 400 questions per setting, 1200
in all). The negative label is never the image's own label text (ImageNet has two "crane" and two
"maillot" classes). Settings (``kind`` = ``yes/no:<setting>``):

* ``random``: a random other image's label from the same split (``random.Random(seed + 1)``, one
  ``choice`` per image in split order, as the bundled model's first, projector-only recipe drew its
  held-out questions: ``experiments/previous-projector-only/RECORD.md``).
* ``popular``: POPE's popular negatives are the most frequent COCO objects. Our photos have one class
  each, so "popular" is defined from POPE's own data: the 20 COCO categories most often present in
  POPE's COCO images (the yes questions of ``coco_pope_popular.json``; "person" excluded, ImageNet has
  no such class), each mapped to its everyday ImageNet class (:data:`POPULAR`, most frequent first). The
  negative is drawn uniformly from those 20 (minus the image's own class).
* ``adversarial``: POPE's adversarial negatives are objects that co-occur with the true one; here a
  WordNet 3.0 sibling: one of the ImageNet-1k classes under the image class's nearest hypernym that has
  any other ImageNet class below it (:meth:`NounHierarchy.nearest_siblings`; e.g. Chihuahua -> another
  toy-dog breed). Needs WordNet 3.0 offline (:mod:`vtprune.eval.wordnet`). ``meta`` names the shared
  hypernym and its distance.

Sample ids ``imagenet-pope/<split>/<wnid>/<setting>/<yes|no>``; ``meta``: ``file``, ``wnid``, ``label``
(the image's class), ``setting``, and for negatives ``object_wnid`` / ``object_label`` (the class asked
about), plus ``hypernym`` / ``hypernym_name`` / ``distance`` for adversarial ones.

Source: POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023,
Sec. 3: random / popular / adversarial sampling), reconstructed for one-object ImageNet photos as above.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from vtprune.eval.datasets.base import (
    POPE_FILES,
    Sample,
    default_data_root,
    imagenet_rows,
    imagenet_split,
    object_question,
)
from vtprune.eval.datasets.registry import register_dataset
from vtprune.eval.wordnet import load_hierarchy

# (COCO category, ImageNet wnid, ImageNet label): the 20 COCO categories most often present in POPE's
# COCO images, most frequent first (counts of yes questions in coco_pope_popular.json: car 63 ... skis 18;
# checked by tests/test_datasets.py), "person" (345) left out.
POPULAR: tuple[tuple[str, str, str], ...] = (
    ("car", "n02930766", "cab"),
    ("dining table", "n03201208", "dining table"),
    ("backpack", "n02769748", "backpack"),
    ("bowl", "n03775546", "mixing bowl"),
    ("truck", "n03930630", "pickup"),
    ("chair", "n03376595", "folding chair"),
    ("bottle", "n04557648", "water bottle"),
    ("sports ball", "n04254680", "soccer ball"),
    ("tv", "n04404412", "television"),
    ("handbag", "n04026417", "purse"),
    ("couch", "n04344873", "studio couch"),
    ("spoon", "n04597913", "wooden spoon"),
    ("laptop", "n03642806", "laptop"),
    ("bed", "n03388549", "four-poster"),
    ("traffic light", "n06874185", "traffic light"),
    ("dog", "n02099601", "golden retriever"),
    ("clock", "n04548280", "wall clock"),
    ("bicycle", "n03792782", "mountain bike"),
    ("remote", "n04074963", "remote control"),
    ("skis", "n04228054", "ski"),
)

@register_dataset("imagenet-pope", splits=("test", "train"))
def load_imagenet_pope(split: str = "test", limit: int | None = None, root: Path | None = None,
                       seed: int = 0) -> list[Sample]:
    """Build the set (see the module docstring); ``split`` ``"test"`` (held-out 200) or ``"train"`` (800).

    Order: per image (split order), per setting (random, popular, adversarial): yes then no.

    Raises:
        FileNotFoundError: the ImageNet sample or the WordNet 3.0 files are missing.
        ValueError: unknown split.
    """
    root = Path(root) if root is not None else default_data_root()
    rows = imagenet_split(root, split)
    every = imagenet_rows(root)
    label_of = {r["wnid"]: r["label"] for r in every}
    hierarchy = load_hierarchy()
    pool = tuple(sorted(label_of))

    # random: the projector's held-out protocol, one erng.choice per image in split order
    erng = random.Random(seed + 1)
    random_neg = [erng.choice([o for o in rows if o["label"] != r["label"]]) for r in rows]
    prng = random.Random(f"imagenet-pope:popular:{seed}")
    arng = random.Random(f"imagenet-pope:adversarial:{seed}")

    out: list[Sample] = []
    for r, rneg in zip(rows, random_neg, strict=True):
        base = {"file": r["file"], "wnid": r["wnid"], "label": r["label"]}
        negatives: dict[str, dict[str, Any]] = {"random": {"object_wnid": rneg["wnid"], "object_label": rneg["label"]}}
        pop = [(w, lab) for _, w, lab in POPULAR if lab != r["label"] and w != r["wnid"]]
        w, lab = prng.choice(pop)
        negatives["popular"] = {"object_wnid": w, "object_label": lab}
        found = hierarchy.nearest_siblings(r["wnid"], pool)  # one cached index for the whole pool
        if found is None or any(label_of[w] == r["label"] for w in found[2]):  # same-name class: re-ask without it
            found = hierarchy.nearest_siblings(r["wnid"], [p for p in pool if label_of[p] != r["label"]])
        if found is None:  # never for the ImageNet-1k classes; kept as a clear failure
            raise ValueError(f"no WordNet sibling among the ImageNet classes for {r['wnid']} ({r['label']})")
        hyper, dist, siblings = found
        w = arng.choice(siblings)
        negatives["adversarial"] = {"object_wnid": w, "object_label": label_of[w], "hypernym": hyper,
                                    "hypernym_name": hierarchy.name(hyper), "distance": dist}
        for setting in POPE_FILES:
            kind = f"yes/no:{setting}"
            stem = f"imagenet-pope/{split}/{r['wnid']}/{setting}"
            out.append(Sample(f"{stem}/yes", r["path"], object_question(r["label"]), "yes", kind,
                              dict(base, setting=setting, object_wnid=r["wnid"], object_label=r["label"])))
            neg = negatives[setting]
            out.append(Sample(f"{stem}/no", r["path"], object_question(neg["object_label"]), "no", kind,
                              dict(base, setting=setting, **neg)))
        if limit is not None and len(out) >= limit:
            break
    return out
