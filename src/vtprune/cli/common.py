"""What every command shares: the model / device / dtype arguments, method options, errors, logging.

Exit codes: 0 on success; 2 on bad input (argparse errors, missing image, unknown method or option,
option value out of range, model that cannot be loaded), with one ``vtprune: error: ...`` line on
stderr. Errors raised while generating are not bad input and keep their traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from vtprune.inputs import cpu_has_bf16, default_device, load_model, resolve_dtype
from vtprune.methods import parse_option as _parse_option

PROG = "vtprune"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad user input; :func:`vtprune.cli.main` prints it as one line on stderr and exits with code 2."""


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Turn the library's input errors (by default ValueError, TypeError, FileNotFoundError,
    ImportError, OSError) raised inside the block into :class:`UsageError`."""
    caught: tuple[type[BaseException], ...] = types or (ValueError, TypeError, FileNotFoundError, ImportError, OSError)
    try:
        yield
    except caught as e:
        raise UsageError(one_line(e)) from e


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def log(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet(json_mode: bool = False) -> Iterator[None]:
    """Silence Python warnings inside the block and, in ``--json`` mode, send anything the libraries
    print on stdout to stderr, so stdout holds only the JSON object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if json_mode:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        else:
            yield


# ---------------------------------------------------------------------------------------- arguments
def add_model_arguments(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """``--model`` (when ``model``), ``--device`` and ``--dtype``: declared once for every command."""
    if model:
        parser.add_argument("--model", default=None,
                            help="local path or HuggingFace id (loaded from the local cache when offline); "
                                 "default: the bundled model")
    parser.add_argument("--device", default=None, help='device (default "cuda" if available, else "cpu")')
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="parameter dtype (default bfloat16 on GPUs and on CPUs with AMX-BF16 / AVX512-BF16, "
                             "float32 on other CPUs)")


def device_and_dtype(args: argparse.Namespace):
    """``(device, torch dtype)`` from ``--device`` / ``--dtype`` (the defaults of :func:`add_model_arguments`).

    Logs a warning for an explicit ``--dtype bfloat16`` on a CPU without native bf16 (:func:`cpu_has_bf16`),
    where bf16 matrix products run about 90x slower than float32 (README, Speed: the AVX2-only VM)."""
    device = args.device or default_device()
    if args.dtype == "bfloat16" and str(device).startswith("cpu") and not cpu_has_bf16():
        log("warning: --dtype bfloat16 on a CPU that reports neither AMX-BF16 nor AVX512-BF16 (/proc/cpuinfo): "
            "its bf16 matrix products take torch's generic fallback, many times slower than float32, the "
            "default here")
    return device, resolve_dtype(args.dtype, device)


def load_from_args(args: argparse.Namespace, json_mode: bool = False):
    """Load ``(model, processor)`` named by ``--model`` on ``--device`` in ``--dtype``, logging what it
    loads. Raises UsageError for a model that cannot be loaded."""
    device, dtype = device_and_dtype(args)
    log(f"loading {args.model or 'the bundled model'} ({str(dtype).removeprefix('torch.')}, {device})")
    with quiet(json_mode), user_errors():
        return load_model(args.model, dtype, device)


def add_method_arguments(parser: argparse.ArgumentParser, default: str = "parvts") -> None:
    """``--method``, ``--budget`` / ``--keep-ratio`` and the repeatable ``--option KEY=VALUE``."""
    from vtprune.methods import METHODS

    parser.add_argument("--method", default=default, help=f"method name (default {default}); one of {', '.join(METHODS)}")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--budget", type=int, default=None, help="visual tokens kept per image (tokens)")
    amount.add_argument("--keep-ratio", type=float, default=None, help="fraction of visual tokens kept per image")
    parser.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE",
                        help="any other method option, repeatable; VALUE is parsed as int, float, true/false or "
                             "string (e.g. --option discard_layer=4 --option fusion=fixed)")


def parse_option(text: str) -> tuple[str, Any]:
    """``--option KEY=VALUE`` as ``(key, value)`` (:func:`vtprune.methods.parse_option`).

    Raises:
        argparse.ArgumentTypeError: no ``=`` or an empty / non-identifier key.
    """
    try:
        return _parse_option(text)
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


def parse_list(cast: Callable[[str], Any], kind: str | None = None) -> Callable[[str], list]:
    """An argparse type: a comma-separated list of ``cast`` values (``"192,128,64"`` -> ``[192, 128, 64]``)."""
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [cast(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind or cast.__name__}, "
                                             f"got {text!r}") from None
    return parse


def budget_list(text: str) -> list[int | str]:
    """An argparse type: comma-separated budgets in the spec grammar (:func:`vtprune.methods.parse_budget`:
    ``64`` -> 64 visual tokens per image, ``12.5%``, ``default``)."""
    from vtprune.methods import parse_budget

    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        labels = [parse_budget(t)[0] for t in items]
        return [int(label) if label.isdigit() else label for label in labels]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def method_list(text: str) -> list[str]:
    """An argparse type: comma-separated method specs (``method[:key=value...][@budget]``, checked by the
    command with :func:`vtprune.methods.parse_spec`); a comma inside an option value is not supported here."""
    return [t.strip() for t in text.split(",") if t.strip()]
