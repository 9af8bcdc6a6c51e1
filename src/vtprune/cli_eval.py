"""``vtprune eval`` (accuracy of methods x budgets on a data set, resumable) and its siblings that
read data sets: ``vtprune calibrate`` and ``vtprune show``. Thin: parse, call :mod:`vtprune.eval`,
print. Registered by :func:`vtprune.cli.build_parser`."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from vtprune.cli import (
    DTYPES,
    UsageError,
    _log,
    _quiet,
    method_options,
    parse_list,
    parse_option,
    user_errors,
)
from vtprune.engine.run import check
from vtprune.inputs import default_device, is_default_model, load_model, resolve_dtype

DEFAULT_EVAL_METHODS = ("parvts", "st3", "fastv", "vtw", "pdrop", "visionzip", "random", "pool")
DEFAULT_EVAL_BUDGETS = ("50%", "25%", "12.5%", "6.25%")


def add_parsers(sub) -> None:
    """Add the ``eval`` subcommand (and the other data-set commands) to the CLI's subparsers."""
    e = sub.add_parser("eval", help="accuracy of methods x budgets on a data set (resumable; tables + plots)",
                       description="Answer every sample of the data sets under the unpruned model and every "
                                   "method x budget; append one JSON line per answer to OUT/results.jsonl (a rerun "
                                   "skips what is done) and write results.csv, results.md and two plots.")
    e.add_argument("--data", type=parse_list(str), default=None,
                   help="comma-separated data sets (see vtprune.eval.DATASETS: imagenet-pope, scenes, easy-vqa, "
                        "pope-coco); required unless --tables-only")
    e.add_argument("--split", default="test", help="data split (default test)")
    e.add_argument("--methods", type=parse_list(str), default=list(DEFAULT_EVAL_METHODS),
                   help=f"comma-separated methods (default {','.join(DEFAULT_EVAL_METHODS)}); the unpruned model "
                        "always runs")
    e.add_argument("--budgets", type=parse_list(str), default=list(DEFAULT_EVAL_BUDGETS),
                   help="comma-separated budgets: visual tokens per image (64), a percentage of them (12.5%%) or "
                        f"'default' (default {','.join(DEFAULT_EVAL_BUDGETS)})")
    e.add_argument("--model", default=None, help="local path or HF id (default: the bundled small model)")
    e.add_argument("--limit", type=int, default=None, help="first N samples of each data set")
    e.add_argument("--batch", type=int, default=8, help="samples per generate call (default 8)")
    e.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per answer (default 8)")
    e.add_argument("--seed", type=int, default=0, help="seed of the data sets' random choices (default 0)")
    e.add_argument("--out", default=None, help="output folder (default eval-results/<data>-<model>/)")
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    e.add_argument("--tables-only", action="store_true",
                   help="answer nothing: rewrite the tables and plots of --out from every record in its "
                        "results.jsonl (only --data's sets when given)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    e.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on CPU, bfloat16 on GPU")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="sweep ParVTS's discard layer / VTW's withdrawal layer by first-token KL",
                       description="Run a few samples under every layer (and ParVTS fusion), compare the first "
                                   "answer token's distribution with the unpruned model's, and pick the smallest "
                                   "layer whose mean KL divergence stays within --threshold.")
    c.add_argument("--method", choices=("parvts", "vtw"), required=True)
    c.add_argument("--samples", type=int, default=16, help="samples to calibrate on (default 16)")
    c.add_argument("--data", default="imagenet-pope", help="data set the samples come from (default imagenet-pope)")
    c.add_argument("--split", default="test", help="data split (default test)")
    c.add_argument("--threshold", type=float, default=0.05, help="mean KL threshold in nats (default 0.05)")
    c.add_argument("--layers", type=parse_list(int), default=None, help="layers to try (default 1 .. L-1)")
    c.add_argument("--budget", type=int, default=None, help="parvts: subject tokens per image")
    c.add_argument("--keep-ratio", type=float, default=None, help="parvts: subject fraction (default 0.25)")
    c.add_argument("--fusion", type=parse_list(str), default=None,
                   help="parvts: fusion options to sweep (default attention_mass,fixed,size)")
    c.add_argument("--model", default=None, help="local path or HF id (default: the bundled small model)")
    c.add_argument("--batch", type=int, default=8, help="samples per generate call (default 8)")
    c.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    c.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on CPU, bfloat16 on GPU")
    c.set_defaults(func=cmd_calibrate)

    w = sub.add_parser("show", help="draw the image with the visual tokens a method kept (per layer / ParVTS groups)")
    w.add_argument("--image", required=True, help="image file")
    w.add_argument("--prompt", required=True, help="the question")
    w.add_argument("--method", default="parvts", help="method name (default parvts)")
    w.add_argument("--budget", type=int, default=None, help="visual tokens kept per image")
    w.add_argument("--keep-ratio", type=float, default=None, help="fraction of visual tokens kept per image")
    w.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="another method option (repeatable)")
    w.add_argument("--out", default="vtprune-show.png", help="PNG to write (default vtprune-show.png)")
    w.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens of the answer (default 8)")
    w.add_argument("--model", default=None, help="local path or HF id (default: the bundled small model)")
    w.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    w.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on CPU, bfloat16 on GPU")
    w.set_defaults(func=cmd_show)


