"""Attach a vtprune method around the generation of a stock lmms-eval HF model class.

:class:`VTPruneMixin` goes first in the bases of a subclass of an lmms-eval model class whose
``generate_until`` calls ``self.model.generate`` (``llava_hf``, ``qwen2_vl``, ``qwen2_5_vl``).
It takes ``method`` (a method spec, ``parvts``, ``parvts:fusion=fixed@25%``: :mod:`vtprune.methods.spec`)
and the method's options out of the constructor's keyword arguments, hands the rest to the stock class,
and for every ``generate_until`` call attaches ``vtprune.apply(self.model, method, **options)`` with an
``on_report`` callback that collects each ``model.generate``'s report (one request) and an ``on_error``
callback that keeps the errors the stock loop would swallow, and detaches. The stock class's prompt
building and generate loop run unchanged. The stock class loads the model without hub kernels unless
``USE_HUB_KERNELS`` is set (:func:`vtprune.models.loading.hub_kernels_off_by_default`).

Where it reports:
* ``self.vtprune_reports``: one :meth:`vtprune.Run.report` per request, in generation order, each with
  its lmms-eval ``task`` added (``generate_until`` runs the stock loop once per task for this);
* lmms-eval's log and its results JSON: per task, the means of
  :func:`vtprune.lmms_eval_plugin.options.summarize` go through lmms-eval's ``gen_metrics.log_metrics``
  (with zero tokens and seconds, so the stock throughput totals are unchanged); lmms-eval averages them
  over tasks into ``results["throughput"]``: ``avg_vtprune_equivalent_budget``,
  ``avg_vtprune_prefill_flops_ratio``, ``avg_vtprune_kv_cache_ratio``, ...;
* ``vtprune_report=PATH`` (a model arg): the same per-request reports appended to PATH as JSON lines.

Errors raised by vtprune inside ``model.generate`` are re-raised after the stock loop (which would
otherwise log them and score an empty answer), so a failed run never yields a score.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtprune.api import apply, check
from vtprune.lmms_eval_plugin.options import check_method, split_model_args, summarize
from vtprune.models.loading import hub_kernels_off_by_default

if TYPE_CHECKING:
    from torch import nn

METRIC_PREFIX = "vtprune_"


class VTPruneMixin:
    """vtprune around an lmms-eval HF model class (put it first in the bases).

    Args:
        method: a vtprune method spec: a name (``none``, ``parvts``, ``st3``, ``fastv``, ``vtw``, ``pdrop``,
            ``visionzip``, ``random``, ``pool``), optionally with fixed options and a budget
            (``parvts:fusion=fixed@25%``, :mod:`vtprune.methods.spec`); default ``none`` (the stock model
            with vtprune's accounting).
        vtprune_report: optional path of a JSON-lines file; one :meth:`vtprune.Run.report` per request is
            appended to it.
        **kwargs: the stock class's arguments (``pretrained``, ``device``, ``dtype``, ...) and the method's
            options (``budget`` visual tokens kept per image, ``keep_ratio``, ``discard_layer``, ...), all
            as given in ``--model_args`` (see :mod:`vtprune.lmms_eval_plugin.options` for the conversion).

    Raises:
        ValueError: unknown method, or an option value out of range (checked before loading, and again
            against the loaded model: budget vs its visual tokens per image, layers vs its depth).
        TypeError: an option the method does not have, or an unsupported model class.
    """

    vtprune_model_id = "vtprune"

    if TYPE_CHECKING:
        model: nn.Module  # the loaded HF model, an attribute of the stock lmms-eval class this is combined with

    def __init__(self, method: str = "none", vtprune_report: str | None = None, **kwargs) -> None:
        stock_params = self._stock_parameters()
        stock, options = split_model_args(kwargs, stock_params)
        self.vtprune_method = check_method(method, options, stock_params, self.vtprune_model_id)
        self.vtprune_options = options
        self.vtprune_report_path = Path(vtprune_report) if vtprune_report else None
        self.vtprune_reports: list[dict] = []
        with hub_kernels_off_by_default():  # the stock class's from_pretrained (vtprune.models.loading)
            super().__init__(**self.prepare_stock_args(stock))
        self.after_stock_init()
        check(self.model, self.vtprune_method, **options)  # model-dependent checks

    # ------------------------------------------------------------------ hooks for subclasses
    def prepare_stock_args(self, stock: dict[str, Any]) -> dict[str, Any]:
        """Adjust the stock class's arguments before it loads the model. Default: a ``device`` not given
        becomes ``"cuda"`` when available, else ``"cpu"`` (stock classes default to ``"cuda"``); in a
        single process, an empty ``device_map`` (the stock default, which transformers 5 rejects in
        ``from_pretrained``) becomes ``None``: the model loads without a device map and the stock class
        moves it to ``device``, which is what the stock code did with transformers 4."""
        params = self._stock_parameters()
        if "device" in params and stock.get("device") is None:
            from vtprune.inputs import default_device

            stock = {**stock, "device": default_device()}
        if "device_map" in params and stock.get("device_map", "") == "":
            from accelerate import PartialState

            if PartialState().num_processes == 1:  # several processes: the stock class picks cuda:<rank>
                stock = {**stock, "device_map": None}
        return stock

    def after_stock_init(self) -> None:
        """Called once the stock class has loaded the model and processor (default: nothing)."""

    @classmethod
    def _stock_parameters(cls) -> list[str]:
        """Names of the keyword parameters of the stock class's ``__init__`` (the next one in the MRO)."""
        stock_init = super().__init__
        return [p.name for p in inspect.signature(stock_init).parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    # ------------------------------------------------------------------ generation under vtprune
    def generate_until(self, requests):
        """The stock ``generate_until`` with the method attached, called once per task (results in the
        order of ``requests``), so that each report is tagged with its task; see the module docstring.

        Raises:
            RuntimeError: vtprune raised inside ``model.generate`` for some request (the cause is chained).
        """
        by_task: dict[Any, list[int]] = {}
        for i, request in enumerate(requests):
            by_task.setdefault(getattr(request, "task_name", None), []).append(i)
        results: list = [None] * len(requests)
        for task, indices in by_task.items():
            with self.vtprune_attached(task) as errors:
                # the stock lmms-eval class after this mixin in the MRO has it
                out = super().generate_until([requests[i] for i in indices])  # type: ignore[misc]
            if errors:
                raise RuntimeError(f"{self.vtprune_model_id}: generation failed under vtprune method "
                                   f"{self.vtprune_method!r} ({len(errors)} request(s) of task {task!r}); "
                                   f"first error: {errors[0]!r}") from errors[0]
            for i, result in zip(indices, out, strict=True):
                results[i] = result
        return results

    def loglikelihood(self, requests):
        """The stock ``loglikelihood`` for method ``none``.

        Raises:
            NotImplementedError: for any pruning method: a forward pass under vtprune returns logits only
                for the tokens the last layer kept, so per-position log-likelihoods are undefined; use a
                ``generate_until`` task.
        """
        if self.vtprune_method != "none":
            raise NotImplementedError(f"{self.vtprune_model_id}: loglikelihood tasks are not supported with method "
                                      f"{self.vtprune_method!r} (pruned forwards return logits for kept tokens "
                                      "only); use a generate_until task or method=none")
        return super().loglikelihood(requests)  # type: ignore[misc]  # the stock class's, after this mixin

    @contextlib.contextmanager
    def vtprune_attached(self, task: str | None = None) -> Iterator[list[BaseException]]:
        """Attach the method to ``self.model`` for the block; record one report per ``model.generate``,
        tagged ``report["task"] = task``.

        Yields the list of exceptions raised inside ``model.generate`` (filled while the block runs). On
        exit the run is detached (also on an exception); on a normal exit the block's reports are
        summarised and logged.
        """
        errors: list[BaseException] = []
        start = len(self.vtprune_reports)
        run = apply(self.model, self.vtprune_method, **self.vtprune_options,
                            on_report=lambda report: self._record({**report.to_dict(), "task": task}),
                            on_error=errors.append)
        try:
            yield errors
        finally:
            run.detach()
        self._log_summary(self.vtprune_reports[start:])

    def _record(self, report: dict) -> None:
        self.vtprune_reports.append(report)
        if self.vtprune_report_path is not None:
            self.vtprune_report_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.vtprune_report_path, "a") as f:
                f.write(json.dumps(report) + "\n")

    def _log_summary(self, reports: list[dict]) -> None:
        summary = summarize(reports)
        if not summary:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        metrics: dict[str, float | str | None] = {METRIC_PREFIX + k: v for k, v in summary.items()}
        # logged, not averaged (not numbers)
        metrics[METRIC_PREFIX + "method"] = self.vtprune_method
        metrics[METRIC_PREFIX + "task"] = reports[0].get("task")
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=metrics)

    def vtprune_summary(self) -> dict[str, float]:
        """Means over every request so far (see :func:`vtprune.lmms_eval_plugin.options.summarize`)."""
        return summarize(self.vtprune_reports)
