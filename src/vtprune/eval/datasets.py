"""Evaluation samples, the data-set registry, and the readers of the real data sets.

A :class:`Sample` is one (image, question, reference answer) triple with a question ``kind`` (the key of
per-kind accuracy) and free-form ``meta``. :func:`load_dataset` builds a named set from
:data:`DATASETS`:

=================  =====================================================================================
``pope-coco``      POPE's COCO questions (random / popular / adversarial files), kept only where the
                   image is present (``<root>/pope`` + ``<root>/photos``; 4 COCO images there: 24
                   questions per file, 72 in all, 36 yes). Kind ``yes/no:<file>``. Split ``test`` only.
``imagenet-pope``  POPE-style yes/no questions on the ImageNet sample's held-out images
                   (:mod:`vtprune.eval.imagenet_pope`): 200 images x 3 kinds x (1 yes + 1 no) = 1200.
``easy-vqa``       easy-VQA's test questions (PyPI ``easy_vqa``): 9673 questions on 1000 64x64 images;
                   kinds ``yes/no`` (7136), ``shape`` (1257), ``color`` (1280). Split ``test`` only.
``scenes``         Synthetic subject / background scenes made from real photos
                   (:mod:`vtprune.eval.scenes`); splits ``test`` (200 scenes on the held-out subjects:
                   1508 questions with seed 0) and ``train`` (800 scenes, 6074 questions).
=================  =====================================================================================

Data root (``root``): the folder holding ``pope/``, ``photos/`` and ``imagenet-sample/``; by default
``$VTPRUNE_DATA``, else ``../shared/data`` beside the repository checkout (read in place, never copied).

Order and ``limit``: every set has one canonical, seeded order that interleaves its kinds (POPE: row i of
each file in turn; ImageNet-POPE: per image its yes/no pair of each kind; scenes: per scene its
questions), so a prefix (``limit``) keeps the kinds and yes/no answers roughly balanced.

Our own sets are stored as JSON lines (one :class:`Sample` per line, ``image`` relative to an image
folder): :func:`sample_row` writes a row, :func:`load_jsonl` reads a file back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

POPE_FILES = ("random", "popular", "adversarial")  # POPE's three negative-sampling settings


@dataclasses.dataclass
class Sample:
    """One evaluation question.

    Attributes:
        id: unique within its set, stable across runs (e.g. ``"pope-coco/random/17"``).
        image: a path (str) to an image file, or an in-memory ``PIL.Image.Image`` (RGB).
        question: the question text, as asked.
        answer: the reference answer, lower case (``"yes"`` / ``"no"``, a word, a label, a digit).
        kind: the question kind for per-kind accuracy (e.g. ``"yes/no:adversarial"``, ``"color"``,
            ``"subject"``).
        meta: JSON-serialisable details (source ids, labels, boxes in pixels, ...).
    """

    id: str
    image: str | Image.Image
    question: str
    answer: str
    kind: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """The image as an RGB ``PIL.Image`` (opened from disk when ``image`` is a path)."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        with Image.open(self.image) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------------------- data root

def default_data_root() -> Path:
    """``$VTPRUNE_DATA`` if set, else ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("VTPRUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"


def require(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError naming it and ``what`` was expected there."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path} (pass root= or set VTPRUNE_DATA to the folder "
                                "holding pope/, photos/ and imagenet-sample/)")
    return path


def check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``split`` is one of ``allowed`` for set ``name``."""
    if split not in allowed:
        raise ValueError(f"data set {name!r} has no split {split!r}; available: {', '.join(allowed)}")


# ------------------------------------------------------------------------------ ImageNet sample + split

