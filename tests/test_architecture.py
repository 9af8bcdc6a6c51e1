"""The house's rules that a grep can check (the layer contracts are import-linter's: ``make lint``)."""

from __future__ import annotations

import re
from pathlib import Path

import vtprune

ENGINE = Path(vtprune.__file__).resolve().parent / "engine"
# the FLOPs convention the report names after the FastV paper (Chen et al.): a unit, not the method
CONVENTION = {"ledger.py": {"FastV", "fastv"}, "report.py": {"FastV", "fastv"}}


def test_the_engine_names_no_method():
    names = {cls.__name__ for cls in vtprune.METHODS.values()} | set(vtprune.METHODS)
    offending = []
    for path in sorted(ENGINE.glob("*.py")):
        text = path.read_text()
        for name in names - CONVENTION.get(path.name, set()):
            # class names as words; registry names as string literals (some are plain words: "none", "pool")
            pattern = rf"\b{re.escape(name)}\b" if name[0].isupper() else rf"[\"']{re.escape(name)}[\"']"
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                offending.append(f"engine/{path.name}:{line}: {name}")
    assert not offending, "the engine names a method:\n" + "\n".join(offending)


def test_every_method_registers_itself_and_shows_its_stage():
    from vtprune.methods.base import Method
    from vtprune.methods.stages import ParallelPaths, RankByAttention, SelectBeforeLLM

    stages = (SelectBeforeLLM, RankByAttention, ParallelPaths)
    for name, cls in vtprune.METHODS.items():
        assert issubclass(cls, Method) and cls.name == name
        assert cls.__dataclass_params__.frozen, f"{name}'s options are not frozen"
        if name != "none":
            assert issubclass(cls, stages), f"{name} derives from no stage base"


def test_every_vtprune_import_in_the_scripts_resolves():
    """The scripts import the library lazily inside functions; a module that moves must take them along."""
    import ast
    import importlib

    scripts = Path(vtprune.__file__).resolve().parents[2] / "scripts"
    broken = []
    for path in sorted(scripts.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vtprune"):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as e:
                    broken.append(f"{path.name}:{node.lineno}: {node.module} ({e})")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            broken.append(f"{path.name}:{node.lineno}: {node.module}.{alias.name}")
    assert not broken, "scripts import what the library no longer has:\n" + "\n".join(broken)


def test_no_import_cycle_in_the_package():
    """No module of ``vtprune`` imports itself back through others (type-checking imports count: a cycle
    is a knot a reader must untie whatever runs first). grimp is import-linter's own graph builder."""
    import grimp

    graph = grimp.build_graph("vtprune", include_external_packages=False)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            path = graph.find_shortest_chain(importer=imported, imported=module)
            if path:
                cycles.append(" -> ".join((module, *path)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
