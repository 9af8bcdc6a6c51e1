"""Command-line interface: ``vtprune generate`` (one image + one prompt through a method),
``vtprune bench`` (latency / memory of methods x budgets against the unpruned model, :mod:`vtprune.bench`)
and the data-set commands of :mod:`vtprune.cli_eval` (``eval``, ``calibrate``, ``show``).

Thin by design (see ARCHITECTURE.md, layer 1): it parses arguments, calls the library
(:func:`vtprune.apply`, :mod:`vtprune.models`) and prints. The reusable steps (load a model, build the
inputs of one image + prompt, run one greedy generation under a method, flatten its report) are small
functions here that a later ``eval`` / ``bench`` command can share.

Exit codes: 0 on success; 2 on bad input (argparse errors, missing image, unknown method or option,
option value out of range, model that cannot be loaded), with one ``vtprune: error: ...`` line on
stderr. Errors raised while generating are not bad input and keep their traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vtprune.inputs import (
    build_inputs,
    default_device,
    is_default_model,
    load_image,
    load_model,
    resolve_dtype,
)
from vtprune.methods import parse_option as methods_parse_option
from vtprune.methods import parse_value

__all__ = ["main", "parse_value", "build_inputs", "default_device", "is_default_model", "load_image", "load_model",
           "resolve_dtype"]

PROG = "vtprune"
DTYPES = ("float32", "bfloat16", "float16")
WARMUP_NEW_TOKENS = 2  # new tokens of each warm-up generation (tokens)


class UsageError(Exception):
    """Bad user input; :func:`main` prints it as one line on stderr and exits with code 2."""


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Turn the library's input errors (by default ValueError, TypeError, FileNotFoundError,
    ImportError, OSError) raised inside the block into :class:`UsageError`."""
    caught: tuple[type[BaseException], ...] = types or (ValueError, TypeError, FileNotFoundError, ImportError, OSError)
    try:
        yield
    except caught as e:
        raise UsageError(_one_line(e)) from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------- parsing
