"""The API reference (docs/reference/*.md, rendered by mkdocstrings) documents every public name of
``vtprune``, ``vtprune.methods``, ``vtprune.eval`` and ``vtprune.bench`` (their ``__all__``): a name is
documented when a ``::: path`` directive resolves to the same object, or a ``::: module`` directive lists it
in its ``members`` option (or has no ``members`` option and the module exports it). A re-export is
documented once, under either path. A new public name without an entry fails here; so does a directive
that no longer resolves."""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
PUBLIC_MODULES = ("vtprune", "vtprune.methods", "vtprune.eval", "vtprune.bench")
DIRECTIVE = re.compile(r"^:::[ \t]+(?P<path>[\w.]+)[ \t]*\n(?P<options>(?:(?:[ \t]+.*)?\n)*)", re.MULTILINE)


def resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def directives(text: str) -> list[tuple[str, dict]]:
    """``(path, options)`` of every ``::: path`` directive (options: the indented YAML block under it)."""
    found = []
    for m in DIRECTIVE.finditer(text):
        block = yaml.safe_load(textwrap.dedent(m.group("options"))) or {}
        found.append((m.group("path"), block.get("options", {}) or {}))
    return found


def documented_objects(pages: dict[str, str]) -> list[Any]:
    objects = []
    for page, text in pages.items():
        for path, options in directives(text):
            try:
                obj = resolve(path)
            except (ImportError, AttributeError) as e:
                raise AssertionError(f"{page}: `::: {path}` does not resolve ({e})") from e
            objects.append(obj)
            members = options.get("members")
            if isinstance(obj, type(importlib)) and members is not False:
                names = members if isinstance(members, list) else getattr(obj, "__all__", [])
                objects.extend(getattr(obj, name) for name in names)
    return objects


def reference_pages() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(REFERENCE.glob("*.md"))}


def test_directives_are_parsed_with_their_members():
    text = "# x\n\n::: vtprune.bench\n    options:\n      members: [ARCHS, run_bench]\n\n::: vtprune.apply\n"
    assert directives(text) == [("vtprune.bench", {"members": ["ARCHS", "run_bench"]}), ("vtprune.apply", {})]
    objects = documented_objects({"x.md": text})
    import vtprune
    import vtprune.bench

    assert any(o is vtprune.bench.run_bench for o in objects) and any(o is vtprune.apply for o in objects)
    assert not any(o is vtprune.bench.BenchSpec for o in objects)
    with pytest.raises(AssertionError, match="does not resolve"):
        documented_objects({"y.md": "::: vtprune.no_such_name\n"})


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_in_the_api_reference(module):
    pages = reference_pages()
    assert pages, f"no API reference pages under {REFERENCE}"
    objects = documented_objects(pages)
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not any(getattr(mod, name) is o for o in objects)]
    assert not missing, (f"{module}: public names without an entry in docs/reference/*.md: {missing}; add a "
                         f"`::: {module}.NAME` directive for each")
