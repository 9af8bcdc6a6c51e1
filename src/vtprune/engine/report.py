"""What a generation kept and what it saved: :class:`Report`, one per ``generate`` call.

Units: tokens (visual tokens per image, per layer), FLOPs (decoder layers only; FastV's per-layer
convention and an exact count, see :mod:`vtprune.engine.ledger`), bytes (KV cache, measured on the cache
tensors), ms (wall clock; CUDA events on GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Report(Mapping):
    """The report of one generation (a batch that ran as groups of alike samples: the groups merged).

    Attributes:
        method: the method's registry name.
        options: the method's options as given (its frozen config, ``Method.options()``).
        plan: the options resolved against the model (``Plan.to_dict()``; the last group's for a merged
            batch), e.g. kept counts per layer, a solved ratio or layer.
        samples: per sample: ``visual_tokens_in``, ``prompt_tokens``, ``visual_tokens_per_layer_prefill``,
            ``visual_tokens_per_layer_last_decode``, ``tokens_per_layer_prefill`` (the sample's real tokens
            in each layer's prefill sequence, text and visual, every packed path counted),
            ``paths_per_layer_prefill`` (1, or 2 where two paths run packed in one sequence),
            ``visual_kinds`` (each visual unit's kind, ``"image"`` or ``"video"``, in prompt order; a video is one
            unit: every frame's tokens), ``video_tokens_per_layer_prefill`` (the video units' share of
            ``visual_tokens_per_layer_prefill``; zeros without video), ``equivalent_budget`` (mean over layers of
            the visual tokens present, per image or video), ``final_budget``, ``flops`` (``prefill`` / ``decode``, pruned and
            unpruned, both conventions; ``total_fastv_ratio``), ``kv_cache`` (bytes vs unpruned).
        kv_cache: ``bytes`` measured on the batch's cache tensors, ``bytes_unpruned``, ``ratio``,
            ``entries_per_layer`` (or ``entries_per_layer_by_group`` when merged).
        timing: ``prefill_ms`` (vision encoder + prefill, i.e. TTFT), ``decode_ms_per_token``,
            ``end_to_end_ms``, ``new_tokens``, ``device`` (and ``groups`` when merged).

    A report reads like the dict of :meth:`to_dict` (``report["samples"]``).
    """

    method: str
    options: dict[str, Any]
    plan: dict[str, Any] | None
    samples: list[dict[str, Any]]
    kv_cache: dict[str, Any]
    timing: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict with the attributes as keys."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def flatten(self, sample: int = 0) -> dict[str, Any]:
        """One sample's report as a flat dict (what ``vtprune generate`` prints): ``method``, ``options``,
        ``plan``, that sample's fields (``visual_tokens_in``, ``prompt_tokens``, the per-layer counts,
        ``equivalent_budget``, ``final_budget``, ``flops``), ``kv_cache`` (the batch's measured bytes; for
        one sample the two agree) and ``timing``. Raises IndexError for a sample out of range."""
        out: dict[str, Any] = {"method": self.method, "options": self.options, "plan": self.plan}
        fields = dict(self.samples[sample]) if self.samples else {}
        fields.pop("kv_cache", None)
        out.update(fields)
        out["kv_cache"] = self.kv_cache
        out["timing"] = self.timing
        return out

    @classmethod
    def of(cls, method, plan, gen, ledger, timers: dict, generate_ms: float | None, device: str) -> Report:
        """The report of generation ``gen`` (:class:`vtprune.engine.state.Generation`) of ``method`` with
        ``plan``: per sample from ``ledger`` (:class:`vtprune.engine.ledger.Ledger`), the KV bytes measured
        on the cache (when the engine let it go, or now), the ``timers``' spans (ms) and the whole generate
        call's ``generate_ms`` (None outside ``generate``: prefill + decode)."""
        dims = ledger.dims
        lengths, measured, elsize = gen.kv_measured if gen.kv_measured is not None else kv_of(gen.cache, dims.layers)
        per_token = 2 * dims.kv_heads * dims.head_dim * elsize  # bytes of one token's K and V in one layer
        samples = ledger.summary(per_token, lengths)
        steps = ledger.steps
        unpruned = dims.layers * gen.batch_size * (gen.prompt_length + steps) * per_token
        prefill_ms, decode_ms = timers["prefill"].ms(), timers["decode"].ms()
        return cls(
            method=method.name,
            options=method.options(),
            plan=plan.to_dict() if plan is not None else None,
            samples=samples,
            kv_cache={"bytes": measured, "bytes_unpruned": unpruned, "ratio": measured / unpruned if unpruned else 1.0,
                      "entries_per_layer": lengths},
            timing={
                "prefill_ms": sum(prefill_ms),
                "decode_ms_per_token": sum(decode_ms) / len(decode_ms) if decode_ms else None,
                "end_to_end_ms": generate_ms if generate_ms is not None else sum(prefill_ms) + sum(decode_ms),
                "new_tokens": steps + 1,
                "device": device,
            },
        )

    @classmethod
    def merge(cls, parts: list[tuple[list[int], Report]], batch: int) -> Report:
        """One report for a batch that ran as groups: ``parts`` holds each group's sample indices and
        report. ``samples`` back in the caller's order, KV bytes summed, ``entries_per_layer`` per group
        (``entries_per_layer_by_group``), timings summed (decode ms per token: the mean over groups,
        weighted by their decode steps), ``timing["groups"]`` the groups' samples."""
        first = parts[0][1]
        samples: list = [None] * batch
        for group, rep in parts:
            for b, s in zip(group, rep.samples, strict=True):
                samples[b] = s
        kv: dict[str, Any] = {key: sum(r.kv_cache[key] for _, r in parts) for key in ("bytes", "bytes_unpruned")}
        kv["ratio"] = kv["bytes"] / kv["bytes_unpruned"] if kv["bytes_unpruned"] else 1.0
        kv["entries_per_layer_by_group"] = [r.kv_cache["entries_per_layer"] for _, r in parts]
        decode = [(r.timing["decode_ms_per_token"], r.timing["new_tokens"] - 1) for _, r in parts
                  if r.timing["decode_ms_per_token"] is not None]
        steps = sum(n for _, n in decode)
        timing = {
            "prefill_ms": sum(r.timing["prefill_ms"] for _, r in parts),
            "decode_ms_per_token": sum(ms * n for ms, n in decode) / steps if steps else None,
            "end_to_end_ms": sum(r.timing["end_to_end_ms"] for _, r in parts),
            "new_tokens": max(r.timing["new_tokens"] for _, r in parts),
            "device": first.timing["device"],
            "groups": [group for group, _ in parts],
        }
        return cls(method=first.method, options=first.options, plan=parts[-1][1].plan, samples=samples,
                   kv_cache=kv, timing=timing)


def kv_of(cache, layers: int) -> tuple[list[int], int, int]:
    """(entries per layer, bytes of K and V, bytes per element) of the first ``layers`` layers of ``cache``
    that hold tensors (a prefill that raised leaves the later layers empty)."""
    lengths, measured, elsize = [], 0, 0
    if cache is not None:
        for layer in cache.layers[:layers]:
            if getattr(layer, "keys", None) is None:
                continue
            lengths.append(layer.keys.shape[2])
            measured += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            elsize = layer.keys.element_size()
    return lengths, measured, elsize
