"""The method registry: each method module registers its class with :func:`register_method` (as adapters
do with ``register_adapter``); :func:`make_method` builds one by name."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from vtprune.methods.base import Method

METHODS: dict[str, type[Method]] = {}
"""Registry name -> method class, in registration order."""

M = TypeVar("M", bound=type[Method])


def register_method(cls: M) -> M:
    """Class decorator: register a :class:`~vtprune.methods.base.Method` subclass under ``cls.name``.

    Raises:
        ValueError: the name is taken by another class, or is the base's placeholder.
    """
    if cls.name in ("", "base") or (cls.name in METHODS and METHODS[cls.name] is not cls):
        raise ValueError(f"method name {cls.name!r} is missing or already registered by {METHODS.get(cls.name)}")
    METHODS[cls.name] = cls
    return cls


def make_method(method: str | Method, **options: Any) -> Method:
    """Build a method from its name and options (or return an instance unchanged).

    Raises:
        ValueError: an unknown name (naming the registered ones) or an option value out of range
            (the method's own check at construction).
        TypeError: an unknown option (naming the method's options), or options beside an instance.
    """
    if isinstance(method, Method):
        if options:
            raise TypeError("pass options either in the method instance or as keywords, not both")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a registered name ({', '.join(sorted(METHODS))}) or a Method instance, "
                        f"got {method!r}")
    cls = METHODS.get(method.strip().lower())
    if cls is None:
        raise ValueError(f"unknown method {str(method).strip().lower()!r}; accepted: {', '.join(sorted(METHODS))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"method {cls.name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return cls(**options)
