"""Printing a ``generate`` result for people (with ``rich`` when it is installed)."""

from __future__ import annotations


def _fmt_options(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if v is not None) or "-"


def _fmt_ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt_x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the human-readable summary of one flattened result."""
    f, kv, t = result.get("flops", {}), result["kv_cache"], result["timing"]
    pre = f.get("prefill", {})
    rows = [
        ("method", f"{result['method']} ({_fmt_options(result['options'])})"),
        ("visual tokens / image", f"{result.get('visual_tokens_in', '-')} in -> "
                                  f"{result.get('equivalent_budget', float('nan')):.1f} equivalent -> "
                                  f"{result.get('final_budget', '-')} final"),
        ("FLOPs ratio (FastV)", f"prefill {pre.get('fastv_ratio', float('nan')):.3f}, "
                                f"total {f.get('total_fastv_ratio', float('nan')):.3f}"),
        ("FLOPs ratio (exact)", f"prefill {pre.get('exact_ratio', float('nan')):.3f}"),
        ("KV cache", f"{kv['bytes']:,} / {kv['bytes_unpruned']:,} bytes (ratio {kv['ratio']:.3f})"),
        ("timing (ms)", f"prefill {_fmt_ms(t.get('prefill_ms'))}, decode {_fmt_ms(t.get('decode_ms_per_token'))}"
                        f" / token, end-to-end {_fmt_ms(t.get('end_to_end_ms'))} "
                        f"({t.get('new_tokens')} new tokens, {t.get('device')})"),
    ]
    return rows


def print_human(result: dict) -> None:
    """Print a result of ``generate`` for people (with ``rich`` when it is installed)."""
    sections = [(f"{result['method']}", result)]
    if "baseline" in result:
        sections.append(("none (unpruned)", result["baseline"]))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[assignment, misc]  # rich is optional: None marks it missing
    if Console is None:
        for title, r in sections:
            print(f"== {title}\nanswer: {r['answer']}")
            for label, value in summary_rows(r):
                print(f"  {label:<22} {value}")
        if "speedup" in result:
            s = result["speedup"]
            print(f"speedup (unpruned ms / pruned ms): end-to-end {_fmt_x(s['end_to_end'])}, "
                  f"prefill {_fmt_x(s['prefill'])}, decode/token {_fmt_x(s['decode_per_token'])}")
        return
    console = Console(highlight=False)
    for title, r in sections:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("answer", r["answer"], style="green")
        for label, value in summary_rows(r):
            table.add_row(label, value)
        console.print(table)
    if "speedup" in result:
        s = result["speedup"]
        console.print(f"[bold]speedup[/bold] (unpruned ms / pruned ms): end-to-end {_fmt_x(s['end_to_end'])}, "
                      f"prefill {_fmt_x(s['prefill'])}, decode/token {_fmt_x(s['decode_per_token'])}")
