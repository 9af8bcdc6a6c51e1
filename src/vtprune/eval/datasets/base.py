"""What every data set shares: :class:`Sample`, the data root, split checks, the fixed ImageNet-sample
split, the JSONL format of our own sets, and POPE's object question.

A :class:`Sample` is one (image, question, reference answer) triple with a question ``kind`` (the key of
per-kind accuracy) and free-form ``meta``. Data root (``root``): the folder holding ``pope/``,
``photos/`` and ``imagenet-sample/``; by default ``$VTPRUNE_DATA``, else ``../shared/data`` beside the
repository checkout (read in place, never copied). Our own sets are stored as JSON lines (one
:class:`Sample` per line, ``image`` relative to an image folder): :func:`sample_row` writes a row,
:func:`load_jsonl` reads a file back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
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

    def image_digest(self) -> str:
        """SHA-256 (hex) of the image's content: a file's bytes (cached by path, size and modification time),
        or an in-memory image's mode, size and pixels; not its path.

        Raises:
            FileNotFoundError: ``image`` names a missing file.
        """
        if isinstance(self.image, Image.Image):
            h = hashlib.sha256(f"{self.image.mode}{self.image.size}".encode())
            h.update(self.image.tobytes())
            return h.hexdigest()
        st = os.stat(self.image)
        return _file_digest(str(self.image), st.st_size, st.st_mtime_ns)

    def fingerprint(self, image_digest: str | None = None) -> str:
        """16 hex digits of a SHA-256 over what the model is asked and scored on: the question, the answer,
        the kind, ``meta`` and the image's content (:meth:`image_digest`; pass it when known already: the
        questions of one image share it). The same sample read from a moved data root keeps its fingerprint.

        Raises:
            FileNotFoundError: ``image`` names a missing file.
        """
        h = hashlib.sha256(json.dumps([self.question, self.answer, self.kind, self.meta], sort_keys=True,
                                      default=str).encode())
        h.update((image_digest or self.image_digest()).encode())
        return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes, cached by (path, size, mtime): many samples share an image."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------------------- data root

def default_data_root() -> Path:
    """``$VTPRUNE_DATA`` if set, else ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("VTPRUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[5] / "shared" / "data"


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
    train and 200 held-out images (the held-out list is in ``vtprune/models/weights/record.json``).

    Returns:
        (train indices, held-out indices), each in shuffled order.

    Raises:
        ValueError: ``frac`` outside [0, 1].

    Source: the bundled model's first (projector-only) recipe, moved here unchanged so that training
    (``scripts/train_default_model.py``) and evaluation use the same split.
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


def interleave(groups: Iterable[Sequence[Sample]]) -> list[Sample]:
    """Round-robin merge: item 0 of each group, then item 1 of each, ... (shorter groups drop out)."""
    groups = [list(g) for g in groups]
    out: list[Sample] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out
