"""``vtprune eval``: accuracy of methods x budgets on data sets (resumable; tables + plots; data-parallel
under ``torchrun``). User guide: docs/evaluation-runner.md."""

from __future__ import annotations

import argparse
import datetime
import itertools
from pathlib import Path

from vtprune.cli.common import (
    UsageError,
    add_model_arguments,
    budget_list,
    load_from_args,
    log,
    method_list,
    one_line,
    parse_list,
    quiet,
    user_errors,
)
from vtprune.eval.datasets.registry import DATASETS
from vtprune.inputs import default_device, is_default_model, model_identity, resolve_dtype

DEFAULT_EVAL_METHODS = ("parvts", "st3", "fastv", "vtw", "pdrop", "visionzip", "random", "pool")
DEFAULT_EVAL_BUDGETS = ("50%", "25%", "12.5%", "6.25%")


def add_parser(sub) -> None:
    """The ``eval`` subcommand's arguments."""
    e = sub.add_parser("eval", help="accuracy of methods x budgets on a data set (resumable; tables + plots)",
                       description="Answer every sample of the data sets under the unpruned model and every "
                                   "method x budget; append one JSON line per answer to OUT/results.jsonl (a rerun "
                                   "with the same settings skips what is done; one with other settings is refused) "
                                   "and write results.csv, results.md and two plots. Under torchrun "
                                   "--nproc_per_node N, each process answers every N-th sample and the first "
                                   "merges them (docs/evaluation-runner.md).")
    e.add_argument("--data", type=parse_list(str), default=None,
                   help=f"comma-separated data sets ({', '.join(sorted(DATASETS))}); required unless --tables-only")
    e.add_argument("--split", default="test", help="data split (default test)")
    e.add_argument("--methods", type=method_list, default=list(DEFAULT_EVAL_METHODS),
                   help=f"comma-separated method specs (default {','.join(DEFAULT_EVAL_METHODS)}), each optionally "
                        "with fixed options after colons and its own budget after @ (visionzip:contextual=0, "
                        "st3@default); the unpruned model always runs")
    e.add_argument("--budgets", type=budget_list, default=list(DEFAULT_EVAL_BUDGETS),
                   help="comma-separated budgets: visual tokens per image (64), a percentage of them (12.5%%) or "
                        f"'default' (default {','.join(DEFAULT_EVAL_BUDGETS).replace('%', '%%')})")
    add_model_arguments(e)
    e.add_argument("--limit", type=int, default=None, help="first N samples of each data set")
    e.add_argument("--kinds", type=parse_list(str), default=None,
                   help="comma-separated question kinds: of the first N samples, answer only these (scenes: "
                        "subject, background, periphery); the records pair with a run without --kinds")
    e.add_argument("--batch", type=int, default=8, help="samples per generate call (default 8)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens per answer (default: each data set's own: 8 for short answers, 40 for captions)")
    e.add_argument("--seed", type=int, default=0, help="seed of the data sets' random choices (default 0)")
    e.add_argument("--out", default=None, help="output folder (default eval-results/<data>-<model>/)")
    e.add_argument("--beside", action="store_true",
                   help="when --out holds answers of other settings (model, dtype, tokens, data set version, "
                        "method options), write into the first of OUT-2, OUT-3, ... that holds this run's "
                        "settings or nothing, instead of stopping")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    e.add_argument("--tables-only", action="store_true",
                   help="answer nothing: rewrite the tables and plots of --out from every record in its "
                        "results.jsonl (only --data's sets when given)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """``vtprune eval``: check everything cheap first, then load the model, run, write, print."""
    from vtprune.api import check
    from vtprune.eval import datasets, parallel, runner

    if args.tables_only:
        return _tables_only(args)
    if not args.data:
        raise UsageError("--data is required (one or more data sets), unless --tables-only")
    for flag, value, lo in (("--batch", args.batch, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                            ("--limit", args.limit, 0)):
        if value is not None and value < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {value}")
    with user_errors(ValueError):
        conds = runner.conditions(args.methods, args.budgets)
    with user_errors(ValueError, FileNotFoundError):
        samples = {name: datasets.load_dataset(name, args.split, args.limit, seed=args.seed) for name in args.data}
    for name, s in samples.items():
        if not s:
            raise UsageError(f"data set {name!r} ({args.split}) has no samples")
    if args.kinds:
        samples = _of_kinds(samples, args.kinds)
    with user_errors(ValueError):
        shard = parallel.shard_from_env()
        args.device = parallel.rank_device(shard, args.device or default_device())
    with user_errors(ImportError, OSError):
        identity = model_identity(args.model, resolve_dtype(args.dtype, args.device))
    settings = runner.RunSettings(model=str(identity["model"]), dtype=str(identity["dtype"]),
                                  model_revision=identity["model_revision"],
                                  data={name: (args.split, args.seed) for name in samples})
    with user_errors(ValueError, TypeError, FileNotFoundError):
        plan = runner.RunPlan(settings, samples, conds, args.max_new_tokens)
    out = _output_folder(args, plan)
    model, processor = load_from_args(args)
    with quiet(), user_errors(ValueError, TypeError), parallel.process_group(shard):
        for cond in conds:  # every option against this model, before the first answer
            check(model, cond.name, **dict(cond.options))
        records = runner.run_eval(model, processor, samples, conds, out / "results.jsonl", batch_size=args.batch,
                                  max_new_tokens=args.max_new_tokens, progress=not args.no_progress, log=log,
                                  settings=settings, shard=shard)
    if not shard.main:
        return 0  # rank 0 writes the tables of the merged records
    records = [r for r in records if r["data"] in samples]
    (out / "command.txt").write_text(f"{datetime.date.today()}  vtprune {' '.join(getattr(args, 'argv', []))}\n")
    return _write_tables(records, out, plots=not args.no_plots)


def _of_kinds(samples: dict, kinds: list[str]) -> dict:
    """The samples of each data set whose ``kind`` is one of ``kinds``, in their order.

    Raises:
        UsageError: a kind that no sample of these data sets has (naming the kinds they have), or a data
            set left with no sample.
    """
    present = sorted({s.kind for v in samples.values() for s in v})
    unknown = [k for k in kinds if k not in present]
    if unknown:
        raise UsageError(f"--kinds {','.join(unknown)}: no sample of {', '.join(samples)} has that kind; "
                         f"the kinds present are {', '.join(present)}")
    out = {name: [s for s in v if s.kind in kinds] for name, v in samples.items()}
    for name, v in out.items():
        if not v:
            raise UsageError(f"data set {name!r} has no sample of the kinds {', '.join(kinds)}; drop it from "
                             f"--data or add one of its kinds ({', '.join(sorted({s.kind for s in samples[name]}))})")
    return out


def _output_folder(args: argparse.Namespace, plan) -> Path:
    """``--out`` (default ``eval-results/<data>-<model>``) if it holds no answers or only answers of this run's
    settings (:func:`vtprune.eval.runner.check_resume`); otherwise, with ``--beside``, the first of ``OUT-2``,
    ``OUT-3``, ... that does. Raises UsageError (without ``--beside``) naming what differs and what to do."""
    from vtprune.eval import runner

    label = "default" if is_default_model(args.model) else Path(args.model).name
    base = Path(args.out) if args.out else Path("eval-results") / f"{'+'.join(args.data)}-{label}"
    siblings = (base.with_name(f"{base.name}-{n}") for n in itertools.count(2))
    for out in itertools.chain([base], siblings if args.beside else []):
        try:
            runner.check_resume(out / "results.jsonl", plan)
        except runner.ResumeError as e:
            if not args.beside:
                raise UsageError(f"{one_line(e)}. Write this run elsewhere: another --out, or add --beside to write "
                                 f"into the first of {base}-2, {base}-3, ... that holds this run's settings or "
                                 "nothing" + ("; or table the old records as they are with --tables-only"
                                              if e.unrecorded and not e.differences else "")) from e
            continue
        if out != base:
            log(f"{base} holds answers of other settings; writing beside it, in {out}")
        return out
    raise AssertionError("unreachable: a folder without results.jsonl always matches")


def _tables_only(args: argparse.Namespace) -> int:
    """``vtprune eval --tables-only``: the tables and plots of every record already in ``--out``."""
    from vtprune.eval import runner

    if not args.out:
        raise UsageError("--tables-only needs --out, the folder that holds results.jsonl")
    path = Path(args.out) / "results.jsonl"
    records = runner.read_records(path)
    parts = runner.partial_paths(path)
    if parts:
        log(f"warning: {', '.join(p.name for p in parts)} beside {path} hold the answers of an interrupted "
            "data-parallel run, not tabled here: rerun the same eval to merge them")
    if args.data:
        records = [r for r in records if r["data"] in args.data]
    if not records:
        raise UsageError(f"no records{' of ' + ','.join(args.data) if args.data else ''} in {path}")
    return _write_tables(records, Path(args.out), plots=not args.no_plots)


def _write_tables(records: list[dict], out: Path, plots: bool) -> int:
    from vtprune.eval import tables

    paths = tables.write_all(records, out, plots=plots)
    print(tables.markdown(tables.summarize(records)))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