def cmd_eval(args: argparse.Namespace) -> int:
    """``vtprune eval``: check everything cheap first, then load the model, run, write, print."""
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
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    label = "default" if is_default_model(args.model) else Path(args.model).name
    out = Path(args.out) if args.out else Path("eval-results") / f"{'+'.join(args.data)}-{label}"
    _log(f"loading {args.model or 'the bundled model'} ({str(dtype).removeprefix('torch.')}, {device})")
    with _quiet(False), user_errors():
        model, processor = load_model(args.model, dtype, device)
    with _quiet(False), user_errors(ValueError, TypeError):
        for cond in conds:  # every option against this model, before the first answer
            check(model, cond.name, **dict(cond.options))
        records = runner.run_eval(model, processor, samples, conds, out / "results.jsonl", batch_size=args.batch,
                                  max_new_tokens=args.max_new_tokens, progress=not args.no_progress, log=_log)
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
    _log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``vtprune calibrate``: load samples and the model, sweep, print the table and the choice."""
    from vtprune.adapters import adapter_for
    from vtprune.eval import calibrate, datasets
    from vtprune.inputs import build_batch

    if args.samples < 1 or args.batch < 1:
        raise UsageError(f"--samples and --batch must be >= 1, got {args.samples} and {args.batch}")
    fixed = {}
    if args.method == "vtw" and (args.budget is not None or args.keep_ratio is not None or args.fusion):
        raise UsageError("vtw withdraws every visual token: --budget, --keep-ratio and --fusion are parvts options")
    if args.budget is not None:
        fixed["budget"] = args.budget
    if args.keep_ratio is not None:
        fixed["keep_ratio"] = args.keep_ratio
    with user_errors(ValueError, FileNotFoundError):
        samples = datasets.load_dataset(args.data, args.split, args.samples)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    _log(f"loading {args.model or 'the bundled model'} ({str(dtype).removeprefix('torch.')}, {device})")
    with _quiet(False), user_errors():
        model, processor = load_model(args.model, dtype, device)
    layers = adapter_for(model).text_config.num_hidden_layers
    settings = []
    for fusion in args.fusion or [None]:
        extra = dict(fixed, **({"fusion": fusion} if fusion else {}))
        settings += calibrate.sweep_settings(args.method, layers, args.layers, extra)
    batches = [build_batch(processor, [s.load_image() for s in samples[i:i + args.batch]],
                           [s.question for s in samples[i:i + args.batch]], device=model.device, dtype=model.dtype)
               for i in range(0, len(samples), args.batch)]
    _log(f"{len(settings)} settings x {len(samples)} samples of {args.data}")
    with _quiet(False), user_errors(ValueError, TypeError):
        rows, chosen = calibrate.calibrate(model, batches, args.method, settings, args.threshold, log=_log)
    print(calibrate.markdown(rows, chosen, args.threshold))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``vtprune show``: generate once under the method, then draw the kept tokens over the image."""
    import vtprune
    from vtprune.eval import show
    from vtprune.inputs import build_inputs, load_image

    options = method_options(args.budget, args.keep_ratio, args.option)
    with user_errors(ValueError, TypeError):
        vtprune.make_method(args.method, **options)
    with user_errors():
        image = load_image(args.image)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    with _quiet(False), user_errors():
        model, processor = load_model(args.model, dtype, device)
        inputs = build_inputs(processor, image, args.prompt, device=model.device, dtype=model.dtype)
    with user_errors(ValueError, TypeError):
        run = vtprune.apply(model, args.method, **options)
    with run:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    kept = run.kept_visual()
    grid = run.gen.visual_grid  # what the engine got from the adapter for this call
    if grid is None:
        raise UsageError(f"show draws token grids; the visual tokens of {type(model).__name__} do not form one grid")
    parvts = run.method.name == "parvts" and run.method.keep < run.gen.n_visual
    title = f"{args.method} {options or ''}: {args.prompt!r} -> {answer!r}"
    with user_errors(ImportError):
        path = show.draw(show.model_image(inputs["pixel_values"], processor), grid, kept, args.out, title,
                         subject=kept[-1] if parvts else None,
                         discard_layer=run.method.discard_layer if parvts else None)
    print(f"{answer}\nwrote {path}")
    return 0
