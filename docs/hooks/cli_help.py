"""MkDocs hook: replace each ``<!-- cli-help: COMMAND -->`` line of a page with the ``--help`` text that
``vtprune COMMAND`` prints now (``<!-- cli-help: -->`` for the top-level command), so the CLI page never
holds a hand-copied option list. Runs the repository's own ``src/`` (the checkout being documented).
An unknown command fails the build."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

MARKER = re.compile(r"^<!-- cli-help:\s*([\w-]*)\s*-->$", re.MULTILINE)
WIDTH = "100"  # argparse wraps the help at $COLUMNS


def on_config(config):
    src = str(Path(config.config_file_path).parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def help_text(command: str) -> str:
    from vtprune.cli import main

    argv = [command, "--help"] if command else ["--help"]
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(argv)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    if code != 0:
        raise ValueError(f"`vtprune {' '.join(argv)}` exited with {code}: {err.getvalue().strip()}")
    return out.getvalue().rstrip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: f"```text\n{help_text(m.group(1))}\n```", markdown)
