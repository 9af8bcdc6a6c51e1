"""The accuracy runner (resumable JSONL records), the tables / plots, and ``vtprune eval`` end to end on
the bundled model with a few held-out ImageNet questions."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

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


def test_read_records_reads_a_gzip_copy_first_then_the_file_a_resumed_run_appends_to(tmp_path):
    import gzip

    path = tmp_path / "results.jsonl"
    (tmp_path / "results.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n{"a": 2}\n'))
    assert runner.read_records(path) == [{"a": 1}, {"a": 2}]  # only the compressed copy
    path.write_text('{"a": 3}\n{"a"')
    assert runner.read_records(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_read_records_counts_a_copy_unpacked_beside_its_gzip_once(tmp_path):
    """`gunzip -k` leaves results.jsonl beside results.jsonl.gz with the same lines; a resumed run then appends
    to the former. Every answer is read once, the appended ones after."""
    import gzip

    path = tmp_path / "results.jsonl"
    old = '{"data": "s", "id": "1", "method": "none", "budget": "all"}\n{"data": "s", "id": "2", "method": "none", "budget": "all"}\n'
    (tmp_path / "results.jsonl.gz").write_bytes(gzip.compress(old.encode()))
    path.write_text(old + '{"data": "s", "id": "1", "method": "fastv", "budget": "50%"}\n')
    keys = [runner.record_key(r) for r in runner.read_records(path)]
    assert keys == [("s", "1", "none", "all"), ("s", "2", "none", "all"), ("s", "1", "fastv", "50%")]


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


def test_cli_eval_kinds_answers_only_those_kinds_of_the_first_n(tmp_path, capsys):
    pytest.importorskip("vtprune.models.default", reason="bundled model packages not installed")
    from vtprune.eval import datasets

    first = datasets.load_dataset("scenes", "test", 9)
    want = {s.id for s in first if s.kind == "background"}
    assert 0 < len(want) < len(first)
    out = tmp_path / "ev"
    assert cli.main(["eval", "--data", "scenes", "--limit", "9", "--kinds", "background", "--methods", "pool",
                     "--budgets", "25%", "--out", str(out), "--no-progress", "--no-plots", "--batch", "4"]) == 0
    recs = runner.read_records(out / "results.jsonl")
    assert {r["id"] for r in recs} == want and {r["kind"] for r in recs} == {"background"}
    assert len(recs) == 2 * len(want)  # unpruned + pool


@pytest.mark.parametrize("argv,match", [
    (["--data", "scenes", "--limit", "9", "--kinds", "colour"],
     "--kinds colour: no sample of scenes has that kind; the kinds present are background, periphery, subject"),
    (["--data", "scenes,imagenet-pope", "--limit", "9", "--kinds", "background"],
     "data set 'imagenet-pope' has no sample of the kinds background"),
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


# ------------------------------------------------------------------------ resume integrity (record identity)
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaVA checkpoint with its processor: ``vtprune eval --model DIR`` answers in ~1 s."""
    from conftest import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def pope_data():
    from vtprune.eval.datasets import default_data_root

    if not (default_data_root() / "imagenet-sample").is_dir():
        pytest.skip(f"../shared/data not found at {default_data_root()}")


def _eval(tiny_dir, out, *extra, limit=3):
    return cli.main(["eval", "--data", "imagenet-pope", "--limit", str(limit), "--methods", "pool@default,fastv",
                     "--budgets", "25%", "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--no-plots",
                     "--max-new-tokens", "2", "--batch", "2", *extra])


