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
``loglikelihood`` (lmms-eval's ``loglikelihood`` and ``multiple_choice`` tasks) runs the same way, around
:meth:`VTPruneMixin.vtprune_loglikelihood` (the stock class's ``loglikelihood`` unless a subclass mends it):
a forward call under vtprune returns its logits at every prompt position (:mod:`vtprune.engine.outputs`),
so each request is scored by the pruned model. Its reports come from the model's forward calls: one
:meth:`vtprune.Run.report` after each (one request in lmms-eval's loops; a prefill only, so no decode
figures).

Where it reports:
* ``self.vtprune_reports``: one :meth:`vtprune.Run.report` per request of this process, in generation
  order, each with its lmms-eval ``task`` and ``request_type`` (``"generate_until"`` / ``"loglikelihood"``)
  added (the stock loops run once per task for this); the padding requests lmms-eval adds so that every rank runs as many requests (its
  ``__padding_only__`` clones) run under the method but are not reported;
* lmms-eval's log and its results JSON: when lmms-eval calls ``clean()`` after the last request, per task,
  the means of :func:`vtprune.lmms_eval_plugin.options.summarize` over **every rank's** requests (gathered
  with ``torch.distributed.all_gather_object`` when a process group of several ranks is initialised, as
  under ``torchrun`` or ``accelerate launch``) go through lmms-eval's ``gen_metrics.log_metrics`` (with
  zero tokens and seconds, so the stock throughput totals are unchanged); lmms-eval averages them over
  tasks into ``results["throughput"]``: ``avg_vtprune_requests``, ``avg_vtprune_equivalent_budget``,
  ``avg_vtprune_prefill_flops_ratio``, ``avg_vtprune_kv_cache_ratio``, ...;
* ``vtprune_report=PATH`` (a model arg): the same per-request reports appended to PATH as JSON lines, by
  each rank to its own file when there are several (:func:`rank_report_path`: ``PATH.rank{N}.jsonl``).

Errors raised by vtprune inside ``model.generate`` are re-raised after the stock loop (which would
otherwise log them and score an empty answer), so a failed run never yields a score.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vtprune.api import apply, check
from vtprune.lmms_eval_plugin.options import check_method, split_model_args, summarize
from vtprune.models.loading import hub_kernels_off_by_default

if TYPE_CHECKING:
    from torch import nn

