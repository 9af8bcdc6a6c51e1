"""Evaluation data: samples, data sets, synthetic scenes and answer scoring (no model code here).

``load_dataset(name, split, limit, root, seed) -> list[Sample]`` builds one of :data:`DATASETS`
(``pope-coco``, ``imagenet-pope``, ``easy-vqa``, ``scenes``); :mod:`vtprune.eval.answers` turns a model's
text answers into correctness and POPE metrics.
"""

from vtprune.eval.answers import is_correct, normalize_answer, parse_yes_no, pope_metrics
from vtprune.eval.datasets import DATASETS, Sample, load_dataset, load_jsonl, split_imagenet

__all__ = ["DATASETS", "Sample", "load_dataset", "load_jsonl", "split_imagenet", "is_correct", "normalize_answer",
           "parse_yes_no", "pope_metrics"]
