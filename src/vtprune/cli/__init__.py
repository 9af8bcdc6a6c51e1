"""Command-line interface: one module per command, sharing :mod:`vtprune.cli.common`.

``vtprune generate`` (one image + one prompt through a method), ``vtprune bench`` (latency / memory of
methods x budgets against the unpruned model), ``vtprune eval`` (accuracy on data sets, resumable),
``vtprune calibrate`` (a method's layer by first-token KL) and ``vtprune show`` (the kept tokens drawn
over the image). Thin by design (ARCHITECTURE.md, layer 1): each parses its arguments, calls the library
and prints. Exit codes: see :mod:`vtprune.cli.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from vtprune.cli import bench, calibrate, generate, show
from vtprune.cli import eval as eval_command
from vtprune.cli.common import PROG, UsageError, method_options, parse_option
from vtprune.cli.generate import speedups
from vtprune.inputs import (
    build_inputs,
    default_device,
    is_default_model,
    load_image,
    load_model,
    resolve_dtype,
)
from vtprune.methods import parse_value

COMMANDS = (generate, bench, eval_command, calibrate, show)

__all__ = ["main", "build_parser", "UsageError", "parse_option", "parse_value", "method_options", "speedups",
           "build_inputs", "default_device", "is_default_model", "load_image", "load_model", "resolve_dtype"]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``vtprune`` command and its subcommands."""
    import vtprune

    parser = argparse.ArgumentParser(prog=PROG, description="Visual token scheduling for HuggingFace multimodal LLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {vtprune.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


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
