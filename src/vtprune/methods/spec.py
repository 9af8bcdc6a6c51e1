"""The one grammar for "a method with options at a budget", shared by ``vtprune eval``, ``vtprune bench``
and the lmms-eval plugin::

    spec    := label [ "@" budget ]
    label   := method { ":" key "=" value }        e.g. parvts:fusion=fixed:alpha=1
    budget  := int | number "%" | "default"        64 (visual tokens per image), 12.5% (of them),
                                                   default (the method's own options)

A value is parsed by :func:`parse_value` (bool, int, float, a comma-separated list, else the string).
For progressive methods (st3, pdrop, vtw) the budget is the target *equivalent* budget (mean over layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from vtprune.methods.base import Method
from vtprune.methods.registry import METHODS, make_method

DEFAULT = "default"
"""The budget label that runs a method with its own default options."""


def parse_value(text: str) -> Any:
    """Parse an option value: ``true`` / ``false`` (any case) -> bool, then int, then float, else the
    string unchanged (``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"fixed"`` -> ``"fixed"``); a comma-separated
    value is a list of such values (``"8,16,24"`` -> [8, 16, 24], e.g. PDrop's ``layers``)."""
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_option(text: str) -> tuple[str, Any]:
    """Parse one ``KEY=VALUE`` method option into ``(key, value)`` (value through :func:`parse_value`).

    Raises:
        ValueError: no ``=`` or an empty / non-identifier key.
    """
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ValueError(f"expected KEY=VALUE (e.g. discard_layer=4), got {text!r}")
    return key, parse_value(value)


def parse_budget(text: str | int | float) -> tuple[str, dict[str, Any]]:
    """A budget as ``(label, options)``: ``"25%"`` -> keep_ratio 0.25 (a fraction of each image's visual
    tokens); ``"64"`` (or 64) -> budget 64 (visual tokens per image); ``"default"`` -> no options.

    Raises:
        ValueError: anything else, or a percentage outside (0, 100].
    """
    label = str(text).strip()
    if label.lower() == DEFAULT:
        return DEFAULT, {}
    if label.endswith("%"):
        try:
            pct = float(label[:-1])
        except ValueError:
            pct = float("nan")
        if not 0.0 < pct <= 100.0:
            raise ValueError(f"budget {label!r}: a percentage must be in (0, 100]")
        return label, {"keep_ratio": pct / 100.0}
    try:
        return label, {"budget": int(label)}
    except ValueError:
        raise ValueError(f"budget {label!r}: expected visual tokens per image (e.g. 64), a percentage of them "
                         f"(e.g. 12.5%) or {DEFAULT!r}") from None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One parsed spec.

    Attributes:
        label: the method with its fixed options, lower case (``"parvts:fusion=fixed"``).
        name: the registry name (``"parvts"``).
        fixed: the options of the label, as sorted ``(key, value)`` pairs.
        budget: the budget label (``"64"``, ``"12.5%"``, ``"default"``) or None when not given.
    """

    label: str
    name: str
    fixed: tuple[tuple[str, Any], ...] = ()
    budget: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The method's options: the fixed ones plus the budget's (raises ValueError if both set one)."""
        extra = parse_budget(self.budget)[1] if self.budget is not None else {}
        clash = sorted(set(extra) & {k for k, _ in self.fixed})
        if clash:
            raise ValueError(f"{self.label}@{self.budget}: option(s) {clash} given twice")
        return {**dict(self.fixed), **extra}

    @property
    def text(self) -> str:
        """The spec written back (``label@budget`` or ``label``)."""
        return self.label if self.budget is None else f"{self.label}@{self.budget}"

    def with_budget(self, budget: str | int | float) -> MethodSpec:
        """This spec at another budget (its label checked by :func:`parse_budget`)."""
        return dataclasses.replace(self, budget=parse_budget(budget)[0])

    def build(self) -> Method:
        """The method instance (:func:`vtprune.methods.make_method`; its errors)."""
        return make_method(self.name, **self.options)


def parse_spec(text: str) -> MethodSpec:
    """Parse ``method[:key=value...][@budget]`` (module docstring).

    Raises:
        ValueError: an unknown method (naming the registered ones), a malformed ``KEY=VALUE`` or budget.
    """
    label, _, budget = str(text).strip().lower().partition("@")
    name, *extra = label.split(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    fixed = tuple(sorted(dict(parse_option(e) for e in extra).items()))
    spec = MethodSpec(label=":".join([name, *(e.strip() for e in extra)]), name=name, fixed=fixed)
    return spec.with_budget(budget) if budget.strip() else spec


def expand(methods: Iterable[str], budgets: Iterable[str | int | float]) -> list[MethodSpec]:
    """Every method spec at every budget: a spec that names its own budget (``st3@64``) keeps it; one
    without is crossed with ``budgets`` (or kept without a budget when ``budgets`` is empty). Duplicates
    are dropped, order kept. Raises as :func:`parse_spec` / :func:`parse_budget`."""
    labels = [parse_budget(b)[0] for b in budgets]
    out: list[MethodSpec] = []
    for text in methods:
        spec = parse_spec(text)
        for s in ([spec] if spec.budget is not None or not labels else [spec.with_budget(b) for b in labels]):
            if s not in out:
                out.append(s)
    return out