def test_resume_refuses_other_settings_and_mixes_nothing(tiny_dir, pope_data, tmp_path, capsys, monkeypatch):
    import shutil

    from vtprune.eval.datasets import DATASETS
    from vtprune.methods.pool import Pool

    out = tmp_path / "ev"
    results = out / "results.jsonl"
    assert _eval(tiny_dir, out) == 0
    first = results.read_bytes()
    records = runner.read_records(results)
    assert len(records) == 9
    s = records[0]["settings"]
    assert (s["model"], s["dtype"], s["do_sample"], s["max_new_tokens"]) == (str(tiny_dir.resolve()), "float32", False, 2)
    assert (s["split"], s["seed"], s["data_version"]) == ("test", 0, 1) and len(s["sample"]) == 16
    pool = next(r for r in records if r["method"] == "pool")
    assert (pool["budget"], pool["options"]) == ("default", {"budget": None, "keep_ratio": 0.25})
    capsys.readouterr()

    # the same settings (another batch size too: batched answers equal one-by-one answers) skip everything
    assert _eval(tiny_dir, out, "--batch", "1") == 0
    assert "9 records already in" in capsys.readouterr().err and results.read_bytes() == first

    def refused(*extra, match):
        assert _eval(tiny_dir, out, *extra) == 2
        err = capsys.readouterr().err
        assert match in err and "another --out, or add --beside" in err, err
        assert results.read_bytes() == first  # nothing appended, nothing rewritten

    other = shutil.copytree(tiny_dir, tmp_path / "other-model")
    refused("--model", str(other), match=f"model '{tiny_dir.resolve()}' there, '{other.resolve()}' here")
    refused("--max-new-tokens", "3", match="max_new_tokens of imagenet-pope 2 there, 3 here (9 records)")
    refused("--seed", "1", match="seed of imagenet-pope 0 there, 1 here")
    with monkeypatch.context() as m:  # a changed method default changes what pool@default means
        m.setattr(Pool, "default_keep_ratio", 0.5)
        refused(match='options of pool@default {"budget": null, "keep_ratio": 0.25} there, '
                      '{"budget": null, "keep_ratio": 0.5} here (3 records)')
    with monkeypatch.context() as m:  # a data set whose builder changed (its version raised)
        m.setitem(DATASETS, "imagenet-pope", dataclasses.replace(DATASETS["imagenet-pope"], version=2))
        refused(match="data_version of imagenet-pope 1 there, 2 here")
    # a sample whose content changed since (simulated by editing one record's fingerprint)
    changed = out.parent / "changed"
    changed.mkdir()
    edited = [dict(r, settings=dict(r["settings"], sample="0" * 16)) if i == 4 else r for i, r in enumerate(records)]
    (changed / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    assert _eval(tiny_dir, changed) == 2
    assert ("samples of imagenet-pope changed since they were answered (question, answer, kind, meta or image): "
            f"1 record, the first of sample {records[4]['id']!r}") in capsys.readouterr().err

    # --beside: the first sibling folder with these settings (or none); a rerun finds and resumes it
    assert _eval(tiny_dir, out, "--max-new-tokens", "3", "--beside") == 0
    assert f"writing beside it, in {out}-2" in capsys.readouterr().err
    assert results.read_bytes() == first
    beside = runner.read_records(tmp_path / "ev-2" / "results.jsonl")
    assert len(beside) == 9 and {r["settings"]["max_new_tokens"] for r in beside} == {3}
    assert _eval(tiny_dir, out, "--max-new-tokens", "3", "--beside") == 0
    assert "9 records already in" in capsys.readouterr().err and not (tmp_path / "ev-3").exists()


def test_resume_refuses_records_without_settings(tiny_dir, pope_data, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    row = {"data": "imagenet-pope", "id": "x", "kind": "k", "method": "none", "budget": "all", "prediction": "yes",
           "correct": True}
    (old / "results.jsonl").write_text(json.dumps(row) + "\n")
    assert _eval(tiny_dir, old) == 2
    err = capsys.readouterr().err
    assert "holds 1 records written without their settings" in err and "--tables-only" in err
    assert runner.read_records(old / "results.jsonl") == [row]


def test_sample_fingerprint_is_the_content_not_the_path(tmp_path):
    from PIL import Image

    from vtprune.eval.datasets import Sample

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    image.save(a)
    image.save(b)
    sample = Sample("1", str(a), "Is there a cat?", "yes", "yes/no")
    assert sample.fingerprint() == dataclasses.replace(sample, image=str(b)).fingerprint()
    assert sample.fingerprint() != dataclasses.replace(sample, answer="no").fingerprint()
    assert sample.fingerprint() != dataclasses.replace(sample, meta={"label": "cat"}).fingerprint()
    in_memory = dataclasses.replace(sample, image=image)
    assert in_memory.fingerprint() != dataclasses.replace(sample, image=Image.new("RGB", (8, 8))).fingerprint()
    Image.new("RGB", (8, 8)).save(b)
    assert sample.fingerprint() != dataclasses.replace(sample, image=str(b)).fingerprint()


# ------------------------------------------------------------------------------------------ data-parallel
def test_shard_from_env_and_rank_device():
    from vtprune.eval.parallel import Shard, rank_device, shard_from_env

    assert shard_from_env({}) == Shard(0, 1, 0)
    two = shard_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert two == Shard(1, 2, 1) and [i for i in range(7) if two.owns(i)] == [1, 3, 5]
    assert rank_device(two, "cuda") == "cuda:1" and rank_device(two, "cpu") == "cpu"
    assert rank_device(Shard(), "cuda:3") == "cuda:3"
    with pytest.raises(ValueError, match="names one GPU for 2 processes"):
        rank_device(two, "cuda:0")
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT not set: start the processes with torchrun"):
        shard_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="RANK='x' is not an int"):
        shard_from_env({"RANK": "x"})


def test_torchrun_two_ranks_resume_an_interrupted_run_as_one_process_does(tiny_dir, pope_data, tmp_path):
    """2 CPU ranks under torchrun raise the limit of a one-process run (3 -> 7 samples, odd: uneven shards)
    that an interrupted data-parallel run left a partial file beside (two records and a cut line): the ranks
    skip what the results and the partial file hold, answer the rest, and rank 0 merges; the file equals a
    one-process run's with the same history, record for record and in order."""
    import os
    import subprocess
    import sys

    import vtprune

    reference, out = tmp_path / "reference", tmp_path / "parallel"
    assert _eval(tiny_dir, reference, limit=3) == 0
    assert _eval(tiny_dir, reference, limit=7) == 0
    expected = runner.read_records(reference / "results.jsonl")
    assert len(expected) == 21
    assert _eval(tiny_dir, out, limit=3) == 0
    # an interrupted run's partial file: the first two records the raised limit adds, answered otherwise (so
    # that a recomputation would show), and a line cut mid-write
    left = [dict(r, prediction=f"kept {i}") for i, r in enumerate(expected[9:11])]
    expected[9:11] = left
    (out / "results.rank1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in left) + json.dumps(expected[11])[:40])

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(vtprune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    argv = ["eval", "--data", "imagenet-pope", "--limit", "7", "--methods", "pool@default,fastv", "--budgets", "25%",
            "--model", str(tiny_dir), "--out", str(out), "--no-progress", "--no-plots", "--max-new-tokens", "2",
            "--batch", "2"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vtprune.cli", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2: 11 records already in" in done.stderr and "rank 1 of 2: 11 records already in" in done.stderr
    assert "merged 2 records of an interrupted run's ranks" in done.stderr
    assert "merged 10 records of 2 ranks" in done.stderr  # 21 - 9 - 2: the rest, answered by the ranks
    assert runner.read_records(out / "results.jsonl") == expected
    assert sorted(p.name for p in out.iterdir()) == ["command.txt", "results.csv", "results.jsonl", "results.md"]


def test_model_identity_names_the_weights_without_loading_them(tmp_path, monkeypatch):
    import torch

    from vtprune.inputs import model_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    assert model_identity("ckpt", torch.bfloat16) == {"model": str(tmp_path / "ckpt"), "model_revision": None,
                                                      "dtype": "bfloat16"}
    assert model_identity("org/name", torch.float32)["model"] == "org/name"
    default = pytest.importorskip("vtprune.models.default", reason="bundled model packages not installed")
    bundled = model_identity(None, torch.float32)
    assert bundled == model_identity("default", torch.float32)
    assert bundled["model"] == default.DEFAULT_MODEL_ID and len(bundled["model_revision"]) == 16
    # the fingerprint follows the trained files: another projector, another revision
    monkeypatch.setattr(default, "PROJECTOR_PATH", tmp_path / "missing.safetensors")
    assert model_identity(None, torch.float32)["model_revision"] != bundled["model_revision"]


def test_one_process_merges_the_partial_files_of_an_interrupted_parallel_run(tiny_dir, pope_data, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert _eval(tiny_dir, reference, limit=2) == 0 and _eval(tiny_dir, reference, limit=3) == 0
    assert _eval(tiny_dir, out, limit=2) == 0
    (out / "results.jsonl").rename(out / "results.rank1.jsonl")  # every answer still in a rank's partial file
    assert cli.main(["eval", "--tables-only", "--out", str(out), "--no-plots"]) == 2
    assert "results.rank1.jsonl beside" in capsys.readouterr().err
    assert _eval(tiny_dir, out, limit=3) == 0
    err = capsys.readouterr().err
    assert "merged 6 records of an interrupted run's ranks" in err and "6 records already in" in err
    assert runner.read_records(out / "results.jsonl") == runner.read_records(reference / "results.jsonl")
    assert not (out / "results.rank1.jsonl").exists()
