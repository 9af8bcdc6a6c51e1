#!/usr/bin/env python
"""Each case's speedup over stock, round by round, from a ``vtprune bench`` result: is it faster or slower?

The bench runs its cases round-robin, so round r of a case and round r of ``stock`` ran side by side; the
ratio stock / case per round cancels the machine's drift between rounds. For TTFT, decode ms per token
and end-to-end this prints the median of those ratios with its 95 % distribution-free interval
(``vtprune.bench.measure.paired_ratios`` / ``median_interval``, binomial order statistics; from 6 rounds on) and whether the
interval lies wholly above 1 (faster), wholly below (slower) or across it (not resolved).

Usage: ``python scripts/paired_speedups.py BENCH.json [--out OUT.md]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vtprune.bench import measure

PHASES = (("ttft_ms", "TTFT"), ("decode_ms_per_token", "decode per token"), ("end_to_end_ms", "end-to-end"))


def paired(case: dict, stock: dict, key: str) -> str:
    """``"1.03 [1.01, 1.05] faster"`` for one case and phase (``-`` when the phase was not timed)."""
    ratios = measure.paired_ratios(stock["repeats"][key], case["repeats"][key])
    if not ratios:
        return "-"
    median, interval = measure.median(ratios), measure.median_interval(ratios)
    if interval is None:
        return f"{median:.3f} (too few rounds for an interval)"
    lo, hi = interval
    verdict = "faster" if lo > 1 else "slower" if hi < 1 else "not resolved"
    return f"{median:.3f} [{lo:.3f}, {hi:.3f}] {verdict}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench", help="a vtprune bench result (.json)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    args = p.parse_args()
    result = json.loads(Path(args.bench).read_text())
    cases = {c["name"]: c for c in result["cases"]}
    stock = cases["stock"]
    rounds = len(stock["repeats"]["end_to_end_ms"])
    lines = [f"# Paired speedups over stock: `{args.bench}`", "",
             f"{result['meta'].get('date', '?')}, {rounds} rounds; `python scripts/paired_speedups.py {args.bench}`", "",
             "Median of per-round stock / case ratios, [95 % interval], verdict:", "",
             "| case | " + " | ".join(name for _, name in PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for name, case in cases.items():
        if name != "stock":
            lines.append(f"| {name} | " + " | ".join(paired(case, stock, key) for key, _ in PHASES) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