def parse_option(text: str) -> tuple[str, bool | int | float | str | list]:
    """``--option KEY=VALUE`` as ``(key, value)`` (:func:`vtprune.methods.parse_option`).

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty / non-identifier key.
    """
    try:
        return methods_parse_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def method_options(budget: int | None, keep_ratio: float | None,
                   extra: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """Collect the method options from ``--budget`` (visual tokens per image), ``--keep-ratio`` and the
    ``--option KEY=VALUE`` pairs.

    Raises:
        UsageError: a key given twice (e.g. ``--budget`` and ``--option budget=...``).
    """
    options: dict[str, Any] = {}
    if budget is not None:
        options["budget"] = budget
    if keep_ratio is not None:
        options["keep_ratio"] = keep_ratio
    for key, value in extra or []:
        if key in options:
            raise UsageError(f"option {key!r} given more than once")
        options[key] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``vtprune`` command and its subcommands."""
    import vtprune

    parser = argparse.ArgumentParser(prog=PROG, description="Visual token scheduling for HuggingFace multimodal LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {vtprune.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="answer one prompt about one image under a method",
                       description="Answer one prompt about one image with greedy decoding under a visual-token "
                                   "method; print the answer, the visual tokens kept, FLOPs, KV-cache and timings.")
    g.add_argument("--image", required=True, help="image file")
    g.add_argument("--prompt", required=True, help="question / instruction about the image")
    g.add_argument("--model", default=None,
                   help="local path or HuggingFace id (loaded from the local cache when offline); "
                        "default: the bundled model")
    g.add_argument("--method", default="parvts", help=f"method name (default parvts); one of {', '.join(vtprune.METHODS)}")
    amount = g.add_mutually_exclusive_group()
    amount.add_argument("--budget", type=int, default=None, help="visual tokens kept per image (tokens)")
    amount.add_argument("--keep-ratio", type=float, default=None, help="fraction of visual tokens kept per image")
    g.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                   help="any other method option, repeatable; VALUE is parsed as int, float, true/false or string "
                        "(e.g. --option discard_layer=4 --option fusion=fixed)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="new tokens to generate, greedy (default 32)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype (default float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--device", default=None, help='device (default "cuda" if available, else "cpu")')
    g.add_argument("--compare", action="store_true",
                   help="also run the unpruned model (method none) on the same input and print the speedups")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help=f"run a {WARMUP_NEW_TOKENS}-token generation under each method first so one-time overhead "
                        "does not enter the timings (default: on with --compare, off otherwise)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (logs go to stderr)")
    g.set_defaults(func=cmd_generate)
    add_bench_parser(sub)
    from vtprune import cli_eval

    cli_eval.add_parsers(sub)
    return parser


def parse_list(cast):
    """An argparse type: a comma-separated list of ``cast`` values (``"192,128,64"`` -> ``[192, 128, 64]``)."""
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [cast(t) for t in items]
        except ValueError:
            kind = "int or 'default'" if cast.__name__ == "_budget" else cast.__name__
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}") from None
    return parse


def _budget(text: str) -> int | str:
    """A ``--budgets`` item: an int (visual tokens per image) or ``default``."""
    return "default" if text.lower() == "default" else int(text)


def add_bench_parser(sub) -> None:
    """The ``bench`` subcommand's arguments (defaults from :class:`vtprune.bench.BenchSpec`)."""
    from vtprune.bench.archs import ARCHS, ATTENTION
    from vtprune.bench.runner import DEFAULT_BUDGETS, DEFAULT_METHODS

    b = sub.add_parser("bench", help="latency / memory of methods x budgets against the unpruned model",
                       description="Benchmark visual-token methods x budgets against the unpruned model in one "
                                   "process on synthetic inputs: TTFT, decode ms/token, end-to-end ms, tokens/s, "
                                   "peak memory, KV bytes, with FLOPs-ideal and roofline-ideal speedups beside the "
                                   "measured ones. Writes JSON + Markdown + PNG under --out and prints the Markdown.")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="local path or HuggingFace id; default: the bundled model")
    src.add_argument("--arch", default=None,
                     help=f"build this architecture with random weights (no download): {', '.join(ARCHS)}")
    b.add_argument("--methods", type=parse_list(str), default=list(DEFAULT_METHODS),
                   help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}), each optionally with fixed "
                        "options after colons (st3:anneal_every=4); the stock model always runs")
    b.add_argument("--budgets", type=parse_list(_budget), default=list(DEFAULT_BUDGETS),
                   help="comma-separated visual tokens kept per image, or 'default' for each method's own defaults "
                        f"(default {','.join(map(str, DEFAULT_BUDGETS))})")
    b.add_argument("--batch", type=int, default=1, help="batch size B, identical rows (default 1)")
    b.add_argument("--prompt-tokens", type=int, default=60, help="text tokens around the image (default 60)")
    b.add_argument("--new-tokens", type=int, default=16, help="new tokens per generation, exactly (default 16)")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="default float32 on CPU, bfloat16 on GPU")
    b.add_argument("--attn", choices=ATTENTION, default="sdpa",
                   help="attention implementation (default sdpa); flash_attention_2 needs flash_attn and a CUDA device, "
                        "and runs ParVTS's packed two-path layers with SDPA")
    b.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    b.add_argument("--device", default=None, help='device (default "cuda" if available, else "cpu")')
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--matmul-size", type=int, default=None,
                   help="side of the square matmul measuring the matrix rate (default 2048 CPU, 8192 GPU)")
    b.add_argument("--copy-mb", type=int, default=None,
                   help="MiB copied to measure the memory bandwidth (default 256 CPU, 2048 GPU)")
    b.add_argument("--out", default=None,
                   help="output directory (default benchmarks/results/<date>-<host>-bench-<arch or model>/)")
    b.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------------------------------- library calls
def generate_once(model, processor, inputs, method: str = "none", options: dict[str, Any] | None = None,
                  max_new_tokens: int = 32) -> tuple[str, dict]:
    """Run one greedy generation under ``method`` and return ``(answer, report)``.

    ``answer`` is the decoded new text (special tokens skipped, whitespace stripped) of the first
    sample; ``report`` is :meth:`vtprune.Run.report` (visual tokens per layer, equivalent budget,
    FLOPs, KV bytes, timings in ms).

    Raises:
        UsageError: unknown method / option or an option value out of range for this model.
    """
    import vtprune

    with user_errors(ValueError, TypeError):
        run = vtprune.apply(model, method, **(options or {}))
    with run:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    answer = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    return answer, run.report()


