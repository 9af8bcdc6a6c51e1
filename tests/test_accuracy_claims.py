"""scripts/accuracy_claims.py's scene tables: accuracy per question kind x form, and the paired rows of a
ParVTS option sweep (a ``vtprune eval --kinds`` run) against the non-subject path off."""

from __future__ import annotations

from conftest import import_script

from vtprune.eval.runner import REFERENCE


def _records():
    out = []
    for i in range(8):  # 4 colour questions (open) and 4 yes/no background questions per condition
        answer = "red" if i < 4 else ("yes" if i % 2 else "no")
        for method, budget, right in ((*REFERENCE, True), ("parvts", "12.5%", i % 4 == 0),
                                      ("parvts:fusion=fixed:alpha=1", "12.5%", False),
                                      ("parvts:discard_layer=8", "12.5%", i < 4)):
            out.append({"data": "scenes", "id": f"s/{i}", "kind": "background", "method": method, "budget": budget,
                        "answer": answer, "correct": right, "prediction": answer if right else "?",
                        "visual_tokens": 196, "equivalent_budget": 42.0 if budget != "all" else 196.0,
                        "relative_flops": 1.0, "relative_kv": 1.0})
    return out


def test_scene_forms_split_the_open_question_from_yes_no_and_pair_the_sweep():
    claims = import_script("accuracy_claims")
    lines = claims.scene_forms(_records(), "12.5%")
    text = "\n".join(lines)
    assert "| condition | equiv. budget (tokens) | background open | background yes/no |" in text
    row = next(line for line in lines if line.startswith("| parvts@12.5% |"))
    assert "| 25.0 [" in row and ", 4 | 25.0 [" in row  # one of 4 right in each form
    none = next(line for line in lines if line.startswith("| none@all |"))
    assert none.count("100.0 [") == 2
    sweep = [line for line in lines if "parvts:discard_layer=8@12.5%" in line and "| background | open |" in line]
    assert len(sweep) == 2  # against the path off and against ParVTS's defaults
    assert "| 4 | 100.0 | 0.0 | +100.0" in sweep[0] and "| 4 / 0 |" in sweep[0]
    yes_no = next(line for line in lines if "parvts:discard_layer=8@12.5%" in line and "| background | yes/no |" in line)
    assert "| 4 | 0.0 | 0.0 | +0.0" in yes_no  # neither right on the yes / no questions


def test_scene_forms_is_empty_without_scenes():
    claims = import_script("accuracy_claims")
    assert claims.scene_forms([{**r, "data": "easy-vqa"} for r in _records()], "12.5%") == []


def test_matched_picks_each_baseline_at_the_closest_equivalent_budget_and_pairs_it():
    claims = import_script("accuracy_claims")
    records = []
    for i in range(10):
        for method, budget, equiv, right in ((*REFERENCE, 196.0, True), ("parvts", "12.5%", 42.0, i < 6),
                                             ("visionzip", "12.5%", 24.5, i < 2), ("visionzip", "42", 42.0, i < 9),
                                             ("fastv", "64", 64.0, True)):
            records.append({"data": "scenes", "id": f"s/{i}", "kind": "background", "method": method, "budget": budget,
                            "answer": "red", "correct": right, "prediction": "red" if right else "?",
                            "visual_tokens": 196, "equivalent_budget": equiv, "relative_flops": 1.0, "relative_kv": 1.0})
    lines = claims.matched(records, "12.5%")
    rows = [line for line in lines if line.startswith("| scenes | parvts@12.5% |")]
    assert [row.split(" | ")[2:4] for row in rows] == [["parvts", "12.5%"], ["fastv", "64"], ["visionzip", "42"]]
    assert rows[2].endswith("| 90.0 |")  # 9 of 10 right, as % of the unpruned 100 %
    pair = next(line for line in lines if "paired: parvts@12.5% - visionzip@42" in line)
    assert "-30.0 pp [" in pair  # 6 against 9 right on the same questions
    assert claims.matched([r for r in records if r["method"] != "none"], "12.5%")[4:] == [""]  # no unpruned: no rows


def test_overview_has_one_row_per_condition_and_only_whole_sets():
    claims = import_script("accuracy_claims")
    from vtprune.eval.tables import summarize

    records = []
    for data, n in (("imagenet-pope", 4), ("scenes", 6)):
        for i in range(n):
            for method, budget, equiv, right in ((*REFERENCE, 196.0, True), ("parvts", "12.5%", 42.0, i % 2 == 0),
                                                 ("fastv", "31", 42.0, i < 3), ("parvts:discard_layer=8", "12.5%",
                                                                               70.0, True)):
                if method == "parvts:discard_layer=8" and (data != "scenes" or i > 2):
                    continue  # a --kinds sweep: half of one set
                records.append({"data": data, "id": f"{data}/{i}", "kind": "k", "method": method, "budget": budget,
                                "answer": "yes", "correct": right, "prediction": "yes" if right else "no",
                                "visual_tokens": 196, "equivalent_budget": equiv, "relative_flops": equiv / 196,
                                "relative_kv": 1.0})
    lines = claims.overview(summarize(records))
    assert lines[2] == "| method @ budget | imagenet-pope | scenes | equiv. budget % | FLOPs % |"
    body = [line.split(" | ")[0] for line in lines[4:-1]]
    assert body == ["| none @ all", "| parvts @ 12.5%", "| fastv @ 31"]  # the partial sweep has no row
    parvts = lines[5]
    assert parvts == "| parvts @ 12.5% | 50.0 [15, 85] | 50.0 [19, 81] | 21.4 | 21.4 |"  # 2 of 4, 3 of 6 right
    assert claims.overview([]) == []


def test_retention_averages_accuracy_over_unpruned_across_sets_and_skips_partial_cells():
    claims = import_script("accuracy_claims")
    from vtprune.eval.tables import summarize

    records = []
    for data in ("imagenet-pope", "scenes"):
        for i in range(4):
            for method, budget, right, flops in ((*REFERENCE, i < 2, 1.0), ("fastv", "50%", i < 2, 0.6),
                                                 ("fastv", "12.5%", i < 1, 0.2), ("pool", "12.5%", i < 2, 0.2)):
                if method == "pool" and data == "scenes":
                    continue  # pool ran on one set only: no cell
                records.append({"data": data, "id": f"{data}/{i}", "kind": "k", "method": method, "budget": budget,
                                "answer": "yes", "correct": right, "prediction": "yes" if right else "no",
                                "visual_tokens": 196, "equivalent_budget": 98.0, "relative_flops": flops,
                                "relative_kv": 1.0})
    lines = claims.retention(summarize(records))
    assert lines[2] == "| method | 50% | 12.5% |"
    assert lines[4] == "| fastv | 100.0 / 60 | 50.0 / 20 |"  # 2 of 2 and 1 of 2 of the unpruned answers right
    assert lines[5] == "| pool |  |  |"
    assert claims.retention([]) == []
