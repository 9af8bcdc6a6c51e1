"""The library's verbs: :func:`apply` a method to a model (a :class:`~vtprune.engine.run.Run`), and
:func:`check` it against a model without attaching anything (its :class:`~vtprune.engine.interface.Plan`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vtprune.engine.interface import Plan
from vtprune.engine.report import Report
from vtprune.engine.run import Run, check_model
from vtprune.methods import Method, make_method


def apply(model: torch.nn.Module, method: str | Method = "none", *,
          on_report: Callable[[Report], None] | None = None,
          on_error: Callable[[BaseException], None] | None = None, profile: bool = False, **options: Any) -> Run:
    """Attach a visual-token method to ``model`` and return the attached :class:`Run`.

    Args:
        model: a supported HF multimodal model (see ``vtprune.adapters``), any dtype / device.
        method: a method name (``vtprune.METHODS``: ``none``, ``parvts``, ``st3``, ``fastv``, ...) or an
            instance (``vtprune.ParVTS(budget=64)``).
        on_report: the run's seam called with each generation's report (see :class:`Run`).
        on_error: the run's seam called with an exception raised inside ``generate`` (see :class:`Run`).
        profile: keep a host-time profile of the run (see :class:`Run`).
        **options: the method's options (e.g. ``budget=64`` visual tokens per image, or
            ``keep_ratio=0.125``), see each method's docstring.

    Raises:
        TypeError: unsupported model class, or an option the method does not have.
        ValueError: unknown method, or an option value out of range (budget vs this model's
            visual tokens per image, layers vs its depth), or an attention implementation or hub kernels
            the run cannot hook (:meth:`Run.attach`). Nothing is attached then.
    """
    m = make_method(method, **options)
    return Run(model, m, on_report=on_report, on_error=on_error, profile=profile).attach()


def check(model: torch.nn.Module, method: str | Method = "none", *, visual_tokens: int | None = None,
          **options: Any) -> Plan | None:
    """Build the method and check it against ``model`` without attaching anything.

    Returns:
        The method's plan (its options resolved: kept counts, per-layer targets, a solved ratio or layer)
        for ``visual_tokens`` per image, or for the count the model's config fixes; None when neither is
        known (LLaVA-NeXT, Qwen: the count follows the image size; then only the options that depend on
        the model's depth are checked).

    Raises:
        As :func:`apply`, except what only attaching checks (the attention implementation, hub kernels).
    """
    return check_model(model, make_method(method, **options), visual_tokens)