def flatten_report(report: dict) -> dict:
    """One sample's report as a flat dict: ``method``, ``options``, then the first sample's fields
    (``visual_tokens_in``, ``prompt_tokens``, ``visual_tokens_per_layer_prefill``,
    ``visual_tokens_per_layer_last_decode``, ``equivalent_budget``, ``final_budget``, ``flops``),
    ``kv_cache`` (bytes measured on the cache tensors vs unpruned) and ``timing`` (ms)."""
    out = {"method": report["method"], "options": report["options"]}
    sample = dict(report["samples"][0]) if report.get("samples") else {}
    sample.pop("kv_cache", None)  # the measured one below; for one sample the two agree
    out.update(sample)
    out["kv_cache"] = report["kv_cache"]
    out["timing"] = report["timing"]
    return out


def speedups(pruned_timing: dict, baseline_timing: dict) -> dict:
    """Speedups of the pruned run over the unpruned one (unpruned ms / pruned ms; None when unknown):
    ``end_to_end``, ``prefill``, ``decode_per_token``."""
    def ratio(key):
        a, b = baseline_timing.get(key), pruned_timing.get(key)
        return a / b if a is not None and b else None
    return {"end_to_end": ratio("end_to_end_ms"), "prefill": ratio("prefill_ms"),
            "decode_per_token": ratio("decode_ms_per_token")}


# ---------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """``vtprune generate``: validate the input, load the model, generate, print. Returns 0."""
    import vtprune

    options = method_options(args.budget, args.keep_ratio, args.option)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    with user_errors(ValueError, TypeError):  # unknown method / option, before the slow model load
        method = vtprune.make_method(args.method, **options)
    with user_errors():
        image = load_image(args.image)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)

    _log(f"loading {args.model or 'the bundled model'} ({str(dtype).removeprefix('torch.')}, {device})")
    with _quiet(args.json), user_errors():
        model, processor = load_model(args.model, dtype, device)
    with _quiet(args.json), user_errors(ValueError, TypeError):
        inputs = build_inputs(processor, image, args.prompt, device=model.device, dtype=model.dtype)

    warmup = args.compare if args.warmup is None else args.warmup
    methods = [(method.name, options)] + ([("none", {})] if args.compare else [])
    with _quiet(args.json):
        if warmup:
            for name, opts in methods:
                _log(f"warm-up ({name})")
                generate_once(model, processor, inputs, name, opts, WARMUP_NEW_TOKENS)
        results = []
        for name, opts in methods:
            _log(f"generating ({name})")
            results.append(generate_once(model, processor, inputs, name, opts, args.max_new_tokens))

    answer, report = results[0]
    result = {"answer": answer, "prompt": args.prompt, "image": str(args.image),
              "model": args.model or _default_model_id(), **flatten_report(report)}
    if args.compare:
        base_answer, base_report = results[1]
        result["baseline"] = {"answer": base_answer, **flatten_report(base_report)}
        result["speedup"] = speedups(report["timing"], base_report["timing"])
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result)
    return 0


