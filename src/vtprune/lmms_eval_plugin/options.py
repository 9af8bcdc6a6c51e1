"""``--model_args`` of the vtprune lmms-eval models: split the stock arguments from the method options,
convert the values, validate them with vtprune's own checks; summarise the per-request reports.

lmms-eval splits ``--model_args`` on commas (not inside ``[...]``, ``{...}`` or quotes) and converts each
value itself (``true`` / ``false`` -> bool, digits -> int, else float if it parses, else the string). Values
that reach vtprune as strings are converted with :func:`vtprune.methods.parse_value` after dropping one pair
of enclosing quotes or brackets, so a list option is written ``layers=[8,16,24]`` (PDrop's stages).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vtprune.methods import make_method, parse_spec, parse_value

# report fields averaged over requests (see :func:`summarize`): name -> path in one sample's report
SUMMARY_FIELDS: dict[str, tuple[str, ...]] = {
    "visual_tokens_in": ("visual_tokens_in",),
    "equivalent_budget": ("equivalent_budget",),
    "final_budget": ("final_budget",),
    "prefill_flops_ratio": ("flops", "prefill", "exact_ratio"),
    "total_flops_ratio_fastv": ("flops", "total_fastv_ratio"),
    "kv_cache_ratio": ("kv_cache", "ratio"),
}


def parse_model_value(value: Any) -> Any:
    """Convert one ``--model_args`` value of a method option.

    Non-strings (already converted by lmms-eval) are returned unchanged. A string loses one pair of
    enclosing quotes (``'...'``, ``"..."``) or brackets (``[...]``, ``(...)``) and is then parsed by
    :func:`vtprune.methods.parse_value`: ``"[8,16,24]"`` -> ``[8, 16, 24]``, ``"fixed"`` -> ``"fixed"``,
    ``"4"`` -> ``4``. Note that lmms-eval turns ``-2`` into ``-2.0`` before vtprune sees it.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if len(text) >= 2 and (text[0], text[-1]) in (("'", "'"), ('"', '"'), ("[", "]"), ("(", ")")):
        inner = text[1:-1]
        if text[0] in "[(":
            return [parse_value(t) for t in inner.split(",") if t.strip()]
        text = inner
    return parse_value(text)


def split_model_args(kwargs: dict[str, Any], stock: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``kwargs`` into ``(stock arguments, method options)``: a key named in ``stock`` (the
    parameters of lmms-eval's model class) goes to the first dict, every other key is a method option
    (value converted with :func:`parse_model_value`)."""
    stock = set(stock)
    mine = {k: v for k, v in kwargs.items() if k in stock}
    options = {k: parse_model_value(v) for k, v in kwargs.items() if k not in stock}
    return mine, options


def check_method(method: Any, options: dict[str, Any], stock: Iterable[str], model_id: str) -> str:
    """Validate ``method`` (a spec: ``parvts``, ``parvts:fusion=fixed@25%``, :mod:`vtprune.methods.spec`) and
    ``options`` with vtprune's own checks (before any weight is loaded); the spec's options are merged
    into ``options`` (in place; a key given twice is refused). Returns the method name, lower case.

    Raises:
        ValueError: unknown method (vtprune's message: the available methods), a malformed spec, an
            option given twice, or an option value out of range that needs no model to check.
        TypeError: an option the method does not have; the message names the method's options and the
            other arguments ``model_id`` accepts.
    """
    spec = parse_spec(str(parse_model_value(method)))
    twice = sorted(set(spec.options) & set(options))
    if twice:
        raise ValueError(f"{model_id}: option(s) {twice} given both in method={spec.text!r} and as model_args")
    options.update(spec.options)
    try:
        make_method(spec.name, **options)
    except TypeError as e:
        raise TypeError(f"{model_id}: {e}; the other model_args it accepts are "
                        f"{sorted(set(stock) | {'method', 'vtprune_report'})}") from e
    return spec.name


def _field(sample: dict, path: tuple[str, ...]) -> float | None:
    value: Any = sample
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summarize(reports: list[dict]) -> dict[str, float]:
    """Means over all samples of ``reports`` (each one :meth:`vtprune.Run.report`, i.e. one request) of
    :data:`SUMMARY_FIELDS`: visual tokens in and equivalent / final budget (tokens per image), prefill
    FLOPs ratio (exact count, pruned / unpruned), total FLOPs ratio (FastV convention, prefill + decode)
    and KV-cache ratio (bytes, pruned / unpruned); plus ``requests`` and ``prefill_ms`` (mean, ms, vision
    encoder + prefill). Empty dict for no reports."""
    samples = [s for r in reports for s in r.get("samples", [])]
    if not samples:
        return {}
    out: dict[str, float] = {"requests": float(len(reports))}
    for name, path in SUMMARY_FIELDS.items():
        values = [v for v in (_field(s, path) for s in samples) if v is not None]
        if values:
            out[name] = sum(values) / len(values)
    prefill = [r["timing"]["prefill_ms"] for r in reports if r.get("timing", {}).get("prefill_ms") is not None]
    if prefill:
        out["prefill_ms"] = sum(prefill) / len(prefill)
    return out
