"""Calibration of a method's layer by the KL divergence of the first answer token (VTW's procedure).

For each candidate setting (e.g. ParVTS's ``discard_layer`` x ``fusion``, VTW's ``layer``), run a few
samples, compare the distribution of the first generated token with the unpruned model's, and pick
the smallest layer whose mean KL(unpruned || pruned) stays within a threshold.

Source: VTW (Lin et al., AAAI 2025), Sec. 3: the withdrawal layer is chosen where the KL divergence of
the output distribution stays below a threshold on a few samples; ParVTS's authors are the same group,
and METHODS.md (ParVTS, step 5) applies the same rule to its discard layer (reconstructed).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch

from vtprune.api import apply

SWEEPS = {  # method -> (layer option, other options swept with it)
    "parvts": ("discard_layer", {"fusion": ("attention_mass", "fixed", "size")}),
    "vtw": ("layer", {}),
}


@dataclasses.dataclass
class SweepRow:
    """One setting: its options, mean / max KL (nats) over the samples, the fraction of samples whose
    first token equals the unpruned one, and the mean equivalent budget (tokens per image) and
    relative prefill FLOPs."""

    options: dict
    kl_mean: float
    kl_max: float
    agreement: float
    equivalent_budget: float
    relative_prefill_flops: float


def first_token_logprobs(model, inputs, method: str = "none", **options) -> tuple[torch.Tensor, list[dict]]:
    """Log-probabilities of the first generated token under ``method``, FloatTensor [B, vocab] (fp32,
    from the raw logits, before any logits processor), and the per-sample report entries."""
    with apply(model, method, **options) as run:
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return torch.log_softmax(out.logits[0].float(), dim=-1), run.report()["samples"]


def sweep_settings(method: str, num_layers: int, layers: list[int] | None = None,
                   fixed: dict | None = None) -> list[dict]:
    """The settings to try: every layer in ``layers`` (default 1 .. L-1) times every value of the
    method's other swept options, each merged with ``fixed`` (e.g. the budget).

    Raises:
        ValueError: a method with no calibration sweep (naming the supported ones).
    """
    if method not in SWEEPS:
        raise ValueError(f"calibrate supports methods {sorted(SWEEPS)}, got {method!r}")
    layer_key, others = SWEEPS[method]
    layers = list(range(1, num_layers)) if layers is None else list(layers)
    fixed = dict(fixed or {})
    swept = {k: v for k, v in others.items() if k not in fixed}
    combos = itertools.product(*swept.values()) if swept else [()]
    return [{layer_key: layer, **dict(zip(swept, combo, strict=True)), **fixed}
            for combo in combos for layer in layers]


def calibrate(model, batches: list, method: str, settings: list[dict], threshold: float = 0.05,
              log: Callable[[str], None] = lambda m: None) -> tuple[list[SweepRow], dict | None]:
    """Run every setting on ``batches`` (model inputs, e.g. from :func:`vtprune.inputs.build_batch`).

    Returns:
        (rows in the order of ``settings``, the chosen options): the setting with the smallest layer
        (then the smallest KL) whose mean KL(unpruned || pruned) is <= ``threshold`` nats; None if none is.

    Raises:
        ValueError / TypeError: a setting the method rejects (before any generation of it).
    """
    from vtprune.api import check

    layer_key = SWEEPS[method][0]
    for opts in settings:  # option errors first, before the slow part
        check(model, method, **opts)
    reference = [first_token_logprobs(model, inputs)[0] for inputs in batches]
    rows = []
    for opts in settings:
        kls, agree, budgets, flops = [], [], [], []
        for ref, inputs in zip(reference, batches, strict=True):
            lp, samples = first_token_logprobs(model, inputs, method, **opts)
            kls += (ref.exp() * (ref - lp)).sum(-1).clamp_min(0).tolist()
            agree += (ref.argmax(-1) == lp.argmax(-1)).tolist()
            budgets += [s["equivalent_budget"] for s in samples]
            flops += [s["flops"]["prefill"]["exact_ratio"] for s in samples]
        row = SweepRow(dict(opts), sum(kls) / len(kls), max(kls), sum(agree) / len(agree),
                       sum(budgets) / len(budgets), sum(flops) / len(flops))
        log(f"{opts}: KL {row.kl_mean:.4f}")
        rows.append(row)
    ok = [r for r in rows if r.kl_mean <= threshold]
    best = min(ok, key=lambda r: (r.options[layer_key], r.kl_mean)) if ok else None
    return rows, (best.options if best else None)


def markdown(rows: list[SweepRow], chosen: dict | None, threshold: float) -> str:
    """The sweep as a Markdown table, the chosen setting marked."""
    keys = [k for k in rows[0].options if k not in ("budget", "keep_ratio")] if rows else []
    out = ["| " + " | ".join(keys) + " | KL mean | KL max | first token = unpruned % | equiv. budget | "
           "prefill FLOPs % | |",
           "|" + "---|" * (len(keys) + 6)]
    for r in rows:
        mark = "chosen" if chosen is not None and r.options == chosen else ""
        out.append("| " + " | ".join(str(r.options[k]) for k in keys) + f" | {r.kl_mean:.4f} | {r.kl_max:.4f} | "
                   f"{100 * r.agreement:.0f} | {r.equivalent_budget:.1f} | {100 * r.relative_prefill_flops:.1f} | "
                   f"{mark} |")
    out.append("")
    out.append(f"chosen (smallest layer with mean KL <= {threshold}): {chosen}" if chosen is not None
               else f"no setting has mean KL <= {threshold}; raise the threshold or the budget")
    return "\n".join(out)
