"""``vtprune eval``: accuracy of methods x budgets on data sets (resumable; tables + plots)."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from vtprune.cli.common import (
    UsageError,
    add_model_arguments,
    budget_list,
    load_from_args,
    log,
    method_list,
    parse_list,
    quiet,
    user_errors,
)
from vtprune.eval.datasets.registry import DATASETS
from vtprune.inputs import is_default_model

DEFAULT_EVAL_METHODS = ("parvts", "st3", "fastv", "vtw", "pdrop", "visionzip", "random", "pool")
DEFAULT_EVAL_BUDGETS = ("50%", "25%", "12.5%", "6.25%")


def add_parser(sub) -> None:
    """The ``eval`` subcommand's arguments."""
    e = sub.add_parser("eval", help="accuracy of methods x budgets on a data set (resumable; tables + plots)",
                       description="Answer every sample of the data sets under the unpruned model and every "
                                   "method x budget; append one JSON line per answer to OUT/results.jsonl (a rerun "
                                   "skips what is done) and write results.csv, results.md and two plots.")
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
    e.add_argument("--batch", type=int, default=8, help="samples per generate call (default 8)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens per answer (default: each data set's own: 8 for short answers, 40 for captions)")
    e.add_argument("--seed", type=int, default=0, help="seed of the data sets' random choices (default 0)")
    e.add_argument("--out", default=None, help="output folder (default eval-results/<data>-<model>/)")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    e.add_argument("--tables-only", action="store_true",
                   help="answer nothing: rewrite the tables and plots of --out from every record in its "
                        "results.jsonl (only --data's sets when given)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """``vtprune eval``: check everything cheap first, then load the model, run, write, print."""
    from vtprune.api import check
    from vtprune.eval import datasets, runner

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
    label = "default" if is_default_model(args.model) else Path(args.model).name
    out = Path(args.out) if args.out else Path("eval-results") / f"{'+'.join(args.data)}-{label}"
    model, processor = load_from_args(args)
    with quiet(), user_errors(ValueError, TypeError):
        for cond in conds:  # every option against this model, before the first answer
            check(model, cond.name, **dict(cond.options))
        records = runner.run_eval(model, processor, samples, conds, out / "results.jsonl", batch_size=args.batch,
                                  max_new_tokens=args.max_new_tokens, progress=not args.no_progress, log=log)
    records = [r for r in records if r["data"] in samples]
    (out / "command.txt").write_text(f"{datetime.date.today()}  vtprune {' '.join(getattr(args, 'argv', []))}\n")
    return _write_tables(records, out, plots=not args.no_plots)


def _tables_only(args: argparse.Namespace) -> int:
    """``vtprune eval --tables-only``: the tables and plots of every record already in ``--out``."""
    from vtprune.eval import runner

    if not args.out:
        raise UsageError("--tables-only needs --out, the folder that holds results.jsonl")
    path = Path(args.out) / "results.jsonl"
    records = runner.read_records(path)
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
