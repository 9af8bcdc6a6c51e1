"""Attach a vtprune method around the generation of a stock lmms-eval HF model class.

:class:`VTPruneMixin` goes first in the bases of a subclass of an lmms-eval model class whose
``generate_until`` calls ``self.model.generate`` (``llava_hf``, ``qwen2_vl``, ``qwen2_5_vl``).
It takes ``method`` (a method spec, ``parvts``, ``parvts:fusion=fixed@25%``: :mod:`vtprune.methods.spec`)
and the method's options out of the constructor's keyword arguments, hands the rest to the stock class,
and for every ``generate_until`` call attaches ``vtprune.apply(self.model, method, **options)`` with an
``on_report`` callback that collects each ``model.generate``'s report (one request) and an ``on_error``
callback that keeps the errors the stock loop would swallow, and detaches. The stock class's prompt
building and generate loop run unchanged.

``loglikelihood`` (lmms-eval's ``loglikelihood`` and ``multiple_choice`` tasks) runs the same way, around
:meth:`VTPruneMixin.vtprune_loglikelihood` (the stock class's ``loglikelihood`` unless a subclass mends it):
a forward call under vtprune returns its logits at every prompt position (:mod:`vtprune.engine.outputs`),
so each request is scored by the pruned model. Its reports come from the model's forward calls: one
:meth:`vtprune.Run.report` after each (one request in lmms-eval's loops; a prefill only, so no decode
figures).

Where it reports:
* ``self.vtprune_reports``: one :meth:`vtprune.Run.report` per request, in generation order, each with
  its lmms-eval ``task`` and ``request_type`` (``"generate_until"`` / ``"loglikelihood"``) added (the stock
  loops run once per task for this);
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vtprune.api import apply, check
from vtprune.lmms_eval_plugin.options import check_method, split_model_args, summarize

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
        def one_task(task, task_requests):
            with self.vtprune_attached(task) as errors:
                # the stock lmms-eval class after this mixin in the MRO has it
                out = super(VTPruneMixin, self).generate_until(task_requests)  # type: ignore[misc]
            if errors:
                raise RuntimeError(f"{self.vtprune_model_id}: generation failed under vtprune method "
                                   f"{self.vtprune_method!r} ({len(errors)} request(s) of task {task!r}); "
                                   f"first error: {errors[0]!r}") from errors[0]
            return out

        return _per_task(requests, one_task)

    def loglikelihood(self, requests):
        """:meth:`vtprune_loglikelihood` with the method attached, called once per task (results in the order
        of ``requests``), one report per model forward call; see the module docstring.

        Raises:
            whatever the loop raises: NotImplementedError from a stock class that has no ``loglikelihood``
            (lmms-eval's Qwen, Gemma 3 and InternVL classes), ValueError where a request's log-likelihood
            is not finite (:meth:`vtprune_loglikelihood` of the LLaVA classes).
        """
        def one_task(task, task_requests):
            with self.vtprune_attached(task, per_forward=True):
                return self.vtprune_loglikelihood(task_requests)

        return _through_evaluator(_per_task(requests, one_task))

    def vtprune_loglikelihood(self, requests) -> list:
        """The loglikelihood loop :meth:`loglikelihood` runs under vtprune: the stock class's (a subclass
        overrides it where the stock loop does not run on transformers 5). Returns one
        ``(log-likelihood or loss, is_greedy)`` per request, the stock class's convention."""
        return super().loglikelihood(requests)  # type: ignore[misc]  # the stock class's, after this mixin

    @contextlib.contextmanager
    def vtprune_attached(self, task: str | None = None, per_forward: bool = False) -> Iterator[list[BaseException]]:
        """Attach the method to ``self.model`` for the block; record one report per ``model.generate``
        (``per_forward``: per forward call of the model instead), tagged ``report["task"] = task`` and
        ``report["request_type"]`` (``"generate_until"``, ``"loglikelihood"`` with ``per_forward``).

        Yields the list of exceptions raised inside ``model.generate`` (filled while the block runs). On
        exit the run is detached (also on an exception); on a normal exit the block's reports are
        summarised and logged.
        """
        errors: list[BaseException] = []
        start = len(self.vtprune_reports)
        tags = {"task": task, "request_type": "loglikelihood" if per_forward else "generate_until"}
        run = apply(self.model, self.vtprune_method, **self.vtprune_options,
                    on_report=None if per_forward else lambda report: self._record({**report.to_dict(), **tags}),
                    on_error=errors.append)
        # registered after the run's own hooks, so it runs after them: the report covers the whole call
        handle = (self.model.register_forward_hook(lambda *_: self._record({**run.report().to_dict(), **tags}))
                  if per_forward else None)
        try:
            yield errors
        finally:
            if handle is not None:
                handle.remove()
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


def _through_evaluator(results: list) -> list:
    """``results`` (``(float, bool)`` per request) in a form lmms-eval's evaluator hands to the tasks intact.

    lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which turns
    anything but a string, a ``(str, meta)`` pair or a ``GenerationResult`` into ``str(output)``: a
    log-likelihood ``(6.3, False)`` becomes the string ``"(6.3, False)"``, and every ``loglikelihood`` /
    ``multiple_choice`` task then fails in its ``process_results`` (``too many values to unpack``), whatever
    the model. The ``text`` of a ``GenerationResult`` goes through as it is, so each result is wrapped in
    one when, and only when, the installed evaluator would turn it into a string. (lmms-eval's response
    cache, ``--use_cache``, does not take such results: it calls ``text.strip()``.)
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # a release without them passes results through
        return results
    probe = (0.0, True)
    if unwrap_generation_output(probe)[0] == probe:
        return results
    return [GenerationResult(text=cast(Any, result)) for result in results]


def _per_task(requests: list, one_task: Callable[[Any, list], list]) -> list:
    """``one_task(task, its requests)`` for each lmms-eval task among ``requests`` (their ``task_name``), in
    order of first appearance; the results put back in the order of ``requests``."""
    by_task: dict[Any, list[int]] = {}
    for i, request in enumerate(requests):
        by_task.setdefault(getattr(request, "task_name", None), []).append(i)
    results: list = [None] * len(requests)
    for task, indices in by_task.items():
        out = one_task(task, [requests[i] for i in indices])
        for i, result in zip(indices, out, strict=True):
            results[i] = result
    return results
