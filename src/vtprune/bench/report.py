"""Writing a benchmark result: raw JSON, a Markdown table, and a PNG plot of measured vs ideal speedups."""

from __future__ import annotations

import json
from pathlib import Path

PHASES = (("prefill", "TTFT (vision + prefill)"), ("decode", "decode per token"), ("end_to_end", "end-to-end"))


def file_stem(result: dict) -> str:
    """``bench-b<B>-p<prompt>-n<new>-<dtype>``: one regime per file, so regimes share a directory."""
    s = result["spec"]
    return f"bench-b{s['batch']}-p{s['prompt_tokens']}-n{s['new_tokens']}-{result['meta']['dtype']}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _r(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _interval(overhead: dict) -> str:
    iv = overhead.get("end_to_end_ratio_paired_interval")
    if iv is None:
        return ", too few rounds for a 95 % interval"
    verdict = "resolves the target" if overhead.get("target_resolved") else "cannot resolve the target"
    return f", 95 % interval {_r(iv[0])}-{_r(iv[1])}: {verdict}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _bytes(v) -> str:
    if v is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v} B"


def markdown(result: dict) -> str:
    """The result as Markdown: header (date, device, versions, shapes, ceilings, overhead), a table of
    measurements (medians, ms), one table per phase of speedups vs the stock model (measured, FLOPs-ideal,
    roofline-ideal and the ratios), and the scoring cost."""
    meta, spec, ceil = result["meta"], result["spec"], result["ceilings"]
    lines = [
        f"# vtprune bench: {meta['label']}",
        "",
        f"- date {meta['date']}, host {meta['host']}, device {meta['device']} ({meta['device_name']})",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, vtprune {meta['vtprune']}, "
        f"{meta['dtype']}, attention {meta['attention']}",
        f"- batch {spec['batch']}, {spec['prompt_tokens']} text tokens + {meta['visual_tokens_per_image']} visual tokens "
        f"(sequence {meta['sequence_length']}), {spec['new_tokens']} new tokens (greedy, no EOS); "
        f"median of {spec['repeats']} rounds after {spec['warmup']} warm-up round(s), cases round-robin",
        f"- decoder: d {meta['decoder']['hidden']}, {meta['decoder']['layers']} layers, {meta['decoder']['heads']} heads, "
        f"MLP {meta['decoder']['intermediate']}, vocab {meta['decoder']['vocab']}",
        f"- ceilings measured in this run: matmul {ceil['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({ceil['matmul']['n']}^3, {ceil['matmul']['dtype']}), copy {ceil['copy']['bytes_per_s'] / 1e9:.1f} GB/s "
        f"({_bytes(ceil['copy']['size_bytes'])} read + written)",
    ]
    load = meta.get("loadavg_1min") or {}
    if load.get("start") is not None:
        lines.append(f"- load average (1 min) at start / end: {load['start']} / {load['end']}")
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    ov = result.get("overhead")
    if ov:
        lines.append(f"- machinery overhead (`none` attached / stock): end-to-end {_r(ov['end_to_end_ratio'])} "
                     f"(paired median {_r(ov['end_to_end_ratio_paired_median'])}{_interval(ov)}; "
                     f"target <= {ov['target_end_to_end_ratio']}), "
                     f"TTFT {_r(ov['ttft_ratio'])}, decode {_r(ov['decode_per_token_ratio'])}")
    lines += ["", "## Measurements (medians; ms)", "",
              "| case | equiv. budget | TTFT ms (roofline) | decode ms/token (roofline) | end-to-end ms | tokens/s "
              "| KV bytes (vs unpruned) | peak mem (delta) |",
              "|---|---|---|---|---|---|---|---|"]
    steps = max(spec["new_tokens"] - 1, 0)
    for c in result["cases"]:
        m, kv = c["median"], c.get("kv_cache")
        eq = c.get("visual", {}).get("equivalent_budget")
        kv_text = f"{_bytes(kv['bytes'])} ({kv['ratio']:.1%})" if kv else "(unpruned)"
        roof = (c.get("roofline_ms") or {}).get("pruned")
        r_pre = f" ({_ms(roof['prefill']['ms'])})" if roof else ""
        r_dec = f" ({_ms(roof['decode']['ms'] / steps)})" if roof and steps else ""
        lines.append(f"| {c['name']} | {'-' if eq is None else f'{eq:.1f}'} | {_ms(m['ttft_ms'])}{r_pre} | "
                     f"{_ms(m['decode_ms_per_token'])}{r_dec} | {_ms(m['end_to_end_ms'])} | {_r(m['tokens_per_s'])} | "
                     f"{kv_text} | {_bytes(c['peak_memory']['peak_bytes'])} ({_bytes(c['peak_memory']['delta_bytes'])}) |")
    for phase, title in PHASES:
        if phase == "decode" and spec["new_tokens"] < 2:
            continue
        lines += ["", f"## Speedup vs stock: {title}", "",
                  "| case | measured | FLOPs-ideal | measured / FLOPs-ideal | roofline-ideal | measured / roofline | "
                  "roofline bound |",
                  "|---|---|---|---|---|---|---|"]
        for c in result["cases"]:
            s = c["speedup"]
            bound = "-"
            if c.get("roofline_ms"):
                if phase == "end_to_end":
                    bound = " + ".join(f"{p} {c['roofline_ms']['pruned'][p]['bound']}" for p in ("prefill", "decode")
                                       if c["roofline_ms"]["pruned"][p]["bound"])
                else:
                    bound = c["roofline_ms"]["pruned"][phase]["bound"] or "-"
            lines.append(f"| {c['name']} | {_x(s['measured'][phase])} | {_x(s.get('flops_ideal', {}).get(phase))} | "
                         f"{_r(s.get('measured_over_flops_ideal', {}).get(phase))} | "
                         f"{_x(s.get('roofline_ideal', {}).get(phase))} | "
                         f"{_r(s.get('measured_over_roofline', {}).get(phase))} | {bound} |")
    if result.get("scoring"):
        lines += ["", "## Scoring cost (partial attention rows beside the fused kernel; one call per scored layer) "
                  "and host time in the engine's hooks and generate wrapper (one extra, untimed generation per case)", "",
                  "| case | scored layers, prefill | ms / layer, prefill | scored layers / decode step | "
                  "ms / layer, decode | total ms | share of end-to-end | hook calls | hook ms (host) "
                  "| generate wrapper ms (host) | host ms / stock end-to-end |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in result["scoring"].items():
            lines.append(f"| {name} | {s['calls_prefill']} | {_ms(s['ms_per_call_prefill'])} | "
                         f"{_r(s['layers_scored_per_decode_step'])} | {_ms(s['ms_per_call_decode'])} | "
                         f"{_ms(s['total_ms'])} | {_pct(s.get('share_of_end_to_end'))} | {s.get('hook_calls', '-')} "
                         f"| {_ms(s.get('hook_ms'))} | {_ms(s.get('wrapper_ms'))} "
                         f"| {_pct(s.get('host_share_of_stock_end_to_end'))} |")
    lines += ["", "Roofline ms: the roofline time of the case's own work on this machine's measured ceilings. "
              "FLOPs-ideal: decoder FLOPs (ledger, exact convention) unpruned / pruned. Roofline-ideal: per phase "
              "max(FLOPs / matmul rate, bytes / copy bandwidth) with vision tower, LM head, weights and KV bytes "
              "included (vtprune.bench.ideal). TTFT = start of generate to first token; decode per token = first to last "
              "token / (new tokens - 1); both from a synchronized clock stamped after every token.", ""]
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path | None:
    """Bar chart of measured, FLOPs-ideal and roofline-ideal speedups per case and phase, saved as PNG.

    Returns the path, or None when matplotlib is not installed (``pip install matplotlib``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = [c for c in result["cases"] if c["method"] != "stock"]
    phases = [p for p in PHASES if not (p[0] == "decode" and result["spec"]["new_tokens"] < 2)]
    fig, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 4), squeeze=False)
    series = (("measured", "measured", "tab:blue"), ("flops_ideal", "FLOPs-ideal", "tab:gray"),
              ("roofline_ideal", "roofline-ideal", "tab:orange"))
    width = 0.27
    for ax, (phase, title) in zip(axes[0], phases, strict=True):
        for i, (key, label, color) in enumerate(series):
            values = [c["speedup"].get(key, {}).get(phase) or 0.0 for c in cases]
            ax.bar([x + (i - 1) * width for x in range(len(cases))], values, width, label=label, color=color)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)), [c["name"] for c in cases], rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("speedup vs stock (x)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3, fontsize=8)
    meta, spec = result["meta"], result["spec"]
    fig.suptitle(f"speedup vs stock: {meta['label']}, {meta['dtype']}, batch {spec['batch']}, {spec['new_tokens']} new tokens, "
                 f"{meta['device_name'][:60]}", fontsize=9, x=0.02, ha="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``<stem>.json`` (the whole result), ``<stem>.md`` (:func:`markdown`) and ``<stem>.png``
    (:func:`plot`, skipped without matplotlib) under ``out_dir`` (created). Returns ``{"json", "md"[, "png"]}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(result)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result))
    png = plot(result, out / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths
