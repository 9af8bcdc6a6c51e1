"""Task functions of ``vtprune_pope_local`` (named in ``vtprune_pope_local.yaml``; lmms-eval loads this file
by its path). A document is one row of the JSONL file: ``id``, ``image`` (path) or ``video`` (path of a video
file, e.g. ``.mp4``), ``question``, ``answer``."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

_FIRST_WORD = re.compile(r"[A-Za-z]+")


def doc_to_visual(doc: dict) -> list:
    """The document's image as a one-element list of RGB ``PIL.Image`` (FileNotFoundError if missing), or, for a
    row with ``video`` instead of ``image``, its video as a one-element list of the file's path (str): lmms-eval's
    model classes take a video as its path and read its frames themselves (the Qwen ones through qwen-vl-utils).

    Raises:
        FileNotFoundError: the image or video file does not exist.
        KeyError: the row has neither ``image`` nor ``video``.
    """
    if "image" not in doc and "video" in doc:
        path = Path(doc["video"])
        if not path.is_file():
            raise FileNotFoundError(f"video file not found: {path}")
        return [str(path)]
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """``pre_prompt + question + post_prompt`` (both empty by default, see the YAML)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def parse_yes_no(text: str) -> str:
    """``"yes"`` or ``"no"`` when the answer's first word is that word (any case, punctuation ignored:
    ``"Yes, there is"`` -> ``"yes"``), else ``""`` (counted wrong)."""
    match = _FIRST_WORD.search(text or "")
    word = match.group(0).lower() if match else ""
    return word if word in ("yes", "no") else ""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``accuracy``: 1.0 when the parsed answer equals the reference (exact match), else 0.0;
    ``yes_ratio``: 1.0 when the parsed answer is ``"yes"``."""
    pred = parse_yes_no(results[0])
    return {"accuracy": float(pred == doc["answer"].strip().lower()), "yes_ratio": float(pred == "yes")}
