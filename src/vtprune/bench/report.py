"""Writing a benchmark result: raw JSON, a Markdown table, and a PNG plot of measured vs ideal speedups; for a
video bench over several frame counts also one summary (:func:`write_video_summary`): how each method's saving
grows with the frames."""

from __future__ import annotations

import json
from pathlib import Path

PHASES = (("prefill", "TTFT (vision + prefill)"), ("decode", "decode per token"), ("end_to_end", "end-to-end"))


def file_stem(result: dict) -> str:
    """``bench-b<B>-p<prompt>-n<new>[-v<frames>]-<dtype>``: one regime (and frame count of a video) per file,
    so regimes share a directory."""
    s = result["spec"]
    video = f"-v{s['video_frames']}" if s.get("video_frames") else ""
    return f"bench-b{s['batch']}-p{s['prompt_tokens']}-n{s['new_tokens']}{video}-{result['meta']['dtype']}"


def _visual(meta: dict) -> str:
    """What each prompt holds besides text: ``N visual tokens`` of its image, or of its video."""
    n = meta.get("visual_tokens_per_unit", meta.get("visual_tokens_per_image"))
    if meta.get("visual_kind") == "video":
        size = meta.get("frame_size")
        return (f"one video of {meta['video_frames']} frames{f' at {size} x {size} px' if size else ''} "
                f"({n} visual tokens)")
    size = meta.get("frame_size")
    return f"{n} visual tokens{f' (one {size} x {size} px image)' if size else ''}"


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
        f"- batch {spec['batch']}, {spec['prompt_tokens']} text tokens + {_visual(meta)} "
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


# ---------------------------------------------------------------------------------------- video: saving vs frames
def video_stem(results: list[dict]) -> str:
    """``bench-video-b<B>-p<prompt>-n<new>-<dtype>``: the summary of a video bench over frame counts."""
    s = results[0]["spec"]
    return f"bench-video-b{s['batch']}-p{s['prompt_tokens']}-n{s['new_tokens']}-{results[0]['meta']['dtype']}"


def video_rows(results: list[dict]) -> list[dict]:
    """One row per case and frame count (cases in run order, frames ascending), from the results of one
    video bench per frame count (same cases): frames, visual tokens in, equivalent budget, TTFT and
    end-to-end ms, the measured / roofline-ideal / FLOPs-ideal speedups over the stock model of the same frame
    count (TTFT = prefill phase, end-to-end), decoder FLOPs of the whole generation (summed over the batch)
    and their share of the unpruned ones, KV bytes and their share (None for stock, which has no report)."""
    ordered = sorted(results, key=lambda r: r["spec"]["video_frames"])
    names = [c["name"] for c in ordered[0]["cases"]]
    rows = []
    for name in names:
        for result in ordered:
            case = next((c for c in result["cases"] if c["name"] == name), None)
            if case is None:
                continue
            m, sp, work, kv = case["median"], case["speedup"], case.get("work"), case.get("kv_cache")
            flops = flops0 = None
            if work:
                flops = work["pruned"]["prefill"]["decoder_flops"] + work["pruned"]["decode"]["decoder_flops"]
                flops0 = work["unpruned"]["prefill"]["decoder_flops"] + work["unpruned"]["decode"]["decoder_flops"]
            rows.append({
                "case": name, "frames": result["spec"]["video_frames"],
                "visual_tokens": result["meta"].get("visual_tokens_per_unit"),
                "equivalent_budget": (case.get("visual") or {}).get("equivalent_budget"),
                "ttft_ms": m["ttft_ms"], "end_to_end_ms": m["end_to_end_ms"],
                "ttft_speedup": sp["measured"]["prefill"], "ttft_roofline_ideal": sp.get("roofline_ideal", {}).get("prefill"),
                "end_to_end_speedup": sp["measured"]["end_to_end"],
                "end_to_end_roofline_ideal": sp.get("roofline_ideal", {}).get("end_to_end"),
                "end_to_end_flops_ideal": sp.get("flops_ideal", {}).get("end_to_end"),
                "decoder_flops": flops, "decoder_flops_ratio": flops / flops0 if flops is not None and flops0 else None,
                "kv_bytes": kv["bytes"] if kv else None, "kv_ratio": kv["ratio"] if kv else None,
            })
    return rows


def _flops(v) -> str:
    if v is None:
        return "-"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if v >= size:
            return f"{v / size:.2f} {unit}" if v < 10 * size else f"{v / size:.1f} {unit}"
    return f"{v:.0f} FLOP"