def split_imagenet(files: Sequence[str], seed: int = 0, frac: float = 0.8) -> tuple[list[int], list[int]]:
    """The fixed train / held-out split of the ImageNet sample used to train the bundled projector.

    Indices into ``files`` sorted by file name are shuffled with ``random.Random(seed)``; the first
    ``round(frac * len(files))`` are the training images, the rest are held out. The result depends only
    on the set of names, not on their order in ``files``. With the 1000 sample photos and seed 0: 800
    train and 200 held-out images (the held-out list is in ``vtprune/models/projector/record.json``).

    Returns:
        (train indices, held-out indices), each in shuffled order.

    Raises:
        ValueError: ``frac`` outside [0, 1].

    Source: ``scripts/train_projector.py`` (moved here unchanged so that evaluation uses the same split).
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac!r}")
    order = sorted(range(len(files)), key=lambda i: files[i])
    random.Random(seed).shuffle(order)
    n = int(round(frac * len(files)))
    return order[:n], order[n:]


SPLIT_SEED = 0  # the bundled projector's split seed: the held-out images are held out only for seed 0


def imagenet_rows(root: Path) -> list[dict[str, str]]:
    """Rows of ``<root>/imagenet-sample/labels.jsonl`` (``file``, ``wnid``, ``label``), in file order.

    Raises:
        FileNotFoundError: the folder or ``labels.jsonl`` is missing.
    """
    folder = require(Path(root) / "imagenet-sample", "the ImageNet sample folder")
    labels = require(folder / "labels.jsonl", "the ImageNet sample's labels.jsonl")
    with open(labels) as f:
        return [json.loads(line) for line in f if line.strip()]


def imagenet_split(root: Path, split: str) -> list[dict[str, str]]:
    """The ImageNet sample rows of ``split`` (``"train"``: 800, ``"test"``: the 200 held-out), in the
    split's shuffled order, each with ``path`` (absolute image path) added. Split seed :data:`SPLIT_SEED`."""
    check_split("imagenet-sample", split, ("test", "train"))
    rows = imagenet_rows(root)
    train, held_out = split_imagenet([r["file"] for r in rows], SPLIT_SEED)
    folder = Path(root) / "imagenet-sample"
    return [dict(rows[i], path=str(folder / rows[i]["file"])) for i in (held_out if split == "test" else train)]


# ------------------------------------------------------------------------------------------- JSONL

def sample_row(sample: Sample, image: str) -> dict[str, Any]:
    """The JSONL row of ``sample`` with ``image`` (a file name relative to the set's image folder)."""
    return {"id": sample.id, "image": image, "question": sample.question, "answer": sample.answer,
            "kind": sample.kind, "meta": sample.meta}


def load_jsonl(path: str | Path, image_root: str | Path) -> list[Sample]:
    """Read a set in our own format: one JSON object per line with ``id``, ``image`` (relative to
    ``image_root``, or absolute), ``question``, ``answer``, ``kind`` and optional ``meta``.

    Raises:
        FileNotFoundError: ``path`` or ``image_root`` is missing.
        ValueError: a line is not JSON or lacks a field (the message gives the line number).
    """
    path, image_root = Path(path), Path(image_root)
    require(path, "the JSONL file")
    require(image_root, "the image folder")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(Sample(id=row["id"], image=str(image_root / row["image"]), question=row["question"],
                                  answer=row["answer"], kind=row["kind"], meta=row.get("meta", {})))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a sample row (need id, image, question, answer, kind): {e}") from e
    return out


# -------------------------------------------------------------------------------------------- POPE

def object_question(label: str) -> str:
    """POPE's question about an object: ``"Is there a {label} in the image?"`` ("an" before a vowel)."""
    return f"Is there {'an' if label[:1].lower() in 'aeiou' else 'a'} {label} in the image?"


_POPE_OBJECT = re.compile(r"^Is there an? (.+) in the image\?$")


def read_pope(path: str | Path, image_dir: str | Path, kind: str) -> list[Sample]:
    """One POPE question file (JSON lines ``question_id``, ``image``, ``text``, ``label``), keeping only
    questions whose image is in ``image_dir``; logs how many were dropped.

    Sample ids are ``pope/<file stem>/<question_id>``; ``meta`` has ``question_id``, ``object`` (the
    object named by the question) and ``file``.

    Raises:
        FileNotFoundError: the file or folder is missing.
        ValueError: a row lacks a field or has a label other than yes / no.

    Source: POPE (Li et al., EMNLP 2023), question files of ``AoiDragon/POPE``.
    """
    path, image_dir = Path(path), Path(image_dir)
    require(path, "the POPE question file")
    require(image_dir, "the POPE image folder")
    present = {p.name for p in image_dir.iterdir()}
    out, total = [], 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            try:
                row = json.loads(line)
                qid, image, text, label = row["question_id"], row["image"], row["text"], row["label"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{n}: not a POPE row (need question_id, image, text, label): {e}") from e
            if label not in ("yes", "no"):
                raise ValueError(f"{path}:{n}: label must be 'yes' or 'no', got {label!r}")
            if image not in present:
                continue
            m = _POPE_OBJECT.match(text)
            out.append(Sample(id=f"pope/{path.stem}/{qid}", image=str(image_dir / image), question=text,
                              answer=label, kind=kind,
                              meta={"question_id": qid, "object": m.group(1) if m else None, "file": image}))
    if len(out) < total:
        log.info("%s: kept %d of %d questions (only those whose image is in %s)", path.name, len(out), total, image_dir)
    return out


def interleave(groups: Iterable[Sequence[Sample]]) -> list[Sample]:
    """Round-robin merge: item 0 of each group, then item 1 of each, ... (shorter groups drop out)."""
    groups = [list(g) for g in groups]
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def load_pope_coco(split: str = "test", limit: int | None = None, root: Path | None = None,
                   seed: int = 0) -> list[Sample]:
    """POPE COCO: the three files under ``<root>/pope`` with images from ``<root>/photos``.

    Kind ``yes/no:<random|popular|adversarial>``; ids ``pope-coco/<setting>/<question_id>``. With the
    four COCO images in ``photos/``: 24 questions per setting (12 yes), 72 in all. ``seed`` is unused
    (the files fix the questions).

    Raises:
        FileNotFoundError: a file or folder is missing, or no question's image is present.
    """
    check_split("pope-coco", split, ("test",))
    root = Path(root) if root is not None else default_data_root()
    groups = []
    for setting in POPE_FILES:
        rows = read_pope(root / "pope" / f"coco_pope_{setting}.json", root / "photos", f"yes/no:{setting}")
        for s in rows:
            s.id = f"pope-coco/{setting}/{s.meta['question_id']}"
            s.meta["setting"] = setting
        groups.append(rows)
    out = interleave(groups)
    if not out:
        raise FileNotFoundError(f"none of the POPE questions' images is in {root / 'photos'}")
    return out


# ---------------------------------------------------------------------------------------- easy-VQA

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_kind(answer: str) -> str:
    """``yes/no``, ``shape`` or ``color``: easy-VQA's three question types, which its answers identify
    exactly (yes/no questions answer yes / no, shape questions a shape, colour questions a colour)."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def load_easy_vqa(split: str = "test", limit: int | None = None, root: Path | None = None,
                  seed: int = 0) -> list[Sample]:
    """easy-VQA's test split in the package's order: 9673 questions on 1000 64x64 PNGs.

    Ids ``easy-vqa/test/<row>``; answers lower case; ``meta``: ``image_id``. ``root`` and ``seed`` are
    unused (the data ship with the package).

    Raises:
        ModuleNotFoundError: ``easy_vqa`` is not installed (``pip install easy-vqa``).

    Source: easy-VQA (Victor Zhou, PyPI ``easy-vqa``, MIT).
    """
    check_split("easy-vqa", split, ("test",))
    try:
        import easy_vqa
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the easy-vqa data set needs the PyPI package easy-vqa (pip install easy-vqa)") from e
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    n = len(questions) if limit is None else min(limit, len(questions))
    return [Sample(id=f"easy-vqa/test/{i}", image=paths[image_ids[i]], question=questions[i],
                   answer=answers[i].lower(), kind=easy_vqa_kind(answers[i].lower()), meta={"image_id": image_ids[i]})
            for i in range(n)]


# ---------------------------------------------------------------------------------------- registry

def _imagenet_pope(split, limit, root, seed):
    from vtprune.eval.imagenet_pope import load_imagenet_pope

    return load_imagenet_pope(split, limit, root, seed)


def _scenes(split, limit, root, seed):
    from vtprune.eval.scenes import load_scenes

    return load_scenes(split, limit, root, seed)


# name -> builder(split, limit, root, seed) -> list[Sample]; builders may stop early at ``limit``.
DATASETS: dict[str, Callable[..., list[Sample]]] = {
    "pope-coco": load_pope_coco,
    "imagenet-pope": _imagenet_pope,
    "easy-vqa": load_easy_vqa,
    "scenes": _scenes,
}


def load_dataset(name: str, split: str = "test", limit: int | None = None, root: str | Path | None = None,
                 seed: int = 0) -> list[Sample]:
    """Build the named set (see the module docstring for the sets, their splits and sizes).

    Args:
        name: a key of :data:`DATASETS`.
        split: ``"test"`` (every set) or ``"train"`` (``imagenet-pope``, ``scenes``).
        limit: keep the first ``limit`` samples of the canonical order (None: all).
        root: data root (default :func:`default_data_root`).
        seed: seed of every random choice (negatives, scenes); the same seed gives the same samples.

    Raises:
        ValueError: unknown name (the message lists the available sets), unknown split, bad limit.
        FileNotFoundError: the data are missing (the message names the path).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(sorted(DATASETS))}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    root = Path(root) if root is not None else default_data_root()
    samples = DATASETS[name](split, limit, root, seed)
    return samples if limit is None else samples[:limit]