METRIC_PREFIX = "vtprune_"
PADDING_KEY = "__padding_only__"  # lmms-eval's metadata flag on the requests it adds to even out the ranks


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of this process: torch.distributed's when a process group is initialised, else
    the ``RANK`` / ``WORLD_SIZE`` environment variables that ``torchrun`` and ``accelerate launch`` set, else
    ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_report_path(path: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` appends its reports: ``path`` itself in a single process, else
    ``PATH.rank{N}.jsonl`` (a ``.jsonl`` suffix of ``path`` is not repeated: ``r.jsonl`` -> ``r.rank1.jsonl``),
    so that ranks never write to one file."""
    if world_size <= 1:
        return path
    stem = path.name[:-len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.rank{rank}.jsonl")


def gather_reports(reports: list[dict]) -> list[dict]:
    """Every rank's ``reports``, rank 0's first, when a torch.distributed process group of several ranks is
    initialised (``all_gather_object``: a collective, so every rank must call it, once); else ``reports``.
    With NCCL, the objects travel through this rank's GPU (``LOCAL_RANK``, as lmms-eval binds it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(reports)
    gathered: list[list[dict] | None] = [None] * dist.get_world_size()
    device: contextlib.AbstractContextManager = contextlib.nullcontext()
    if dist.get_backend() == "nccl" and "LOCAL_RANK" in os.environ:
        device = torch.cuda.device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    with device:
        dist.all_gather_object(gathered, list(reports))
    return [report for part in gathered for report in part or []]


def is_padding(request) -> bool:
    """Whether ``request`` is a clone lmms-eval added to even out the ranks (``metadata["__padding_only__"]``)."""
    metadata = getattr(request, "metadata", None)
    return isinstance(metadata, dict) and bool(metadata.get(PADDING_KEY))


class VTPruneMixin:
    """vtprune around an lmms-eval HF model class (put it first in the bases).

    Args:
        method: a vtprune method spec: a name (``none``, ``parvts``, ``st3``, ``fastv``, ``vtw``, ``pdrop``,
            ``visionzip``, ``random``, ``pool``), optionally with fixed options and a budget
            (``parvts:fusion=fixed@25%``, :mod:`vtprune.methods.spec`); default ``none`` (the stock model
            with vtprune's accounting).
        vtprune_report: optional path of a JSON-lines file; one :meth:`vtprune.Run.report` per request is
            appended to it (with several ranks, each rank's to ``PATH.rank{N}.jsonl``: :func:`rank_report_path`).
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
        self._vtprune_logged = 0  # reports already summarised into lmms-eval's metrics (by clean())
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
        order of ``requests``), so that each report is tagged with its task, and once more for the padding
        requests lmms-eval adds on a rank with fewer requests (run, not reported); see the module docstring.

        Raises:
            RuntimeError: vtprune raised inside ``model.generate`` for some request (the cause is chained).
        """
        def one_task(task, padding, task_requests):
            with self.vtprune_attached(task, record=not padding) as errors:
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
        def one_task(task, padding, task_requests):
            with self.vtprune_attached(task, per_forward=True, record=not padding):
                return self.vtprune_loglikelihood(task_requests)

        return _through_evaluator(_per_task(requests, one_task))

    def vtprune_loglikelihood(self, requests) -> list:
        """The loglikelihood loop :meth:`loglikelihood` runs under vtprune: the stock class's (a subclass
        overrides it where the stock loop does not run on transformers 5). Returns one
        ``(log-likelihood or loss, is_greedy)`` per request, the stock class's convention."""
        return super().loglikelihood(requests)  # type: ignore[misc]  # the stock class's, after this mixin

    @contextlib.contextmanager
    def vtprune_attached(self, task: str | None = None, per_forward: bool = False,
                         record: bool = True) -> Iterator[list[BaseException]]:
        """Attach the method to ``self.model`` for the block; when ``record``, keep one report per
        ``model.generate`` (``per_forward``: per forward call of the model instead), tagged
        ``report["task"] = task`` and ``report["request_type"]`` (``"generate_until"``, ``"loglikelihood"``
        with ``per_forward``), in :attr:`vtprune_reports` and the ``vtprune_report`` file.

        Yields the list of exceptions raised inside ``model.generate`` (filled while the block runs). On
        exit the run is detached (also on an exception).
        """
        errors: list[BaseException] = []
        tags = {"task": task, "request_type": "loglikelihood" if per_forward else "generate_until"}
        keep = (lambda report: self._record({**report.to_dict(), **tags})) if record and not per_forward else None
        run = apply(self.model, self.vtprune_method, **self.vtprune_options, on_report=keep, on_error=errors.append)
        # registered after the run's own hooks, so it runs after them: the report covers the whole call
        handle = (self.model.register_forward_hook(lambda *_: self._record({**run.report().to_dict(), **tags}))
                  if per_forward and record else None)
        try:
            yield errors
        finally:
            if handle is not None:
                handle.remove()
            run.detach()

    def _record(self, report: dict) -> None:
        self.vtprune_reports.append(report)
        if self.vtprune_report_path is not None:
            path = rank_report_path(self.vtprune_report_path, *rank_and_world_size())
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(report) + "\n")

    def clean(self):
        """lmms-eval calls this on every rank once the requests are done (then the stock class frees the
        model): log the per-task summaries of every rank's reports not logged yet (see the module docstring;
        a collective under torch.distributed), then the stock ``clean``."""
        self.vtprune_log_summaries()
        return super().clean()  # type: ignore[misc]  # the stock lmms-eval class's, after this mixin

    def vtprune_log_summaries(self) -> dict[Any, dict[str, float]]:
        """Summarise every rank's reports since the last call (:func:`gather_reports`: with several ranks,
        every rank must call this, once) per task, log each task's summary through lmms-eval's
        ``gen_metrics.log_metrics`` and return them (task -> :func:`~vtprune.lmms_eval_plugin.options.summarize`)."""
        reports = gather_reports(self.vtprune_reports[self._vtprune_logged:])
        self._vtprune_logged = len(self.vtprune_reports)
        by_task: dict[Any, list[dict]] = {}
        for report in reports:
            by_task.setdefault(report.get("task"), []).append(report)
        summaries = {task: summarize(rows) for task, rows in by_task.items()}
        for task, summary in summaries.items():
            if summary:
                self._log_summary(task, summary)
        return summaries

    def _log_summary(self, task: Any, summary: dict[str, float]) -> None:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        metrics: dict[str, float | str | None] = {METRIC_PREFIX + k: v for k, v in summary.items()}
        # logged, not averaged (not numbers)
        metrics[METRIC_PREFIX + "method"] = self.vtprune_method
        metrics[METRIC_PREFIX + "task"] = task
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=metrics)

    def vtprune_summary(self) -> dict[str, float]:
        """Means over every request of this process so far (see
        :func:`vtprune.lmms_eval_plugin.options.summarize`)."""
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


def _per_task(requests: list, one_task: Callable[[Any, bool, list], list]) -> list:
    """``one_task(task, padding, its requests)`` for each lmms-eval task among ``requests`` (their
    ``task_name``), apart for the padding requests lmms-eval adds on a rank with fewer requests
    (:func:`is_padding`), in order of first appearance; the results put back in the order of ``requests``."""
    by_task: dict[tuple[Any, bool], list[int]] = {}
    for i, request in enumerate(requests):
        by_task.setdefault((getattr(request, "task_name", None), is_padding(request)), []).append(i)
    results: list = [None] * len(requests)
    for (task, padding), indices in by_task.items():
        out = one_task(task, padding, [requests[i] for i in indices])
        for i, result in zip(indices, out, strict=True):
            results[i] = result
    return results
