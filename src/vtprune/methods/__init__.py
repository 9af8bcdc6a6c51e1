"""Visual-token methods: one small module each, free of model classes."""

from __future__ import annotations

import dataclasses

from vtprune.methods.base import Method
from vtprune.methods.fastv import FastV
from vtprune.methods.none import NoPruning
from vtprune.methods.parvts import ParVTS
from vtprune.methods.pdrop import PDrop
from vtprune.methods.pool import Pool
from vtprune.methods.random_subset import RandomSubset
from vtprune.methods.st3 import ST3
from vtprune.methods.visionzip import VisionZip
from vtprune.methods.vtw import VTW

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoPruning, ParVTS, ST3, FastV, VTW, PDrop, VisionZip, RandomSubset, Pool)
}


def make_method(method: str | Method, **options) -> Method:
    """Build a method from its name and options (or return an instance unchanged).

    Raises ValueError for an unknown name and TypeError for an unknown option (both name what is
    accepted); option values are checked by the method (ValueError).
    """
    if isinstance(method, Method):
        if options:
            raise TypeError("pass options either in the method instance or as keywords, not both")
        return method
    cls = METHODS.get(str(method).lower())
    if cls is None:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"method {cls.name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return cls(**options)


def parse_value(text: str) -> bool | int | float | str | list:
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


def parse_option(text: str) -> tuple[str, bool | int | float | str | list]:
    """Parse one ``KEY=VALUE`` method option into ``(key, value)`` (value through :func:`parse_value`).

    Raises:
        ValueError: no ``=`` or an empty / non-identifier key.
    """
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ValueError(f"expected KEY=VALUE (e.g. discard_layer=4), got {text!r}")
    return key, parse_value(value)


def parse_method_label(label: str) -> tuple[str, dict]:
    """Split a method label with fixed options, ``"st3:anneal_every=4"`` or
    ``"parvts:fusion=fixed:alpha=0.7"``, into ``(name, options)``; the name is lower-cased.

    Raises:
        ValueError: an unknown method (naming the accepted ones) or a malformed ``KEY=VALUE``.
    """
    name, *extra = str(label).strip().split(":")
    name = name.strip().lower()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return name, dict(parse_option(e) for e in extra)


__all__ = ["parse_value", "parse_option", "parse_method_label", "METHODS", "Method", "make_method", "NoPruning", "ParVTS", "ST3", "FastV", "VTW", "PDrop", "VisionZip",
           "RandomSubset", "Pool"]
