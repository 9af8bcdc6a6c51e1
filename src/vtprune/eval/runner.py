"""The accuracy runner: every method x budget on every sample of a data set, appended as it goes.

One record (a JSON line) per (data set, sample, method, budget): the answer, whether it is correct,
and what the run kept (equivalent budget, relative FLOPs, relative KV). The unpruned model (method
``none``) always runs first; tables compare every answer with it. A rerun with the same output folder
skips the records already written, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vtprune.api import apply

REFERENCE = ("none", "all")  # (method, budget label) of the unpruned reference every run includes


@dataclasses.dataclass(frozen=True)
class Condition:
    """One method at one budget: ``method`` is its label with fixed options (``"visionzip:contextual=0"``),
    ``budget`` its budget label (``"25%"``, ``"64"``, ``"default"``, ``"all"``) and ``options`` the method
    options they stand for."""

    method: str
    budget: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The vtprune method name (the label without its fixed options: ``visionzip:contextual=0`` ->
        ``visionzip``)."""
        return self.method.split(":")[0]


def conditions(methods: Iterable[str], budgets: Iterable[str | int | float]) -> list[Condition]:
    """The unpruned reference, then every method x budget (``none`` is the reference, not repeated), in the
    grammar of :mod:`vtprune.methods.spec`: ``"visionzip:contextual=0"`` (saliency-only selection) or
    ``"parvts:fusion=fixed:alpha=0.7"`` crossed with the budgets; ``"st3@64"`` at its own budget.

    Raises:
        ValueError: an unknown method (naming the accepted ones) or a malformed budget.
    """
    from vtprune.methods import expand

    out = [Condition(*REFERENCE)]
    for spec in expand(methods, budgets):
        if spec.name == "none":
            continue
        out.append(Condition(spec.label, spec.budget or "default", tuple(sorted(spec.options.items()))))
    return out


def record_key(record: dict) -> tuple[str, str, str, str]:
    """The identity of a record: (data set, sample id, method, budget label)."""
    return record["data"], str(record["id"]), record["method"], record["budget"]


def read_records(path: str | Path) -> list[dict]:
    """The records of a results file (JSON lines); a missing file gives []. A truncated last line (an
    interrupted write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


DEFAULT_NEW_TOKENS = 8  # greedy tokens per short answer, where a data set names no length of its own


def run_eval(model, processor, samples_by_data: dict[str, list], conds: list[Condition], results: str | Path,
             batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> list[dict]:
    """Answer every sample under every condition and append one record per answer to ``results``.

    Args:
        model, processor: a supported HF model (see ``vtprune.adapters``) and its processor.
        samples_by_data: data set name -> its samples (:class:`vtprune.eval.datasets.Sample`).
        conds: from :func:`conditions` (the reference first).
        results: the JSONL file; records already there are skipped (resume).
        batch_size: samples per ``generate`` call (left-padded; a LLaVA-NeXT / Qwen batch of mixed
            image sizes runs as groups of alike samples, :mod:`vtprune.engine.groups`).
        max_new_tokens: greedy tokens per answer (default: each data set's own, ``DatasetEntry.max_new_tokens``:
            8 for short answers, more for captions); the answer is the first line of the decoded text.

    Returns:
        Every record in ``results`` after the run (old and new).

    Raises:
        ValueError / TypeError: a method option out of range for this model (before any generation of
            that condition), images of different token counts in one prompt.
    """
    from vtprune.eval.datasets import DATASETS
    from vtprune.eval.scorer import score
    from vtprune.inputs import build_batch

    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_line(results)
    done = {record_key(r) for r in read_records(results)}
    todo = [(data, cond, s) for data, samples in samples_by_data.items() for cond in conds for s in samples
            if (data, str(s.id), cond.method, cond.budget) not in done]
    log(f"{len(done)} records already in {results}; {len(todo)} answers to compute")
    bar = _progress(len(todo), progress)
    with results.open("a") as out:
        for data, cond, chunk in _chunks(todo, batch_size):
            images = [s.load_image() for s in chunk]
            inputs = build_batch(processor, images, [s.question for s in chunk], device=model.device, dtype=model.dtype)
            new = max_new_tokens if max_new_tokens is not None else (
                DATASETS[data].max_new_tokens if data in DATASETS else DEFAULT_NEW_TOKENS)
            with apply(model, cond.name, **dict(cond.options)) as run:
                generated = model.generate(**inputs, max_new_tokens=new, do_sample=False)
            texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            report = run.report()
            for i, (sample, text) in enumerate(zip(chunk, texts, strict=True)):
                prediction = text.strip().split("\n")[0].strip()
                correct, fields = score(prediction, sample)
                record = {"data": data, "id": str(sample.id), "kind": sample.kind, "method": cond.method,
                          "budget": cond.budget, "options": report["options"], "question": sample.question,
                          "answer": sample.answer, "prediction": prediction, "correct": correct,
                          **({"fields": fields} if fields is not None else {}), **_accounting(report["samples"][i])}
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(chunk))
    bar.close()
    return read_records(results)


def _drop_partial_line(path: Path) -> None:
    """Cut an interrupted write (text after the last newline) so that appended records start on a line
    of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _accounting(sample_report: dict) -> dict:
    """What one sample's run kept, relative to the unpruned model (from :meth:`vtprune.Run.report`)."""
    flops = sample_report["flops"]
    done = flops["prefill"]["exact"] + flops["decode"]["exact"]
    full = flops["prefill"]["exact_unpruned"] + flops["decode"]["exact_unpruned"]
    return {"visual_tokens": sample_report["visual_tokens_in"],
            "equivalent_budget": sample_report["equivalent_budget"],
            "final_budget": sample_report["final_budget"],
            "relative_flops": done / full if full else 1.0,
            "relative_prefill_flops": flops["prefill"]["exact_ratio"],
            "relative_kv": sample_report["kv_cache"]["ratio"]}


def _chunks(todo: list, size: int):
    """Consecutive runs of at most ``size`` items sharing (data set, condition)."""
    chunk: list = []
    key = None
    for data, cond, sample in todo:
        if chunk and (len(chunk) == size or (data, cond) != key):
            assert key is not None  # set with the chunk's first item
            yield key[0], key[1], chunk
            chunk = []
        key = (data, cond)
        chunk.append(sample)
    if chunk:
        assert key is not None  # set with the chunk's first item
        yield key[0], key[1], chunk


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="answer", desc="vtprune eval")
