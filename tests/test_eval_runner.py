"""The accuracy runner (resumable JSONL records), the tables / plots, and ``vtprune eval`` end to end on
the bundled model with a few held-out ImageNet questions."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vtprune import cli
from vtprune.eval import runner, tables
from vtprune.eval.runner import Condition, conditions
from vtprune.methods import parse_budget


@pytest.mark.parametrize("text,label,opts", [
    ("25%", "25%", {"keep_ratio": 0.25}), ("12.5%", "12.5%", {"keep_ratio": 0.125}), ("64", "64", {"budget": 64}),
    ("default", "default", {}), (" 100% ", "100%", {"keep_ratio": 1.0}),
])
def test_parse_budget(text, label, opts):
    assert parse_budget(text) == (label, opts)


@pytest.mark.parametrize("text", ["0%", "101%", "x%", "half", "1.5"])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_conditions_put_the_unpruned_reference_first_once():
    conds = conditions(["none", "parvts", "pool"], ["25%", "64"])
    assert conds[0] == Condition("none", "all")
    assert [(c.method, c.budget) for c in conds[1:]] == [("parvts", "25%"), ("parvts", "64"), ("pool", "25%"),
                                                        ("pool", "64")]
    assert dict(conds[2].options) == {"budget": 64}
    with pytest.raises(ValueError, match="accepted: .*fastv"):
        conditions(["fastvv"], ["25%"])


def _record(data, sid, kind, method, budget, pred, correct, eq=196.0, flops=1.0):
    return {"data": data, "id": sid, "kind": kind, "method": method, "budget": budget, "prediction": pred,
            "correct": correct, "visual_tokens": 196, "equivalent_budget": eq, "relative_flops": flops,
            "relative_kv": flops}


def test_summarize_accuracy_agreement_and_kinds():
    recs = [
        _record("d", "1", "subject", "none", "all", "Yes", True),
        _record("d", "2", "background", "none", "all", "red", False),
        _record("d", "1", "subject", "pool", "25%", "yes.", True, eq=49, flops=0.4),
        _record("d", "2", "background", "pool", "25%", "blue", True, eq=49, flops=0.6),
    ]
    rows = {(r["kind"], r["method"]): r for r in tables.summarize(recs)}
    assert rows[("all", "none")]["accuracy"] == 0.5 and rows[("all", "none")]["agreement"] == 1.0
    pool = rows[("all", "pool")]
    assert pool["accuracy"] == 1.0 and pool["agreement"] == 0.5  # "yes." == "Yes" after normalisation
    assert pool["equivalent_budget_pct"] == pytest.approx(25.0) and pool["relative_flops"] == pytest.approx(0.5)
    assert rows[("background", "pool")]["n"] == 1 and rows[("background", "pool")]["agreement"] == 0.0
    first = tables.summarize(recs)[0]
    assert (first["kind"], first["method"]) == ("all", "none")
    md = tables.markdown(tables.summarize(recs))
    assert "| all | pool | 25% | 2 | 100.0 [34.2, 100.0] | 50.0 | 49.0 (25.0 %) | 50.0 | 50.0 |" in md


def test_grid_is_method_by_budget_with_intervals_and_other_budgets():
    recs = [
        _record("d", "1", "subject", "none", "all", "Yes", True),
        _record("d", "2", "subject", "none", "all", "No", True),
        _record("d", "1", "subject", "pool", "25%", "Yes", True, eq=49, flops=0.4),
        _record("d", "2", "subject", "pool", "25%", "Yes", False, eq=49, flops=0.4),
        _record("d", "1", "subject", "pool", "default", "Yes", True, eq=98, flops=0.6),
    ]
    text = tables.grid(tables.summarize(recs), "d")
    assert text.startswith("d, all (unpruned 100.0 % [34.2, 100.0], n = 2):")
    assert "| method | 50% | 25% | 12.5% | 6.25% | other |" in text
    assert "| pool |  | 50.0 [9, 91] / 50 / 25 |  |  | default: 100.0 [21, 100] / 100 / 50 |" in text
    assert tables.grid(tables.summarize(recs), "other-set") == ""


def test_read_records_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"a": ')
    assert runner.read_records(path) == [{"a": 1}]
    assert runner.read_records(tmp_path / "missing.jsonl") == []


@pytest.fixture(scope="module")
def bundled():
    default = pytest.importorskip("vtprune.models.default", reason="bundled model packages not installed")
    return default.load_default()


@pytest.fixture(scope="module")
def samples():
    from vtprune.eval.datasets import load_dataset

    try:
        return load_dataset("imagenet-pope", limit=3)
    except FileNotFoundError as e:
        pytest.skip(f"../shared/data not found: {e}")


def test_run_eval_resumes_and_batched_equals_one_by_one(bundled, samples, tmp_path):
    model, processor = bundled
    conds = conditions(["parvts", "visionzip"], ["12.5%"])
    path = tmp_path / "results.jsonl"
    recs = runner.run_eval(model, processor, {"imagenet-pope": samples}, conds, path, batch_size=3, progress=False,
                           log=lambda m: None)
    assert len(recs) == 9 and len(path.read_text().splitlines()) == 9
    assert {r["method"] for r in recs} == {"none", "parvts", "visionzip"}
    assert all(r["equivalent_budget"] < 196 for r in recs if r["method"] != "none")
    assert all(r["relative_flops"] < 1 for r in recs if r["method"] != "none")
    # resume: nothing left to do, nothing appended
    again = runner.run_eval(model, processor, {"imagenet-pope": samples}, conds, path, batch_size=3,
                            progress=False, log=lambda m: None)
    assert again == recs
    # an interrupted run: drop the last two records and cut the file mid-line; the rerun completes it
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    redone = runner.run_eval(model, processor, {"imagenet-pope": samples}, conds, path, batch_size=1,
                             progress=False, log=lambda m: None)
    assert len(redone) == 9
    key = runner.record_key
    assert {key(r): r["prediction"] for r in redone} == {key(r): r["prediction"] for r in recs}


def test_cli_eval_writes_tables_and_plots(tmp_path, capsys):
    pytest.importorskip("vtprune.models.default", reason="bundled model packages not installed")
    out = tmp_path / "ev"
    code = cli.main(["eval", "--data", "imagenet-pope", "--limit", "2", "--methods", "pool", "--budgets", "25%",
                     "--out", str(out), "--no-progress", "--batch", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| all | pool | 25% | 2 |" in printed
    assert (out / "results.csv").read_text().startswith(",".join(tables.COLUMNS))
    assert len(runner.read_records(out / "results.jsonl")) == 4
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    # records of another data set in the same results.jsonl: an eval run tables its own sets only,
    # --tables-only tables every record (or --data's), answering nothing
    other = [{**r, "data": "scenes", "id": f"x{r['id']}"} for r in runner.read_records(out / "results.jsonl")]
    with (out / "results.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in other)
    (out / "results.csv").unlink()
    assert cli.main(["eval", "--tables-only", "--out", str(out), "--no-plots"]) == 0
    csv = (out / "results.csv").read_text()
    assert "\nimagenet-pope," in csv and "\nscenes," in csv
    assert cli.main(["eval", "--tables-only", "--out", str(out), "--data", "scenes", "--no-plots"]) == 0
    assert "\nimagenet-pope," not in (out / "results.csv").read_text()


@pytest.mark.parametrize("argv,match", [
    (["--data", "nope"], "unknown data set 'nope'"),
    (["--data", "imagenet-pope", "--methods", "fastvv"], "unknown method 'fastvv'"),
    (["--data", "imagenet-pope", "--budgets", "half"], "budget 'half'"),
    (["--data", "imagenet-pope", "--batch", "0"], "--batch must be >= 1"),
    ([], "--data is required"),
    (["--tables-only"], "--tables-only needs --out"),
    (["--tables-only", "--out", "/nonexistent/ev"], "no records in /nonexistent/ev/results.jsonl"),
])
def test_cli_eval_bad_input_is_a_one_line_error(argv, match, capsys):
    assert cli.main(["eval", *argv]) == 2
    assert match in capsys.readouterr().err


def test_wilson_interval_mcnemar_and_paired_difference():
    from vtprune.eval.stats import mcnemar, paired_difference, wilson

    lo, hi = wilson(8, 10)  # the textbook example: 0.490-0.943
    assert round(lo, 3) == 0.490 and round(hi, 3) == 0.943
    assert wilson(0, 20)[0] == 0.0 and 0.0 < wilson(0, 20)[1] < 0.2 and wilson(5, 5)[1] == 1.0
    assert round(mcnemar(10, 2), 4) == 0.0386 and mcnemar(0, 0) == 1.0 and mcnemar(3, 3) == 1.0
    a = [True] * 30 + [False] * 10
    b = [True] * 20 + [False] * 20
    d = paired_difference(a, b)
    assert d["difference"] == 0.25 and d["only_a"] == 10 and d["only_b"] == 0
    assert d["low"] < 0.25 < d["high"] and d["low"] > 0 and d["p_mcnemar"] < 0.01
    assert paired_difference(a, b) == d  # seeded


def test_tables_carry_intervals_and_compare_pairs():
    rows = [{"data": "d", "id": str(i), "kind": "k", "method": m, "budget": bud, "prediction": "yes",
             "correct": ok, "equivalent_budget": 4.0, "visual_tokens": 16, "relative_flops": 0.5, "relative_kv": 0.5}
            for i in range(20) for m, bud, ok in (("none", "all", True), ("fastv", "25%", i % 2 == 0))]
    summary = tables.summarize(rows)
    fastv = next(r for r in summary if r["method"] == "fastv" and r["kind"] == "all")
    assert fastv["accuracy"] == 0.5 and fastv["accuracy_low"] < 0.5 < fastv["accuracy_high"]
    assert "[" in tables.markdown(summary)
    c = tables.compare(rows, ("none", "all"), ("fastv", "25%"), "d")
    assert c["n"] == 20 and c["difference"] == 0.5 and c["only_a"] == 10 and c["p_mcnemar"] < 0.01


def test_caption_fields_are_kinds_of_their_own_in_the_tables():
    base = {"data": "scene-captions", "kind": "caption", "method": "none", "budget": "all", "prediction": "x",
            "equivalent_budget": 196.0, "visual_tokens": 196, "relative_flops": 1.0, "relative_kv": 1.0}
    records = [dict(base, id="0", correct=False, fields={"subject": True, "background": False, "shapes": True}),
               dict(base, id="1", correct=True, fields={"subject": True, "background": True, "shapes": True})]
    rows = {r["kind"]: r for r in tables.summarize(records)}
    assert rows["caption"]["accuracy"] == 0.5 and rows["caption"]["n"] == 2
    assert rows["caption:subject"]["accuracy"] == 1.0 and rows["caption:background"]["accuracy"] == 0.5
    assert rows["caption:fields"]["n"] == 6 and rows["caption:fields"]["accuracy"] == 5 / 6
    assert rows["all"]["n"] == 2  # a record counts once in "all"