def video_markdown(results: list[dict], files: list[str] | None = None) -> str:
    """The summary of a video bench over frame counts (one result of :func:`vtprune.bench.runner.run_bench`
    per frame count, same cases): a header (date, device, versions, shapes, each run's ceilings and load, the
    command) and one table, per case and frame count, of TTFT and end-to-end ms with the speedups over the
    stock model of the same frame count (measured, roofline-ideal, FLOPs-ideal), decoder FLOPs and KV bytes
    against the unpruned ones. ``files``: the per-frame-count Markdown files, named in the header."""
    ordered = sorted(results, key=lambda r: r["spec"]["video_frames"])
    meta, spec = ordered[0]["meta"], ordered[0]["spec"]
    size = meta.get("frame_size")
    frames = ", ".join(f"{r['spec']['video_frames']} frames: {r['meta']['visual_tokens_per_unit']} visual tokens "
                       f"(sequence {r['meta']['sequence_length']})" for r in ordered)
    ceilings = "; ".join(f"{r['spec']['video_frames']} frames {r['ceilings']['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s, "
                         f"{r['ceilings']['copy']['bytes_per_s'] / 1e9:.1f} GB/s" for r in ordered)
    loads = [(r["meta"].get("loadavg_1min") or {}) for r in ordered]
    lines = [
        f"# vtprune bench, video: {meta['label']}",
        "",
        f"- date {meta['date']}, host {meta['host']}, device {meta['device']} ({meta['device_name']})",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, vtprune {meta['vtprune']}, "
        f"{meta['dtype']}, attention {meta['attention']}",
        f"- batch {spec['batch']}, {spec['prompt_tokens']} text tokens + one video{f' of {size} x {size} px frames' if size else ''} "
        f"per sample ({frames}), {spec['new_tokens']} new tokens (greedy, no EOS); per frame count one run: median of "
        f"{spec['repeats']} rounds after {spec['warmup']} warm-up round(s), cases round-robin",
        f"- decoder: d {meta['decoder']['hidden']}, {meta['decoder']['layers']} layers, {meta['decoder']['heads']} heads, "
        f"MLP {meta['decoder']['intermediate']}, vocab {meta['decoder']['vocab']}",
        f"- ceilings measured in each run (matmul, copy): {ceilings}",
    ]
    if loads[0].get("start") is not None:
        lines.append("- load average (1 min) at start / end of each run: "
                     + ", ".join(f"{lo.get('start')} / {lo.get('end')}" for lo in loads))
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    if files:
        lines.append("- each frame count's full tables (overhead, every phase, scoring cost): " + ", ".join(files))
    lines += ["", "## Saving vs frames (speedups over the stock model with the same video)", "",
              "| case | frames | visual tokens (equiv. budget) | TTFT ms | TTFT speedup: measured / roofline-ideal | "
              "end-to-end ms | end-to-end speedup: measured / roofline-ideal / FLOPs-ideal | decoder FLOPs (vs unpruned) "
              "| KV bytes (vs unpruned) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in video_rows(ordered):
        eq = r["equivalent_budget"]
        vis = f"{r['visual_tokens']}{'' if eq is None else f' ({eq:.1f})'}"
        flops = "(unpruned)" if r["decoder_flops"] is None else f"{_flops(r['decoder_flops'])} ({_pct(r['decoder_flops_ratio'])})"
        kv = "(unpruned)" if r["kv_bytes"] is None else f"{_bytes(r['kv_bytes'])} ({_pct(r['kv_ratio'])})"
        lines.append(f"| {r['case']} | {r['frames']} | {vis} | {_ms(r['ttft_ms'])} | {_x(r['ttft_speedup'])} / "
                     f"{_x(r['ttft_roofline_ideal'])} | {_ms(r['end_to_end_ms'])} | {_x(r['end_to_end_speedup'])} / "
                     f"{_x(r['end_to_end_roofline_ideal'])} / {_x(r['end_to_end_flops_ideal'])} | {flops} | {kv} |")
    lines += ["", "Each frame count is its own run (stock, every case, its own ceilings), so each speedup is over the "
              "stock model fed the same video. Budgets given as a percentage keep that share of every video's "
              "tokens. TTFT = start of generate to the first token (vision encoder + prefill); roofline-ideal and "
              "FLOPs-ideal as in the per-run tables (vtprune.bench.ideal); decoder FLOPs: the ledger's exact "
              "FLOPs of the decoder layers over the whole generation, summed over the batch.", ""]
    return "\n".join(lines)


def video_plot(results: list[dict], path: str | Path) -> Path | None:
    """Line plot of the measured (solid) and roofline-ideal (dashed) TTFT and end-to-end speedups against
    the frame count, one colour per case, saved as PNG. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in video_rows(results) if r["case"] != "stock"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], (("ttft", "TTFT (vision + prefill)"), ("end_to_end", "end-to-end")),
                                strict=True):
        for i, case in enumerate(cases):
            mine = [r for r in rows if r["case"] == case]
            x = [r["frames"] for r in mine]
            colour = colours[i % len(colours)]
            ax.plot(x, [r[f"{key}_speedup"] or 0.0 for r in mine], "-o", color=colour, label=case, markersize=3)
            ax.plot(x, [r[f"{key}_roofline_ideal"] or 0.0 for r in mine], "--", color=colour, linewidth=0.8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["frames"] for r in rows}), [str(f) for f in sorted({r["frames"] for r in rows})])
        ax.set_xlabel("video frames")
        ax.set_ylabel("speedup vs stock (x)")
        ax.set_title(f"{title}: measured (solid), roofline-ideal (dashed)", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(cases), 6) or 1, fontsize=7)
    meta, spec = results[0]["meta"], results[0]["spec"]
    fig.suptitle(f"video: {meta['label']}, {meta['dtype']}, batch {spec['batch']}, {spec['new_tokens']} new tokens, "
                 f"{meta['device_name'][:60]}", fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(cases) - 1) // 6), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_video_summary(results: list[dict], out_dir: str | Path, files: list[str] | None = None) -> dict[str, Path]:
    """Write ``<video stem>.json`` (the frame counts, the per-frame-count files and :func:`video_rows`),
    ``<video stem>.md`` (:func:`video_markdown`) and ``<video stem>.png`` (:func:`video_plot`, skipped without
    matplotlib) under ``out_dir`` (created). Returns ``{"json", "md"[, "png"]}``.

    Raises:
        ValueError: ``results`` empty or not all video runs."""
    if not results or any(not r["spec"].get("video_frames") for r in results):
        raise ValueError("a video summary needs one or more results of video runs (spec.video_frames set)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = video_stem(results)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    summary = {"meta": results[0]["meta"], "spec": results[0]["spec"],
               "frames": sorted(r["spec"]["video_frames"] for r in results), "files": files or [],
               "rows": video_rows(results)}
    paths["json"].write_text(json.dumps(summary, indent=1))
    paths["md"].write_text(video_markdown(results, files))
    png = video_plot(results, out / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths
