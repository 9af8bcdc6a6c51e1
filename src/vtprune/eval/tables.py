"""Results tables and plots from the runner's records (see :mod:`vtprune.eval.runner`).

A row per (data set, method, budget, question kind), the kind ``all`` included: samples, accuracy with its
95 % Wilson interval (:mod:`vtprune.eval.stats`), agreement with the unpruned model's answer on the same sample, mean equivalent budget (visual tokens
per image averaged over layers), and FLOPs / KV cache relative to the unpruned model (analytic FLOPs
from the tokens each layer actually held, prefill + decode; KV entries at the end of generation).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from vtprune.eval.runner import REFERENCE
from vtprune.eval.stats import paired_difference, wilson

COLUMNS = ("data", "kind", "method", "budget", "n", "accuracy", "accuracy_low", "accuracy_high", "agreement",
           "equivalent_budget", "equivalent_budget_pct", "relative_flops", "relative_kv")


def summarize(records: list[dict]) -> list[dict]:
    """Aggregate records into table rows (see the module docstring), sorted by data set, kind
    (``all`` first), then method (the reference first) and budget (largest first).

    ``agreement`` is the fraction of samples whose normalised answer equals the unpruned model's; None
    when the reference has not answered those samples. ``equivalent_budget_pct`` is the equivalent budget
    as a percentage of the visual tokens per image."""
    from vtprune.eval.answers import normalize_answer

    reference = {(r["data"], r["id"]): normalize_answer(r["prediction"]) for r in records
                 if (r["method"], r["budget"]) == REFERENCE}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        for kind in ("all", r["kind"]):
            groups[(r["data"], kind, r["method"], r["budget"])].append(r)
        for field, ok in (r.get("fields") or {}).items():  # a caption's fields, each as a kind of its own
            for kind in (f"{r['kind']}:{field}", f"{r['kind']}:fields"):
                groups[(r["data"], kind, r["method"], r["budget"])].append(dict(r, correct=ok, field=field))
    rows = []
    for (data, kind, method, budget), rs in groups.items():
        agree = [normalize_answer(r["prediction"]) == reference[(r["data"], r["id"])] for r in rs
                 if (r["data"], r["id"]) in reference]
        low, high = wilson(sum(bool(r["correct"]) for r in rs), len(rs))
        rows.append({
            "data": data, "kind": kind, "method": method, "budget": budget, "n": len(rs),
            "accuracy": _mean(r["correct"] for r in rs), "accuracy_low": low, "accuracy_high": high,
            "agreement": _mean(agree) if len(agree) == len(rs) else None,
            "equivalent_budget": _mean(r["equivalent_budget"] for r in rs),
            "equivalent_budget_pct": 100.0 * _mean(r["equivalent_budget"] / (r["visual_tokens"] or 1) for r in rs),
            "relative_flops": _mean(r["relative_flops"] for r in rs),
            "relative_kv": _mean(r["relative_kv"] for r in rs),
        })
    rows.sort(key=lambda row: (row["data"], row["kind"] != "all", row["kind"],
                               (row["method"], row["budget"]) != REFERENCE, row["method"],
                               -row["equivalent_budget"]))
    return rows


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` as CSV with :data:`COLUMNS`."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    return path


def markdown(rows: list[dict], kinds: bool = True) -> str:
    """One Markdown table per data set: accuracy (%) with its 95 % Wilson interval, agreement with unpruned
    (%), equivalent budget (tokens, % of N_v), relative FLOPs and KV (%); per question kind when ``kinds``."""
    out = []
    for data in sorted({r["data"] for r in rows}):
        out.append(f"### {data}\n")
        out.append("| kind | method | budget | n | accuracy % [95 % CI] | agree % | equiv. budget | FLOPs % | KV % |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["data"] != data or (not kinds and r["kind"] != "all"):
                continue
            agree = "" if r["agreement"] is None else f"{100 * r['agreement']:.1f}"
            out.append(f"| {r['kind']} | {r['method']} | {r['budget']} | {r['n']} | {100 * r['accuracy']:.1f} "
                       f"[{100 * r['accuracy_low']:.1f}, {100 * r['accuracy_high']:.1f}] | "
                       f"{agree} | {r['equivalent_budget']:.1f} ({r['equivalent_budget_pct']:.1f} %) | "
                       f"{100 * r['relative_flops']:.1f} | {100 * r['relative_kv']:.1f} |")
        out.append("")
    return "\n".join(out)


def grid(rows: list[dict], data: str, kind: str = "all", budgets: tuple[str, ...] = ("50%", "25%", "12.5%", "6.25%")) -> str:
    """A method x budget Markdown table of one data set and question kind (rows of :func:`summarize`):
    each cell "accuracy % [95 % CI] / agreement % / equivalent budget %"; budgets outside ``budgets``
    (``default``, matched token counts) in an "other" column as ``budget: cell``; the unpruned accuracy
    in the caption line. Empty when ``data`` has no such rows."""
    mine = [r for r in rows if r["data"] == data and r["kind"] == kind]
    ref = next((r for r in mine if (r["method"], r["budget"]) == REFERENCE), None)
    methods = list(dict.fromkeys(r["method"] for r in mine if (r["method"], r["budget"]) != REFERENCE))
    if not methods:
        return ""

    def cell(r: dict) -> str:
        agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.0f}"
        return (f"{100 * r['accuracy']:.1f} [{100 * r['accuracy_low']:.0f}, {100 * r['accuracy_high']:.0f}] / {agree} / "
                f"{r['equivalent_budget_pct']:.0f}")

    head = f"{data}, {kind}" + (f" (unpruned {100 * ref['accuracy']:.1f} % [{100 * ref['accuracy_low']:.1f}, "
                                f"{100 * ref['accuracy_high']:.1f}], n = {ref['n']})" if ref else "")
    out = [head + ":", "", "| method | " + " | ".join(budgets) + " | other |", "|---" * (len(budgets) + 2) + "|"]
    for m in methods:
        by = {r["budget"]: r for r in mine if r["method"] == m}
        other = "; ".join(f"{b}: {cell(r)}" for b, r in by.items() if b not in budgets)
        out.append(f"| {m} | " + " | ".join(cell(by[b]) if b in by else "" for b in budgets) + f" | {other} |")
    return "\n".join(out) + "\n"


def compare(records: list[dict], a: tuple[str, str], b: tuple[str, str], data: str, kinds: set[str] | None = None,
            seed: int = 0) -> dict:
    """Condition ``a`` minus condition ``b`` (each ``(method label, budget label)``) on the questions of
    ``data`` (of ``kinds`` when given) that both answered: :func:`vtprune.eval.stats.paired_difference`
    (accuracies, difference with a 95 % bootstrap interval, McNemar's exact p-value).

    Raises:
        ValueError: no question answered under both conditions.
    """
    def answers(cond):
        return {r["id"]: bool(r["correct"]) for r in records
                if r["data"] == data and (r["method"], r["budget"]) == cond and (kinds is None or r["kind"] in kinds)}

    ra, rb = answers(a), answers(b)
    common = sorted(set(ra) & set(rb))
    if not common:
        raise ValueError(f"no question of {data!r} answered under both {a} and {b}")
    return {"a": a, "b": b, "data": data, "kinds": sorted(kinds) if kinds else None,
            **paired_difference([ra[i] for i in common], [rb[i] for i in common], seed=seed)}


def plot(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """Two PNGs: accuracy vs equivalent budget (% of N_v) per method, and accuracy vs relative FLOPs;
    one panel per data set, kind ``all``, the unpruned accuracy as a dashed line. Needs matplotlib
    (``pip install 'vtprune[bench]'``; ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    datasets = sorted({r["data"] for r in rows})
    paths = []
    for x_key, x_label, name in (("equivalent_budget_pct", "equivalent budget (% of visual tokens)",
                                  "accuracy_vs_budget.png"),
                                 ("relative_flops", "FLOPs relative to unpruned", "accuracy_vs_flops.png")):
        fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
        for ax, data in zip(axes[0], datasets, strict=True):
            mine = [r for r in rows if r["data"] == data and r["kind"] == "all"]
            for r in mine:
                if (r["method"], r["budget"]) == REFERENCE:
                    ax.axhline(100 * r["accuracy"], color="k", ls="--", lw=1, label="unpruned")
            for method in sorted({r["method"] for r in mine} - {REFERENCE[0]}):
                pts = sorted((r[x_key] * (100 if x_key == "relative_flops" else 1), 100 * r["accuracy"])
                             for r in mine if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax.set_title(data)
            ax.set_xlabel(x_label + (" (%)" if x_key == "relative_flops" else ""))
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(records: list[dict], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and (with ``plots``) the two PNGs into ``out_dir``."""
    out_dir = Path(out_dir)
    rows = summarize(records)
    paths = {"csv": write_csv(rows, out_dir / "results.csv")}
    md = out_dir / "results.md"
    md.write_text(markdown(rows))
    paths["markdown"] = md
    if plots:
        for p in plot(rows, out_dir):
            paths[p.stem] = p
    return paths