# ---------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """``vtprune bench``: validate, build or load the model, run :func:`vtprune.bench.run_bench`, write
    the JSON / Markdown / PNG and print the Markdown. Returns 0."""
    import torch

    from vtprune.bench import archs, report, runner

    spec = runner.BenchSpec(methods=tuple(args.methods), budgets=tuple(args.budgets), batch=args.batch,
                            prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                            warmup=args.warmup, seed=args.seed, matmul_size=args.matmul_size,
                            copy_bytes=args.copy_mb << 20 if args.copy_mb else None)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    with user_errors(ValueError):
        spec.validate()
        runner.check_methods(spec.methods)
        archs.check_attention(args.attn, device, dtype)  # before building or loading anything
        if args.arch:  # check budgets against the architecture before allocating it
            cfg = archs.arch_config(args.arch)
            runner.plan_cases(spec.methods, spec.budgets, archs.image_tokens(cfg), cfg.text_config.num_hidden_layers)
    if args.threads:
        torch.set_num_threads(args.threads)
    label = args.arch or (Path(args.model).name if args.model and not is_default_model(args.model)
                          else _default_model_id().split("/")[-1])
    _log(f"{'building' if args.arch else 'loading'} {label} ({str(dtype).removeprefix('torch.')}, {device}, {args.attn})")
    with _quiet(False), user_errors():
        if args.arch:
            model = archs.build_model(args.arch, dtype, device, args.attn, args.seed)
        else:
            model, _ = load_model(args.model, dtype, device)
            model.config.text_config._attn_implementation = args.attn
    command = " ".join(["vtprune", *getattr(args, "argv", [])])
    with _quiet(False), user_errors(ValueError):
        result = runner.run_bench(model, spec, label=label, log=_log,
                                  meta={"command": command, "source": "arch" if args.arch else "model"})
    out_dir = Path(args.out) if args.out else runner.default_out_dir(label)
    paths = report.write_results(result, out_dir)
    print(report.markdown(result))
    _log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _default_model_id() -> str:
    from vtprune.models import DEFAULT_MODEL_ID

    return DEFAULT_MODEL_ID


# ---------------------------------------------------------------------------------------- output
def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet(json_mode: bool) -> Iterator[None]:
    """Silence Python warnings inside the block and, in ``--json`` mode, send anything the libraries
    print on stdout to stderr, so stdout holds only the JSON object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if json_mode:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            yield


def _fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if v is not None) or "-"


def _fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt_x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the human-readable summary of one flattened result."""
    f, kv, t = result.get("flops", {}), result["kv_cache"], result["timing"]
    pre = f.get("prefill", {})
    rows = [
        ("method", f"{result['method']} ({_fmt_options(result['options'])})"),
        ("visual tokens / image", f"{result.get('visual_tokens_in', '-')} in -> "
                                  f"{result.get('equivalent_budget', float('nan')):.1f} equivalent -> "
                                  f"{result.get('final_budget', '-')} final"),
        ("FLOPs ratio (FastV)", f"prefill {pre.get('fastv_ratio', float('nan')):.3f}, "
                                f"total {f.get('total_fastv_ratio', float('nan')):.3f}"),
        ("FLOPs ratio (exact)", f"prefill {pre.get('exact_ratio', float('nan')):.3f}"),
        ("KV cache", f"{kv['bytes']:,} / {kv['bytes_unpruned']:,} bytes (ratio {kv['ratio']:.3f})"),
        ("timing (ms)", f"prefill {_fmt_ms(t.get('prefill_ms'))}, decode {_fmt_ms(t.get('decode_ms_per_token'))}"
                        f" / token, end-to-end {_fmt_ms(t.get('end_to_end_ms'))} "
                        f"({t.get('new_tokens')} new tokens, {t.get('device')})"),
    ]
    return rows


def print_human(result: dict) -> None:
    """Print a result of ``generate`` for people (with ``rich`` when it is installed)."""
    sections = [(f"{result['method']}", result)]
    if "baseline" in result:
        sections.append(("none (unpruned)", result["baseline"]))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is None:
        for title, r in sections:
            print(f"== {title}\nanswer: {r['answer']}")
            for label, value in summary_rows(r):
                print(f"  {label:<22} {value}")
        if "speedup" in result:
            s = result["speedup"]
            print(f"speedup (unpruned ms / pruned ms): end-to-end {_fmt_x(s['end_to_end'])}, "
                  f"prefill {_fmt_x(s['prefill'])}, decode/token {_fmt_x(s['decode_per_token'])}")
        return
    console = Console(highlight=False)
    for title, r in sections:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("answer", r["answer"], style="green")
        for label, value in summary_rows(r):
            table.add_row(label, value)
        console.print(table)
    if "speedup" in result:
        s = result["speedup"]
        console.print(f"[bold]speedup[/bold] (unpruned ms / pruned ms): end-to-end {_fmt_x(s['end_to_end'])}, "
                      f"prefill {_fmt_x(s['prefill'])}, decode/token {_fmt_x(s['decode_per_token'])}")


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vtprune`` command. Returns the exit code (0 ok, 2 bad input; argparse's
    own exits, ``--help`` included, are returned as their code)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    _silence_transformers()
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _silence_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
