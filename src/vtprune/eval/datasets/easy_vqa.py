"""``easy-vqa``: easy-VQA's test questions (PyPI ``easy_vqa``): 9673 questions on 1000 64x64 images; kinds
``yes/no`` (7136), ``shape`` (1257), ``color`` (1280). Split ``test`` only.

Source: easy-VQA (Victor Zhou, PyPI ``easy-vqa``, MIT).
"""

from __future__ import annotations

from pathlib import Path

from vtprune.eval.datasets.base import Sample, check_split
from vtprune.eval.datasets.registry import register_dataset

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_kind(answer: str) -> str:
    """``yes/no``, ``shape`` or ``color``: easy-VQA's three question types, which its answers identify
    exactly (yes/no questions answer yes / no, shape questions a shape, colour questions a colour)."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


@register_dataset("easy-vqa", splits=("test",))
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
