#!/usr/bin/env python
"""The seeds' claims, read off a ``vtprune eval`` results file: paired tests on the same questions.

1. ParVTS keeps what saliency-only selection loses: ``parvts`` against ``parvts:fusion=fixed:alpha=1``
   (the non-subject path disabled) and ``visionzip:contextual=0`` (dominant tokens only) at the same budget,
   on the scenes' background and periphery questions (and all scene questions), and on every other question
   set the run holds: accuracy difference with its 95 % bootstrap interval and McNemar's exact p-value.
2. ParVTS @ 12.5 % and ST³ with its defaults as % of the unpruned accuracy, against FastV / random / pool /
   VisionZip at (nearly) equal equivalent budget (the ``@matched`` conditions of the run, if any, else every budget).
3. ST³'s annealing on long answers: scene-caption field accuracy with VTA off (``anneal=none``) and on
   (``anneal_every`` 1 / 4 / 8), each against the unpruned captions and against VTA off.
4. ST³'s batched evictions on short answers: on every other data set, each ``st3:anneal_every=K`` against
   ``st3:anneal_every=1`` (the paper's per-step annealing) at the same budget, and against the unpruned model.
5. Every condition on the scenes per question kind and form (yes / no or open: the background's colour,
   the periphery's count, the subject's name).
6. Any other ParVTS setting the run holds at the claims' budget (e.g. a ``vtprune eval --kinds background``
   sweep of ``discard_layer`` / ``fusion``), paired with the non-subject path off and with ParVTS's defaults.

Usage: ``python scripts/accuracy_claims.py OUT`` (the folder of ``vtprune eval --out OUT``); writes
``OUT/claims.md`` (and prints it) and ``OUT/grid.md``: method x budget tables per data set and question kind,
each cell "accuracy % [95 % CI] / agreement with unpruned % / equivalent budget %".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtprune.eval.runner import REFERENCE, read_records
from vtprune.eval.stats import wilson
from vtprune.eval.tables import compare, grid, summarize


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def diff_row(c: dict) -> str:
    return (f"| {c['a'][0]}@{c['a'][1]} | {c['b'][0]}@{c['b'][1]} | {', '.join(c['kinds']) if c['kinds'] else 'all'} | "
            f"{c['n']} | {pct(c['accuracy_a'])} | {pct(c['accuracy_b'])} | {100 * c['difference']:+.1f} "
            f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] | {c['only_a']} / {c['only_b']} | {c['p_mcnemar']:.3g} |")


DIFF_HEADER = ["| A | B | kinds | n | acc A % | acc B % | A - B (pp) [95 % CI] | only A / only B right | McNemar p |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|"]


def _paired(records: list[dict], a: tuple[str, str], b: tuple[str, str], data: str) -> str:
    c = compare(records, a, b, data)
    return (f"{100 * c['difference']:+.1f} pp [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}], "
            f"McNemar p {c['p_mcnemar']:.3g} | ")


def conditions(records: list[dict], data: str) -> set[tuple[str, str]]:
    return {(r["method"], r["budget"]) for r in records if r["data"] == data}


def form(record: dict) -> str:
    """A question's form: "yes/no" or "open" (a colour, a count, a name), from its reference answer."""
    return "yes/no" if str(record["answer"]).lower() in ("yes", "no") else "open"


def matched(records: list[dict], budget: str) -> list[str]:
    """2. ParVTS @ ``budget`` and ST3 with its defaults as % of the unpruned accuracy, each against FastV /
    random / pool / VisionZip at the closest equivalent budget the run holds (run them at matched budgets,
    e.g. ``fastv@31`` / ``visionzip@42`` for ParVTS @ 12.5 % on the bundled model), with the paired differences."""
    rows = [r for r in summarize(records) if r["kind"] == "all"]
    lines = ["## 2. Accuracy as % of unpruned at (nearly) equal equivalent budget", "",
             "| data | anchor | method | budget | equiv. budget (% of N_v) | n | accuracy % [95 % CI] | % of unpruned |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for data in sorted({r["data"] for r in rows}):
        mine = [r for r in rows if r["data"] == data]
        ref = next((r for r in mine if (r["method"], r["budget"]) == REFERENCE), None)
        if ref is None or not ref["accuracy"]:
            continue
        for anchor in (("parvts", budget), ("st3", "default")):
            a = next((r for r in mine if (r["method"], r["budget"]) == anchor), None)
            if a is None:
                continue
            picks = [a]
            for method in ("fastv", "random", "pool", "visionzip"):
                cands = [r for r in mine if r["method"] == method]
                if cands:
                    picks.append(min(cands, key=lambda r: abs(r["equivalent_budget_pct"] - a["equivalent_budget_pct"])))
            for r in picks:
                lines.append(f"| {data} | {anchor[0]}@{anchor[1]} | {r['method']} | {r['budget']} | "
                             f"{r['equivalent_budget_pct']:.1f} | {r['n']} | {pct(r['accuracy'])} "
                             f"[{pct(r['accuracy_low'])}, {pct(r['accuracy_high'])}] | "
                             f"{100 * r['accuracy'] / ref['accuracy']:.1f} |")
            for r in picks[1:]:
                lines.append(f"|  |  | paired: {a['method']}@{a['budget']} - {r['method']}@{r['budget']} | | | | "
                             + _paired(records, (a["method"], a["budget"]), (r["method"], r["budget"]), data) + " |")
    lines.append("")
    return lines


def scene_forms(records: list[dict], budget: str) -> list[str]:
    """5. Every condition on the scenes per kind x form (the background's open question is its colour, the
    periphery's the shape count, the subject's its name), and 6. every other ParVTS setting the run holds
    (a ``vtprune eval --kinds`` sweep) paired with the non-subject path off and with ParVTS's defaults, per
    kind x form."""
    scenes = [r for r in records if r["data"] == "scenes"]
    if not scenes:
        return []
    answers: dict[tuple, list[bool]] = {}  # (method, budget, kind, form) -> correct per question
    for r in scenes:
        answers.setdefault((r["method"], r["budget"], r["kind"], form(r)), []).append(bool(r["correct"]))
    cells = sorted({key[2:] for key in answers})
    equiv = {(r["method"], r["budget"]): r["equivalent_budget"] for r in summarize(scenes) if r["kind"] == "all"}
    conds = sorted(equiv, key=lambda c: (c != REFERENCE, c))
    out = ["## 5. The scenes per question kind and form (accuracy % [95 % CI], n)", "",
           "| condition | equiv. budget (tokens) | " + " | ".join(f"{k} {f}" for k, f in cells) + " |",
           "|---|---:|" + "---:|" * len(cells)]
    for c in conds:
        row = []
        for cell in cells:
            ok = answers.get((*c, *cell), [])
            lo, hi = wilson(sum(ok), len(ok)) if ok else (0.0, 0.0)
            row.append(f"{pct(sum(ok) / len(ok))} [{pct(lo)}, {pct(hi)}], {len(ok)}" if ok else "")
        out.append(f"| {c[0]}@{c[1]} | {equiv[c]:.1f} | " + " | ".join(row) + " |")
    out.append("")
    base, off = ("parvts", budget), ("parvts:fusion=fixed:alpha=1", budget)
    sweep = [c for c in conds if c[0].startswith("parvts") and c not in (base, off) and c[1] == budget]
    if sweep and base in conds and off in conds:
        out += ["## 6. ParVTS's other settings at the same budget, paired (same questions)", "",
                "| kind | form " + DIFF_HEADER[0], "|---|---" + DIFF_HEADER[1]]
        for c in sweep:
            for k, f in sorted(key[2:] for key in answers if key[:2] == c):
                mine = [r for r in scenes if r["kind"] == k and form(r) == f]
                for other in (off, base):
                    out.append(f"| {k} | {f} " + diff_row(compare(mine, c, other, "scenes")))
        out.append("")
    return out


OVERVIEW_SETS = ("imagenet-pope", "scenes", "easy-vqa", "imagenet-category", "imagenet-naming")
GRID_SETS = OVERVIEW_SETS[:4]  # the sets of the budget sweep (naming ran at 12.5 % only)
BUDGETS = ("50%", "25%", "12.5%", "6.25%")


def whole_set_cells(summary: list[dict], sets: tuple[str, ...]) -> dict[tuple[str, str, str], dict]:
    """The all-kinds rows of ``sets`` keyed by (method, budget, data), only where the condition answered as many
    questions of the set as the unpruned model did (not a ``--kinds`` or cut run)."""
    rows = [r for r in summary if r["kind"] == "all" and r["data"] in sets]
    n_ref = {r["data"]: r["n"] for r in rows if (r["method"], r["budget"]) == REFERENCE}
    return {(r["method"], r["budget"], r["data"]): r for r in rows if r["n"] == n_ref.get(r["data"])}


def overview(summary: list[dict]) -> list[str]:
    """One table of every condition x the question sets of :data:`OVERVIEW_SETS` the run holds (accuracy %
    [95 % CI] over all kinds; a cell only where the condition answered every question the unpruned model
    did), with the equivalent budget and the FLOPs as % of unpruned, each the mean over those sets. Rows: unpruned, then each percentage budget's methods, then the other conditions (token
    counts, defaults) by equivalent budget."""
    cell = whole_set_cells(summary, OVERVIEW_SETS)
    sets = [d for d in OVERVIEW_SETS if any(k[2] == d for k in cell)]
    if not sets:
        return []
    conds = {k[:2] for k in cell}
    by_pct = [c for b in BUDGETS for c in sorted(c for c in conds if c[1] == b)]

    def mean(c: tuple[str, str], key: str) -> float:
        vals = [cell[(*c, d)][key] for d in sets if (*c, d) in cell]
        return sum(vals) / len(vals)

    rest = sorted((c for c in conds if c != REFERENCE and c[1] not in BUDGETS),
                  key=lambda c: (mean(c, "equivalent_budget_pct"), c))
    out = ["Every condition on every question set (accuracy % [95 % CI], all kinds; equivalent budget and FLOPs as "
           "% of unpruned, mean over the sets):", "",
           "| method @ budget | " + " | ".join(sets) + " | equiv. budget % | FLOPs % |",
           "|---|" + "---:|" * (len(sets) + 2)]
    for c in ([REFERENCE] if REFERENCE in conds else []) + by_pct + rest:
        acc = [f"{pct(r['accuracy'])} [{100 * r['accuracy_low']:.0f}, {100 * r['accuracy_high']:.0f}]"
               if (r := cell.get((*c, d))) else "" for d in sets]
        out.append(f"| {c[0]} @ {c[1]} | " + " | ".join(acc) +
                   f" | {mean(c, 'equivalent_budget_pct'):.1f} | {100 * mean(c, 'relative_flops'):.1f} |")
    return out + [""]


def retention(summary: list[dict]) -> list[str]:
    """The budget sweep in one table: each method x percentage budget as the mean over the question sets of
    :data:`GRID_SETS` the run holds of (accuracy / unpruned accuracy), in %, beside the mean FLOPs as % of
    unpruned (the field's "average performance retained", e.g. VisionZip's and PDrop's tables). A cell only
    where the condition answered every question of every one of those sets that the unpruned model did."""
    cell = whole_set_cells(summary, GRID_SETS)
    ref = {d: r for (m, b, d), r in cell.items() if (m, b) == REFERENCE}
    sets = [d for d in GRID_SETS if d in ref]
    budgets = [b for b in BUDGETS if any(c[1] == b for c in cell)]
    methods = sorted({m for m, b, _ in cell if b in budgets})
    if not sets or not budgets:
        return []
    out = [f"Accuracy as % of unpruned, mean over {', '.join(sets)} / FLOPs as % of unpruned, per method and share "
           "of the visual tokens:", "", "| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            got = [cell[(m, b, d)] for d in sets if (m, b, d) in cell]
            if len(got) < len(sets) or not all(ref[r["data"]]["accuracy"] for r in got):
                cells.append("")
                continue
            kept = sum(r["accuracy"] / ref[r["data"]]["accuracy"] for r in got) / len(got)
            cells.append(f"{100 * kept:.1f} / {100 * sum(r['relative_flops'] for r in got) / len(got):.0f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder of a vtprune eval run (holds results.jsonl)")
    p.add_argument("--budget", default="12.5%", help="the budget of claims 1 and 2 (default 12.5%%)")
    args = p.parse_args()
    out = Path(args.out)
    records = read_records(out / "results.jsonl")
    if not records:
        raise SystemExit(f"no records in {out / 'results.jsonl'}")
    lines = [f"# The seeds' claims on `{out}` ({len(records)} answers)", ""]

    # 1. ParVTS vs saliency-only selection at the same budget, on the scenes
    lines += ["## 1. ParVTS against saliency-only selection at the same budget (scenes, then the other sets)", ""] + DIFF_HEADER
    have = conditions(records, "scenes")
    for other in ("parvts:fusion=fixed:alpha=1", "visionzip:contextual=0"):
        for budget in (args.budget, "25%", "6.25%"):
            if ("parvts", budget) in have and (other, budget) in have:
                for kinds in ({"background"}, {"periphery"}, None):
                    lines.append(diff_row(compare(records, ("parvts", budget), (other, budget), "scenes", kinds)))
    others = [(data, other) for data in sorted({r["data"] for r in records} - {"scenes", "scene-captions"})
              for other in ("parvts:fusion=fixed:alpha=1", "visionzip:contextual=0")
              if {("parvts", args.budget), (other, args.budget)} <= conditions(records, data)]
    if others:
        lines += ["", "The same on the other question sets (all kinds):", "", "| data " + DIFF_HEADER[0],
                  "|---" + DIFF_HEADER[1]]
        for data, other in others:
            lines.append(f"| {data} " + diff_row(compare(records, ("parvts", args.budget), (other, args.budget), data)))
    lines.append("")

    lines += matched(records, args.budget)

    # 3. ST3's annealing on long answers
    caps = [r for r in records if r["data"] == "scene-captions"]
    if caps:
        lines += ["## 3. ST³'s visual-token annealing on scene captions (field accuracy)", "",
                  "| condition | captions | fields right % [95 % CI] | subject % | background % | shapes % | KV % of unpruned |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for cond in sorted({(r["method"], r["budget"]) for r in caps}, key=lambda c: (c != REFERENCE, c)):
            rs = [r for r in caps if (r["method"], r["budget"]) == cond]
            fields = [ok for r in rs for ok in r.get("fields", {}).values()]
            lo, hi = wilson(sum(fields), len(fields))
            per = {f: sum(r["fields"][f] for r in rs) / len(rs) for f in ("subject", "background", "shapes")}
            kv = sum(r["relative_kv"] for r in rs) / len(rs)
            lines.append(f"| {cond[0]}@{cond[1]} | {len(rs)} | {pct(sum(fields) / len(fields))} [{pct(lo)}, {pct(hi)}] | "
                         f"{pct(per['subject'])} | {pct(per['background'])} | {pct(per['shapes'])} | {pct(kv)} |")
        lines += ["", "Paired, on the same scenes (a caption right = every field right):", ""] + DIFF_HEADER
        st3 = sorted({c for c in {(r["method"], r["budget"]) for r in caps} if c[0].startswith("st3")})
        off = next((c for c in st3 if "anneal=none" in c[0]), None)
        for cond in st3:
            lines.append(diff_row(compare(records, cond, REFERENCE, "scene-captions")))
            if off is not None and cond != off:
                lines.append(diff_row(compare(records, cond, off, "scene-captions")))
        said = {(r["method"], r["budget"], r["id"]): r["prediction"] for r in caps}
        ref = [p for (m, b, _), p in said.items() if (m, b) == REFERENCE]
        if ref:
            lines += ["", f"Unpruned captions: {sum(len(p.split()) for p in ref) / len(ref):.1f} words on average."]
        if off is not None:
            same = {c: [said.get((*c, i)) == p for (m, b, i), p in said.items() if (m, b) == off] for c in st3 if c != off}
            lines += [f"{c[0]}@{c[1]}: {sum(v)} of {len(v)} captions word for word those of {off[0]}@{off[1]}."
                      for c, v in same.items()]
        lines.append("")
    # 4. ST3's batched evictions (anneal_every = K) against per-step annealing on the other data sets
    pairs = [(data, (m, b), ("st3:anneal_every=1", b)) for data in sorted({r["data"] for r in records} - {"scene-captions"})
             for m, b in sorted(conditions(records, data))
             if m.startswith("st3:anneal_every=") and m != "st3:anneal_every=1"
             and ("st3:anneal_every=1", b) in conditions(records, data)]
    if pairs:
        lines += ["## 4. ST³'s batched evictions against per-step annealing (same questions)", "",
                  "| data " + DIFF_HEADER[0], "|---" + DIFF_HEADER[1]]
        for data, a, b in pairs:
            for other in (b, REFERENCE):
                lines.append(f"| {data} " + diff_row(compare(records, a, other, data)))
        lines.append("")
    lines += scene_forms(records, args.budget)
    text = "\n".join(line for line in lines if line is not None) + "\n"
    (out / "claims.md").write_text(text)
    print(text)

    # the grids of docs/results.md: method x budget per data set, and per question kind
    summary = summarize(records)
    budgets = tuple(b for b in BUDGETS if any(r["budget"] == b for r in summary))
    parts = ["\n".join(overview(summary)), "\n".join(retention(summary))]
    for data in sorted({r["data"] for r in summary}):
        for kind in ["all", *sorted({r["kind"] for r in summary if r["data"] == data} - {"all"})]:
            parts.append(grid(summary, data, kind, budgets))
    (out / "grid.md").write_text("\n".join(p for p in parts if p))
    print(f"wrote {out / 'claims.md'} and {out / 'grid.md'}")


if __name__ == "__main__":
    main()
