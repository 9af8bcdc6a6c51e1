"""lmms-eval tasks shipped with vtprune: give this folder to lmms-eval with ``--include_path``.

* ``vtprune_pope_local`` (``vtprune_pope_local.yaml`` + ``utils.py``): yes/no questions about local photos,
  exact-match accuracy of the first word, read from ``vtprune_pope_local.jsonl`` in the directory lmms-eval
  runs in; :mod:`vtprune.lmms_eval_tasks.pope_local` writes that file from POPE's COCO questions.

:data:`TASKS_DIR` is the folder's path (``python -c "import vtprune.lmms_eval_tasks as t; print(t.TASKS_DIR)"``).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""The folder to pass to lmms-eval's ``--include_path`` (or ``TaskManager(include_path=...)``)."""

POPE_LOCAL_TASK = "vtprune_pope_local"
POPE_LOCAL_JSONL = "vtprune_pope_local.jsonl"  # the data file name the task's YAML reads

__all__ = ["TASKS_DIR", "POPE_LOCAL_TASK", "POPE_LOCAL_JSONL"]
