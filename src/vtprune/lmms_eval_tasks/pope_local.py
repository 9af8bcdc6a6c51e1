"""Write the data file of the ``vtprune_pope_local`` lmms-eval task from POPE's COCO question files.

POPE (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language Models") asks
"Is there a <object> in the image?" about COCO val2014 images, in three files (``random``, ``popular``,
``adversarial`` negative sampling), JSON lines ``question_id``, ``image``, ``text``, ``label``. Only the
questions whose image is in the photo folder are kept. Rows are interleaved across the files (row i of
each file in turn), so a prefix (``limit``) keeps the three settings and yes / no answers mixed.

Usage::

    python -m vtprune.lmms_eval_tasks.pope_local [--root DATA] [--out vtprune_pope_local.jsonl] [--limit N]

``--root`` holds ``pope/`` and ``photos/`` (default ``$VTPRUNE_DATA``, else ``../shared/data`` beside the
repository checkout). Images are referenced by absolute path, never copied.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

from vtprune.lmms_eval_tasks import POPE_LOCAL_JSONL

POPE_FILES = ("random", "popular", "adversarial")


def default_root() -> Path:
    """``$VTPRUNE_DATA`` if set, else ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("VTPRUNE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"


def pope_rows(root: str | Path, files: tuple[str, ...] = POPE_FILES) -> list[dict]:
    """Task rows (``id`` = ``<file>/<question_id>``, ``image`` absolute path, ``question``, ``answer``,
    ``category`` = the file) of the POPE questions whose image is in ``<root>/photos``, interleaved.

    Raises:
        FileNotFoundError: ``<root>/pope/coco_pope_<file>.json`` or ``<root>/photos`` is missing.
        ValueError: a file name outside :data:`POPE_FILES`.
    """
    root = Path(root)
    photos = root / "photos"
    if not photos.is_dir():
        raise FileNotFoundError(f"photo folder not found: {photos} (pass --root, the folder holding pope/ and photos/)")
    per_file = []
    for name in files:
        if name not in POPE_FILES:
            raise ValueError(f"unknown POPE file {name!r}; available: {', '.join(POPE_FILES)}")
        path = root / "pope" / f"coco_pope_{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"POPE question file not found: {path}")
        rows = []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                q = json.loads(line)
                image = photos / q["image"]
                if image.is_file():
                    rows.append({"id": f"{name}/{q['question_id']}", "image": str(image.resolve()),
                                 "question": q["text"], "answer": q["label"].strip().lower(), "category": name})
        per_file.append(rows)
    return [row for group in itertools.zip_longest(*per_file) for row in group if row is not None]


def build_jsonl(out: str | Path = POPE_LOCAL_JSONL, root: str | Path | None = None, limit: int | None = None,
                files: tuple[str, ...] = POPE_FILES) -> Path:
    """Write the first ``limit`` (all when None) rows of :func:`pope_rows` to ``out`` as JSON lines.

    Returns the path written. Raises FileNotFoundError / ValueError as :func:`pope_rows`, ValueError for
    ``limit < 1`` or when no question has its image available.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rows = pope_rows(root if root is not None else default_root(), files)
    if not rows:
        raise ValueError("no POPE question has its image in the photo folder")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in rows[:limit]:
            f.write(json.dumps(row) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtprune.lmms_eval_tasks.pope_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="folder holding pope/ and photos/ (default $VTPRUNE_DATA or ../shared/data)")
    parser.add_argument("--out", default=POPE_LOCAL_JSONL, help=f"output file (default ./{POPE_LOCAL_JSONL})")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N questions (default all)")
    args = parser.parse_args(argv)
    try:
        path = build_jsonl(args.out, args.root, args.limit)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    with open(path) as f:
        n = sum(1 for _ in f)
    print(f"wrote {n} questions to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
