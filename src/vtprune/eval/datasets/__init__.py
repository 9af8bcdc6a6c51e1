"""Evaluation data sets: one module each, registered by name (:func:`register_dataset`); plain JSONL +
image folders, nothing from a hub. :func:`load_dataset` builds one:

=================  =====================================================================================
``pope-coco``      POPE's COCO questions (random / popular / adversarial files), kept only where the
                   image is present (``<root>/pope`` + ``<root>/photos``; 4 COCO images there: 24
                   questions per file, 72 in all, 36 yes). Kind ``yes/no:<file>``. Split ``test`` only
                   (:mod:`~vtprune.eval.datasets.pope_coco`).
``imagenet-pope``  POPE-style yes/no questions on the ImageNet sample's held-out images
                   (:mod:`~vtprune.eval.datasets.imagenet_pope`): 200 images x 3 kinds x (1 yes + 1 no) = 1200.
``easy-vqa``       easy-VQA's test questions (PyPI ``easy_vqa``): 9673 questions on 1000 64x64 images;
                   kinds ``yes/no`` (7136), ``shape`` (1257), ``color`` (1280). Split ``test`` only
                   (:mod:`~vtprune.eval.datasets.easy_vqa`).
``scenes``         Synthetic subject / background scenes made from real photos
                   (:mod:`~vtprune.eval.datasets.scenes`); splits ``test`` (200 scenes on the held-out
                   subjects: 1508 questions with seed 0) and ``train`` (800 scenes, 6074 questions).
``imagenet-naming`` "What is in the image?" on the held-out ImageNet photos (200), an open answer that
                   must name the object (label or WordNet synonym) (:mod:`~vtprune.eval.datasets.imagenet_naming`).
``scene-captions`` "Describe the image." on the scenes (200 test scenes), scored per field: subject,
                   background, shapes (:mod:`~vtprune.eval.datasets.scene_captions`).
``imagenet-category`` "Is there {a category} in the image?" on the ImageNet sample's photos for 30
                   everyday WordNet categories above the label (animal, dog, vehicle, food, building, ...),
                   a balanced yes / no pair per level; kinds ``category:broad`` / ``category:basic``;
                   test 424 questions, train 1610 (:mod:`~vtprune.eval.datasets.imagenet_category`).
=================  =====================================================================================

Order and ``limit``: every set has one canonical, seeded order that interleaves its kinds (POPE: row i of
each file in turn; ImageNet-POPE: per image its yes/no pair of each kind; scenes: per scene its
questions), so a prefix (``limit``) keeps the kinds and yes/no answers roughly balanced. What every set
shares (samples, the data root, the ImageNet split, JSONL) is in :mod:`~vtprune.eval.datasets.base`.
"""

from vtprune.eval.datasets import (  # noqa: F401  (registers them)
    easy_vqa,
    imagenet_category,
    imagenet_naming,
    imagenet_pope,
    pope_coco,
    scene_captions,
    scenes,
)
from vtprune.eval.datasets.base import (
    POPE_FILES,
    Sample,
    default_data_root,
    imagenet_rows,
    imagenet_split,
    load_jsonl,
    object_question,
    sample_row,
    split_imagenet,
)
from vtprune.eval.datasets.registry import DATASETS, load_dataset, register_dataset

__all__ = ["DATASETS", "POPE_FILES", "Sample", "default_data_root", "imagenet_rows", "imagenet_split", "load_dataset",
           "load_jsonl", "object_question", "register_dataset", "sample_row", "split_imagenet"]
