"""The data-set registry: each data-set module registers its builder with :func:`register_dataset` (as
methods and adapters register themselves); :func:`load_dataset` builds one by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from vtprune.eval.datasets.base import Sample, check_split, default_data_root

Builder = Callable[[str, "int | None", Path, int], list[Sample]]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A registered set: its builder ``(split, limit, root, seed) -> samples`` (may stop early at
    ``limit``), the splits it has, the greedy tokens its answers need (``max_new_tokens``) and its
    ``version``: an int raised whenever the builder's samples change (which samples, their order, a
    question, an answer or what the scorer reads in ``meta``), so that an evaluation folder written from
    the older samples is refused rather than resumed (:mod:`vtprune.eval.runner`)."""

    build: Builder
    splits: tuple[str, ...]
    max_new_tokens: int = 8
    version: int = 1


DATASETS: dict[str, DatasetEntry] = {}
"""Name -> :class:`DatasetEntry`, in registration order."""


def register_dataset(name: str, splits: tuple[str, ...] = ("test",), max_new_tokens: int = 8,
                     version: int = 1) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(split, limit, root, seed) -> list[Sample]`` as data set ``name``, whose
    answers need ``max_new_tokens`` greedy tokens (8: a word or yes / no), at ``version`` (raise it when the
    builder's samples change: :class:`DatasetEntry`).

    Raises:
        ValueError: ``name`` is registered already by another builder; ``version`` not an int >= 1.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"data set {name!r}: version must be an int >= 1, got {version!r}")

    def add(builder: Builder) -> Builder:
        if name in DATASETS and DATASETS[name].build is not builder:
            raise ValueError(f"data set {name!r} is registered already")
        DATASETS[name] = DatasetEntry(builder, tuple(splits), max_new_tokens, version)
        return builder
    return add


def load_dataset(name: str, split: str = "test", limit: int | None = None, root: str | Path | None = None,
                 seed: int = 0) -> list[Sample]:
    """Build the named set (see :mod:`vtprune.eval.datasets` for the sets, their splits and sizes).

    Args:
        name: a key of :data:`DATASETS`.
        split: ``"test"`` (every set) or ``"train"`` (``imagenet-pope``, ``scenes``).
        limit: keep the first ``limit`` samples of the canonical order (None: all).
        root: data root (default :func:`~vtprune.eval.datasets.base.default_data_root`).
        seed: seed of every random choice (negatives, scenes); the same seed gives the same samples.

    Raises:
        ValueError: unknown name (the message lists the available sets), unknown split, bad limit.
        FileNotFoundError: the data are missing (the message names the path).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(sorted(DATASETS))}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    entry = DATASETS[name]
    check_split(name, split, entry.splits)
    root = Path(root) if root is not None else default_data_root()
    samples = entry.build(split, limit, root, seed)
    return samples if limit is None else samples[:limit]
