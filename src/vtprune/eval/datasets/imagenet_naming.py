"""``imagenet-naming``: "What is in the image?" on the ImageNet sample's photos, answered in the open and
scored by whether the answer names the object: its label or one of its WordNet 3.0 synonyms as whole words
(:func:`vtprune.eval.open_answers.names_object`). Splits ``test`` (the 200 held-out photos, classes the
bundled model never saw in training) and ``train`` (800). Kind ``naming``; ids
``imagenet-naming/<split>/<file>``; ``meta``: ``file``, ``wnid``, ``label``, ``scorer`` (``"names"``).

Source: reconstructed for this project (the bundled model's open-naming target, issue 14).
"""

from __future__ import annotations

from pathlib import Path

from vtprune.eval.datasets.base import Sample, default_data_root, imagenet_split
from vtprune.eval.datasets.registry import register_dataset

QUESTION = "What is in the image?"


@register_dataset("imagenet-naming", splits=("test", "train"), max_new_tokens=12)
def load_imagenet_naming(split: str = "test", limit: int | None = None, root: Path | None = None,
                         seed: int = 0) -> list[Sample]:
    """One open "What is in the image?" per photo of ``split``, in the split's order (``seed`` unused: the
    split is fixed).

    Raises:
        FileNotFoundError: the ImageNet sample is missing. ValueError: unknown split.
    """
    rows = imagenet_split(Path(root) if root is not None else default_data_root(), split)
    rows = rows if limit is None else rows[:limit]
    return [Sample(id=f"imagenet-naming/{split}/{r['file']}", image=r["path"], question=QUESTION, answer=r["label"],
                   kind="naming", meta={"file": r["file"], "wnid": r["wnid"], "label": r["label"], "scorer": "names"})
            for r in rows]
