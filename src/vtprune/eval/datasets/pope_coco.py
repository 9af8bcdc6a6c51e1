"""``pope-coco``: POPE's COCO questions (random / popular / adversarial files), kept only where the image is
present (``<root>/pope`` + ``<root>/photos``; 4 COCO images there: 24 questions per file, 72 in all, 36
yes). Kind ``yes/no:<file>``. Split ``test`` only.

Source: POPE (Li et al., EMNLP 2023), question files of ``AoiDragon/POPE``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from vtprune.eval.datasets.base import POPE_FILES, Sample, check_split, default_data_root, interleave, require
from vtprune.eval.datasets.registry import register_dataset

log = logging.getLogger(__name__)

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



@register_dataset("pope-coco", splits=("test",))
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
