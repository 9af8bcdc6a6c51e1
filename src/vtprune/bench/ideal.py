"""Ideal speedups of one generation: what the work saved would give if time followed it exactly.

Two ideals, each ``unpruned / pruned`` per phase (prefill = time to first token, decode = all decode
steps) and end-to-end:

- **FLOPs-ideal**: the ledger's exact FLOPs of the decoder layers (``engine/ledger.py``, ``exact``
  convention), nothing else: the number papers quote.
- **roofline-ideal**: per phase, ``max(FLOPs / matrix rate, bytes / bandwidth)`` with both ceilings
  measured in the same run (:mod:`vtprune.bench.measure`) and the phase's whole work: prefill FLOPs =
  vision tower + projector (counted by FlopCounterMode) + decoder (ledger) + LM head on the last
  position; prefill bytes = all weights read once + the KV cache written; decode FLOPs = decoder
  (ledger) + LM head per step; decode bytes = per step the decoder and LM-head weights + the KV
  entries each layer reads. Activations are not counted. It is the bound a perfect implementation of
  the same schedule could reach on this machine; for ParVTS the prefill KV written counts each layer's
  tokens once (path B's entries before the discard layer are written and then dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelWork:
    """The work every method leaves unchanged, for one batch (FLOPs, bytes).

    Attributes:
        vision_flops: vision tower + projector over the batch's images (FLOPs).
        lm_head_flops: LM head for one position per sample (2 B d V FLOPs) per forward.
        vision_bytes: vision tower + projector weights (bytes).
        decoder_bytes: decoder layers + final norm weights (bytes).
        lm_head_bytes: LM head weights (bytes).
        kv_bytes_per_token: K and V of one token in one layer (bytes).
    """

    vision_flops: int
    lm_head_flops: int
    vision_bytes: int
    decoder_bytes: int
    lm_head_bytes: int
    kv_bytes_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def phase_work(run, work: ModelWork) -> dict:
    """FLOPs and bytes of the last generation of ``run`` (a :class:`vtprune.Run`) and of the unpruned
    model on the same input, summed over the batch.

    Returns:
        ``{"pruned": {"prefill": {...}, "decode": {...}}, "unpruned": {...}, "decode_steps": int}``, each
        phase ``{"decoder_flops", "flops", "bytes", "kv_bytes"}`` (FLOPs; bytes); decode sums all steps.
    """
    report, ledger = run.report(), run.ledger
    layers, per_token, steps = ledger.dims.layers, work.kv_bytes_per_token, ledger.steps
    out = {"pruned": {"prefill": _zero(), "decode": _zero()}, "unpruned": {"prefill": _zero(), "decode": _zero()},
           "decode_steps": steps}
    for b, (pad, sample) in enumerate(zip(ledger.pads, report["samples"], strict=True)):
        n0 = ledger.prompt_length - pad
        text = n0 - ledger.n_images * ledger.n_visual
        f = sample["flops"]
        kv_prefill = sum(text + v for v in ledger.prefill_visual[b]) * per_token
        kv_decode = sum(text + v + t for t, vis in enumerate(ledger.decode_history, start=1) for v in vis) * per_token
        kv_prefill0 = layers * n0 * per_token
        kv_decode0 = sum(layers * (n0 + t) for t in range(1, steps + 1)) * per_token
        for key, pre, dec, kp, kd in (("pruned", f["prefill"]["exact"], f["decode"]["exact"], kv_prefill, kv_decode),
                                      ("unpruned", f["prefill"]["exact_unpruned"], f["decode"]["exact_unpruned"],
                                       kv_prefill0, kv_decode0)):
            out[key]["prefill"]["decoder_flops"] += pre
            out[key]["prefill"]["kv_bytes"] += kp
            out[key]["decode"]["decoder_flops"] += dec
            out[key]["decode"]["kv_bytes"] += kd
    weights = work.vision_bytes + work.decoder_bytes + work.lm_head_bytes
    for key in ("pruned", "unpruned"):
        pre, dec = out[key]["prefill"], out[key]["decode"]
        pre["flops"] = work.vision_flops + pre["decoder_flops"] + work.lm_head_flops
        pre["bytes"] = weights + pre["kv_bytes"]
        dec["flops"] = dec["decoder_flops"] + steps * work.lm_head_flops
        dec["bytes"] = steps * (work.decoder_bytes + work.lm_head_bytes) + dec["kv_bytes"]
    return out


def _zero() -> dict:
    return {"decoder_flops": 0, "flops": 0, "bytes": 0, "kv_bytes": 0}


def roofline_ms(phase: dict, flops_per_s: float, bytes_per_s: float) -> dict:
    """Roofline time of one phase: ``{"compute_ms", "memory_ms", "ms" (the larger), "bound"}`` (ms;
    bound ``"compute"``, ``"memory"``, or None for a phase with no work)."""
    compute = phase["flops"] / flops_per_s * 1000.0
    memory = phase["bytes"] / bytes_per_s * 1000.0
    bound = None if not (compute or memory) else "compute" if compute >= memory else "memory"
    return {"compute_ms": compute, "memory_ms": memory, "ms": max(compute, memory), "bound": bound}


def ideal_speedups(work: dict, flops_per_s: float, bytes_per_s: float) -> dict:
    """FLOPs-ideal and roofline-ideal speedups (unpruned / pruned) from :func:`phase_work`'s output.

    Returns:
        ``{"flops": {"prefill", "decode", "end_to_end"}, "roofline": {...same...},
        "roofline_ms": {"pruned": {"prefill": {...}, "decode": {...}}, "unpruned": {...}}}``; a phase
        with no work (decode with one new token) has speedup None.
    """
    p, u = work["pruned"], work["unpruned"]
    flops = {
        "prefill": _ratio(u["prefill"]["decoder_flops"], p["prefill"]["decoder_flops"]),
        "decode": _ratio(u["decode"]["decoder_flops"], p["decode"]["decoder_flops"]),
        "end_to_end": _ratio(u["prefill"]["decoder_flops"] + u["decode"]["decoder_flops"],
                             p["prefill"]["decoder_flops"] + p["decode"]["decoder_flops"]),
    }
    roof = {key: {phase: roofline_ms(work[key][phase], flops_per_s, bytes_per_s) for phase in ("prefill", "decode")}
            for key in ("pruned", "unpruned")}
    decode = work["decode_steps"] > 0
    roofline = {
        "prefill": _ratio(roof["unpruned"]["prefill"]["ms"], roof["pruned"]["prefill"]["ms"]),
        "decode": _ratio(roof["unpruned"]["decode"]["ms"], roof["pruned"]["decode"]["ms"]) if decode else None,
        "end_to_end": _ratio(roof["unpruned"]["prefill"]["ms"] + roof["unpruned"]["decode"]["ms"],
                             roof["pruned"]["prefill"]["ms"] + roof["pruned"]["decode"]["ms"]),
    }
    return {"flops": flops, "roofline": roofline, "roofline_ms": roof}


def _ratio(a, b):
    return a / b if a and b else None
