"""The accuracy runner: every method x budget on every sample of a data set, appended as it goes.

One record (a JSON line) per (data set, sample, method, budget): the answer, whether it is correct,
and what the run kept (equivalent budget, relative FLOPs, relative KV). The unpruned model (method
``none``) always runs first; tables compare every answer with it. A rerun with the same output file
skips the records already written, so an interrupted run resumes where it stopped.

Each record also carries what its answer depends on (``settings``: the model, its dtype, the generation,
the data set's split, seed and version, the sample's fingerprint; ``options``: the method's options with
its defaults resolved). A rerun whose settings differ from those of any record in the file is refused
(:class:`ResumeError`) before it answers anything, so a results file never mixes two settings.

Data-parallel (:mod:`vtprune.eval.parallel`): under ``torchrun``, rank r answers the samples i with
``i % world_size == r`` into ``results.rank<r>.jsonl`` beside the results file, and rank 0 merges those
into the results file when every rank is done, in the order a one-process run writes.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtprune.api import apply

if TYPE_CHECKING:
    from vtprune.eval.parallel import Shard

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
    """The key of a record in its file: (data set, sample id, method, budget label). One file holds one
    record per key; what the record's answer depends on besides the key is its ``settings`` and
    ``options`` (:class:`RunPlan`)."""
    return record["data"], str(record["id"]), record["method"], record["budget"]


def read_records(path: str | Path) -> list[dict]:
    """The records of a results file (JSON lines): first those of a gzip-compressed copy beside it
    (``results.jsonl.gz``: how a large results folder is kept in git, under the 8 MB file limit), then those
    of ``path`` itself (where a resumed run appends). A line of ``path`` that the compressed copy already
    holds is read once (a copy unpacked with ``gunzip -k`` beside its ``.gz`` would otherwise count every
    answer twice). A missing file gives []. A truncated last line (an interrupted write) is ignored."""
    path = Path(path)
    packed = path.with_name(path.name + ".gz")
    lines = gzip.decompress(packed.read_bytes()).decode().splitlines() if packed.is_file() else []
    if path.exists():
        seen = set(lines)
        lines += [line for line in path.read_text().splitlines() if line not in seen]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


DEFAULT_NEW_TOKENS = 8  # greedy tokens per short answer, where a data set names no length of its own


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What every answer of a run depends on besides its sample and its condition.

    Attributes:
        model: the weights' name (:func:`vtprune.inputs.model_identity`: the bundled model's id, a local
            directory's absolute path, or a HuggingFace id).
        dtype: the parameters' dtype (``"float32"``).
        model_revision: a fingerprint of the weights where one is known (the bundled model's), else None.
        data: data set name -> ``(split, seed)`` its samples were built with (``(None, None)`` where absent).
    """

    model: str
    dtype: str
    model_revision: str | None = None
    data: Mapping[str, tuple[str | None, int | None]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_model(cls, model) -> RunSettings:
        """Settings named from the loaded model alone: ``model.name_or_path`` (else its class name), its
        dtype, no revision, no data set details. Prefer the CLI's, which name the model as the user did."""
        name = getattr(model, "name_or_path", "") or type(model).__name__
        return cls(model=str(name), dtype=str(model.dtype).removeprefix("torch."))


class RunPlan:
    """What a run will write: every record's key in the order a one-process run writes them (data set,
    then condition, then sample) and the settings each record carries.

    A record's identity beyond its key (:func:`record_key`), each field checked on resume against the records
    it applies to:

    - ``settings.model``, ``model_revision``, ``dtype`` and ``do_sample`` (false: greedy): every record of the
      file (one model per file);
    - ``settings.max_new_tokens``, ``split``, ``seed`` and ``data_version`` (the registry's
      ``DatasetEntry.version``): every record of that data set;
    - ``settings.sample`` (:meth:`~vtprune.eval.datasets.Sample.fingerprint`): every record of that sample;
    - ``options`` (the method's options with its defaults resolved, ``Method.options()``): every record of
      that method label at that budget label.

    The batch size, the number of processes, the device and ``limit`` are not part of it: batched answers
    equal one-by-one answers (tested), ranks answer as one process does, and ``limit`` takes a prefix of a
    fixed order (raising it adds samples to the same file).

    Raises:
        ValueError / TypeError: a condition's options that its method refuses (naming the option).
        FileNotFoundError: a sample's image file is missing.
    """

    def __init__(self, settings: RunSettings, samples_by_data: Mapping[str, Sequence], conds: Sequence[Condition],
                 max_new_tokens: int | None = None) -> None:
        from vtprune.eval.datasets import DATASETS
        from vtprune.methods import make_method

        self.common: dict[str, Any] = {"model": settings.model, "model_revision": settings.model_revision,
                                       "dtype": settings.dtype, "do_sample": False}
        self.per_data: dict[str, dict[str, Any]] = {}
        for data in samples_by_data:
            entry = DATASETS.get(data)
            split, seed = settings.data.get(data, (None, None))
            new = max_new_tokens if max_new_tokens is not None else (entry.max_new_tokens if entry else DEFAULT_NEW_TOKENS)
            self.per_data[data] = {"max_new_tokens": new, "split": split, "seed": seed,
                                   "data_version": entry.version if entry else None}
        digests: dict[int | str, str] = {}  # the questions of one image share its digest (an image's id: alive here)
        self.fingerprints = {}
        for data, samples in samples_by_data.items():
            for s in samples:
                key = s.image if isinstance(s.image, str) else id(s.image)
                if key not in digests:
                    digests[key] = s.image_digest()
                self.fingerprints[(data, str(s.id))] = s.fingerprint(digests[key])
        self.options = {(c.method, c.budget): _json(make_method(c.name, **dict(c.options)).options()) for c in conds}
        self.order = {(data, str(s.id), c.method, c.budget): n for n, (data, c, s) in enumerate(
            (data, c, s) for data, samples in samples_by_data.items() for c in conds for s in samples)}

    def settings(self, data: str, sample_id: str) -> dict[str, Any]:
        """The ``settings`` of the record of sample ``sample_id`` of data set ``data``."""
        return {**self.common, **self.per_data[data], "sample": self.fingerprints[(data, sample_id)]}

    def differences(self, record: dict) -> list[tuple[str, Any, Any]]:
        """``(what, its value in record, this run's value)`` for each field of ``record``'s identity that this
        run would write otherwise (:class:`RunPlan`); [] when it matches. A record without ``settings``
        gives one ``("settings", None, ...)`` entry."""
        got = record.get("settings")
        if not isinstance(got, dict):
            return [("settings", None, "recorded")]
        data, sid = record.get("data"), str(record.get("id"))
        out = [(k, got.get(k), v) for k, v in self.common.items() if got.get(k) != v]
        out += [(f"{k} of {data}", got.get(k), v) for k, v in self.per_data.get(str(data), {}).items() if got.get(k) != v]
        fingerprint = self.fingerprints.get((str(data), sid))
        if fingerprint is not None and got.get("sample") != fingerprint:
            out.append((f"samples of {data}", sid, None))
        options = self.options.get((record.get("method"), record.get("budget")))  # type: ignore[arg-type]
        if options is not None and _json(record.get("options")) != options:
            out.append((f"options of {record.get('method')}@{record.get('budget')}", record.get("options"), options))
        return out


class ResumeError(ValueError):
    """A results file holds records that this run would write otherwise (``differences``: one line each), or
    records without their settings (``unrecorded``: how many, from before the settings were recorded), so
    resuming into it would mix answers of two settings."""

    def __init__(self, path: Path, differences: list[str], unrecorded: int) -> None:
        self.path, self.differences, self.unrecorded = path, differences, unrecorded
        if differences:
            text = (f"{path} holds answers of other settings than this run's: {'; '.join(differences)}; "
                    "resuming would mix the two")
        else:
            text = (f"{path} holds {unrecorded} records written without their settings (model, dtype, generation, "
                    "data set version, method options: by a vtprune from before they were recorded), which cannot "
                    "be checked against this run's, so they are not resumed")
        super().__init__(text)


def check_resume(results: str | Path, plan: RunPlan) -> None:
    """Check that every record of ``results`` and of its ranks' partial files matches ``plan``
    (:meth:`RunPlan.differences`), reading only.

    Raises:
        ResumeError: naming each field that differs (its value in the file and in this run, or the first
            differing sample), or counting the records without settings.
    """
    results = Path(results)
    found: dict[str, list] = {}  # what -> [there, here, count]
    unrecorded = 0
    for path in [results, *partial_paths(results)]:
        for record in read_records(path):
            for what, there, here in plan.differences(record):
                if what == "settings":
                    unrecorded += 1
                    continue
                found.setdefault(what, [there, here, 0])[2] += 1
    lines = []
    for what, (there, here, count) in found.items():
        records = f"{count} record{'s' if count > 1 else ''}"
        if what.startswith("samples of "):
            lines.append(f"{what} changed since they were answered (question, answer, kind, meta or image): "
                         f"{records}, the first of sample {there!r}")
        else:
            lines.append(f"{what} {_show(there)} there, {_show(here)} here ({records})")
    if lines or unrecorded:
        raise ResumeError(results, lines, unrecorded)


def partial_path(results: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of a data-parallel run appends its records: ``results.rank<r>.jsonl`` beside
    ``results.jsonl``."""
    results = Path(results)
    return results.with_name(f"{results.stem}.rank{rank}{results.suffix}")


def partial_paths(results: str | Path) -> list[Path]:
    """The ranks' partial files beside ``results`` (of any number of ranks), in rank order."""
    results = Path(results)
    pattern = re.compile(re.escape(results.stem) + r"\.rank(\d+)" + re.escape(results.suffix) + "$")
    if not results.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in results.parent.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def merge_partials(results: str | Path, order: Mapping[tuple[str, str, str, str], int]) -> int:
    """Append the records of the ranks' partial files to ``results`` and delete those files: the records
    ``results`` lacks (by :func:`record_key`; the first of duplicates), in ``order`` (key -> position; keys
    not in it after, as found). Crash-safe: a rerun merges again and skips what ``results`` holds.

    Returns:
        How many records were appended.
    """
    results = Path(results)
    parts = partial_paths(results)
    if not parts:
        return 0
    _drop_partial_line(results)
    have = {record_key(r) for r in read_records(results)}
    new: dict[tuple[str, str, str, str], dict] = {}
    for part in parts:
        for record in read_records(part):
            key = record_key(record)
            if key not in have:
                new.setdefault(key, record)
    ranked = sorted(new.values(), key=lambda r: order.get(record_key(r), len(order)))  # stable
    with results.open("a") as out:
        out.writelines(json.dumps(r) + "\n" for r in ranked)
    for part in parts:
        part.unlink()
    return len(ranked)


def run_eval(model, processor, samples_by_data: dict[str, list], conds: list[Condition], results: str | Path,
             batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True,
             log: Callable[[str], None] = print, settings: RunSettings | None = None,
             shard: Shard | None = None) -> list[dict]:
    """Answer every sample under every condition and append one record per answer to ``results``.

    Args:
        model, processor: a supported HF model (see ``vtprune.adapters``) and its processor.
        samples_by_data: data set name -> its samples (:class:`vtprune.eval.datasets.Sample`).
        conds: from :func:`conditions` (the reference first).
        results: the JSONL file; records already there are skipped (resume), after checking that they were
            written with this run's settings (:func:`check_resume`).
        batch_size: samples per ``generate`` call (left-padded; a LLaVA-NeXT / Qwen batch of mixed
            image sizes runs as groups of alike samples, :mod:`vtprune.engine.groups`).
        max_new_tokens: greedy tokens per answer (default: each data set's own, ``DatasetEntry.max_new_tokens``:
            8 for short answers, more for captions); the answer is the first line of the decoded text.
        settings: what names the model and the data sets in each record (default
            :meth:`RunSettings.of_model`).
        shard: this process's part of a data-parallel run (:func:`vtprune.eval.parallel.shard_from_env`; the
            process group joined): it answers its samples into its partial file (:func:`partial_path`) and
            rank 0 merges them (:func:`merge_partials`) once every rank is done. Default: one process.

    Returns:
        Every record in ``results`` after the run (old and new; on every rank, after the merge).

    Raises:
        ResumeError: ``results`` (or a partial file) holds records of other settings or without settings;
            nothing is written then.
        ValueError / TypeError: a method option out of range for this model (before any generation of
            that condition), images of different token counts in one prompt.
    """
    from vtprune.eval.parallel import Shard

    shard = shard or Shard()
    results = Path(results)
    plan = RunPlan(settings or RunSettings.of_model(model), samples_by_data, conds, max_new_tokens)
    check_resume(results, plan)  # every rank reads the same files before anyone writes: the same verdict
    shard.barrier()
    who = f"rank {shard.rank} of {shard.world_size}: " if shard.world_size > 1 else ""
    if shard.main:
        results.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(results)
        merged = merge_partials(results, plan.order)  # an interrupted data-parallel run's answers
        if merged:
            log(f"merged {merged} records of an interrupted run's ranks into {results}")
    shard.barrier()
    done = {record_key(r) for r in read_records(results)}
    todo = [(data, cond, s) for data, samples in samples_by_data.items() for cond in conds
            for i, s in enumerate(samples) if shard.owns(i) and (data, str(s.id), cond.method, cond.budget) not in done]
    target = results if shard.world_size == 1 else partial_path(results, shard.rank)
    _drop_partial_line(target)
    log(f"{who}{len(done)} records already in {results}; {len(todo)} answers to compute")
    _answer(model, processor, todo, target, plan, batch_size, _progress(len(todo), progress and shard.main))
    shard.barrier()
    if shard.main and shard.world_size > 1:
        log(f"merged {merge_partials(results, plan.order)} records of {shard.world_size} ranks into {results}")
    shard.barrier()
    return read_records(results)


def _answer(model, processor, todo: list, path: Path, plan: RunPlan, batch_size: int, bar) -> None:
    """Generate the answers of ``todo`` ((data set, condition, sample) triples) in batches and append their
    records to ``path``, flushed after each batch."""
    from vtprune.eval.scorer import score
    from vtprune.inputs import build_batch

    with path.open("a") as out:
        for data, cond, chunk in _chunks(todo, batch_size):
            images = [s.load_image() for s in chunk]
            inputs = build_batch(processor, images, [s.question for s in chunk], device=model.device, dtype=model.dtype)
            new = plan.per_data[data]["max_new_tokens"]
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
                          **({"fields": fields} if fields is not None else {}), **_accounting(report["samples"][i]),
                          "settings": plan.settings(data, str(sample.id))}
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(chunk))
    bar.close()


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that options compare with a record's."""
    return json.loads(json.dumps(value))


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else repr(value)


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
