"""The lmms-eval plugin end to end: ``vtprune_llava_hf`` registered through lmms-eval's entry-point group,
evaluated by lmms-eval's ``simple_evaluate`` on the local ``vtprune_pope_local`` task (YAML + utils.py,
data from ``../shared/data``) with the bundled real-weight model (parvts at 49 of 196 tokens vs none) and
with a tiny random LLaVA saved as a checkpoint; model_args errors; the task's data builder and scorer.

Skipped only when lmms-eval is not importable (``pip install --no-deps lmms-eval==0.7.3`` + its light
dependencies, see the ``lmms`` extra).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `lmms` extra)")

from conftest import N_VISUAL, tiny_checkpoint  # noqa: E402

from vtprune.lmms_eval_plugin import MODEL_ID, manifests  # noqa: E402
from vtprune.lmms_eval_plugin.mixin import rank_report_path  # noqa: E402
from vtprune.lmms_eval_plugin.options import parse_model_value, summarize  # noqa: E402
from vtprune.lmms_eval_tasks import (  # noqa: E402
    POPE_LOCAL_JSONL,
    POPE_LOCAL_TASK,
    TASKS_DIR,
    pope_local,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
N_DOCS = 3  # questions per evaluation (bundled model: about 1 s each on 2 idle CPU cores)
ENTRY_POINT = "vtprune = vtprune.lmms_eval_plugin:manifests"


def _has_entry_point() -> bool:
    return any(ep.value == "vtprune.lmms_eval_plugin:manifests"
               for ep in importlib.metadata.entry_points(group="lmms_eval.models"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A working directory holding the task's JSONL (first POPE 'random' questions with a local photo),
    lmms-eval's datasets cache under tmp, and ``vtprune_llava_hf`` registered through the entry-point
    group: the installed one (``pyproject.toml``), or else a ``*.dist-info`` declaring the same entry point
    put on ``sys.path`` and loaded by lmms-eval's own ``load_entrypoint_manifests``."""
    work = tmp_path_factory.mktemp("lmms")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(work / "datasets"))
        mp.chdir(work)
        pope_local.build_jsonl(work / POPE_LOCAL_JSONL, DATA, limit=N_DOCS, files=("random",))
        import lmms_eval.models as models

        if not _has_entry_point():
            site = work / "site"
            dist = site / "vtprune_lmms_plugin_test-0.dist-info"
            dist.mkdir(parents=True)
            (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vtprune-lmms-plugin-test\nVersion: 0\n")
            (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
            mp.syspath_prepend(str(site))
            importlib.invalidate_caches()
            assert _has_entry_point()
            models.MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)
        yield work


@pytest.fixture(scope="module")
def task_manager(env):
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(TASKS_DIR), include_defaults=False)


def evaluate(task_manager, model_args: str, tasks=(POPE_LOCAL_TASK,), model: str = MODEL_ID, **kwargs) -> dict:
    from lmms_eval.evaluator import simple_evaluate

    kwargs.setdefault("limit", N_DOCS)
    return simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=task_manager,
                           device="cpu", log_samples=True, bootstrap_iters=0, **kwargs)


def check_results(results: dict, n: int, task: str = POPE_LOCAL_TASK) -> dict:
    """The task's metrics and samples are there and agree with the scorer; returns lmms-eval's
    throughput section."""
    metrics = results["results"][task]
    assert 0.0 <= metrics["accuracy,none"] <= 1.0 and 0.0 <= metrics["yes_ratio,none"] <= 1.0
    samples = results["samples"][task]
    assert len(samples) == n
    parse = pope_local_utils().parse_yes_no
    for s in samples:
        assert s["accuracy"] == float(parse(s["filtered_resps"][0]) == s["doc"]["answer"])
    assert metrics["accuracy,none"] == pytest.approx(sum(s["accuracy"] for s in samples) / n)
    return results["throughput"]


def pope_local_utils():
    spec = importlib.util.spec_from_file_location("vtprune_pope_local_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------- registration
def test_registered_through_entry_point(env):
    from lmms_eval.models import get_model, get_model_manifest

    from vtprune.lmms_eval_plugin.llava_hf import VTPruneLlavaHf, VTPruneLlavaHfSimple

    (manifest,) = [m for m in manifests() if m.model_id == MODEL_ID]  # the Qwen ids: test_lmms_eval_families
    assert get_model_manifest(MODEL_ID) == manifest
    assert get_model(MODEL_ID) is VTPruneLlavaHf  # chat interface by default, as --model llava_hf
    assert get_model(MODEL_ID, force_simple=True) is VTPruneLlavaHfSimple
    from lmms_eval.models.chat.llava_hf import LlavaHf as Chat
    from lmms_eval.models.simple.llava_hf import LlavaHf as Simple

    from vtprune.lmms_eval_plugin.mixin import VTPruneMixin

    for cls, stock in ((VTPruneLlavaHf, Chat), (VTPruneLlavaHfSimple, Simple)):
        # the mixin wraps the stock class's methods (it comes first in the MRO) and copies none of them
        assert cls.__mro__.index(VTPruneMixin) < cls.__mro__.index(stock)
        assert not [name for name, value in vars(cls).items() if callable(value)]


# ---------------------------------------------------------------------------------------- bundled model
@pytest.mark.real
def test_bundled_model_parvts_vs_none(env, task_manager):
    report = env / "parvts.jsonl"
    # 2 new tokens: the answer word and the newline that ends it (generation_kwargs override the YAML's 4)
    base = evaluate(task_manager, "pretrained=vtprune-default,method=none", gen_kwargs="max_new_tokens=2")
    pruned = evaluate(task_manager, f"pretrained=vtprune-default,method=parvts,budget=49,discard_layer=3,"
                                    f"vtprune_report={report}", gen_kwargs="max_new_tokens=2")
    t0, t1 = check_results(base, N_DOCS), check_results(pruned, N_DOCS)
    # every sample was answered (an error inside generate would raise, not score an empty answer)
    assert all(s["resps"][0][0].strip() for s in pruned["samples"][POPE_LOCAL_TASK])
    assert t0["avg_vtprune_requests"] == t1["avg_vtprune_requests"] == N_DOCS
    assert t0["avg_vtprune_visual_tokens_in"] == t1["avg_vtprune_visual_tokens_in"] == 196
    assert t0["avg_vtprune_equivalent_budget"] == 196 and t0["avg_vtprune_prefill_flops_ratio"] == 1.0
    # ParVTS: 3 layers see both paths (196 tokens), the other 27 the 49 subjects -> 63.7 on average
    assert t1["avg_vtprune_equivalent_budget"] == pytest.approx((3 * 196 + 27 * 49) / 30)
    assert t1["avg_vtprune_final_budget"] == 49
    assert t1["avg_vtprune_prefill_flops_ratio"] < 0.7 and t1["avg_vtprune_kv_cache_ratio"] < 0.7
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == N_DOCS and {(r["method"], r["task"]) for r in rows} == {("parvts", POPE_LOCAL_TASK)}
    assert all(r["options"]["budget"] == 49 and r["samples"][0]["final_budget"] == 49 for r in rows)
    assert summarize(rows)["equivalent_budget"] == pytest.approx(t1["avg_vtprune_equivalent_budget"])


# ---------------------------------------------------------------------------------------- tiny random model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def two_tasks(env):
    """A second task defined the documented way: a YAML that includes the packaged one and reads another
    JSONL by absolute path; returns a task manager that indexes both folders."""
    from lmms_eval.tasks import TaskManager

    folder = env / "tasks"
    folder.mkdir()
    data = pope_local.build_jsonl(env / "adversarial.jsonl", DATA, limit=2, files=("adversarial",))
    (folder / "b.yaml").write_text(f"include: {TASKS_DIR / 'vtprune_pope_local.yaml'}\ntask: {TASK_B}\n"
                                   f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    return TaskManager("WARNING", include_path=[str(TASKS_DIR), str(folder)], include_defaults=False)


TASK_B = "vtprune_pope_local_b"


@pytest.mark.parametrize("force_simple", [False, True], ids=["chat", "simple"])
def test_tiny_random_model(env, two_tasks, tiny_dir, force_simple):
    report = env / f"tiny-{force_simple}.jsonl"
    results = evaluate(two_tasks, f"pretrained={tiny_dir},method=fastv,budget=4,layer=2,vtprune_report={report}",
                       tasks=(POPE_LOCAL_TASK, TASK_B), limit=2, force_simple=force_simple)
    t = check_results(results, 2)
    check_results(results, 2, TASK_B)
    assert [s["doc"]["category"] for s in results["samples"][TASK_B]] == ["adversarial"] * 2
    assert t["avg_vtprune_visual_tokens_in"] == N_VISUAL and t["avg_vtprune_final_budget"] == 4
    # layers 0-1 see 16 tokens, layers 2-5 the 4 kept
    assert t["avg_vtprune_equivalent_budget"] == pytest.approx((2 * 16 + 4 * 4) / 6)
    assert results["config"]["model_backend"].endswith("(simple)" if force_simple else "(chat)")
    # one report per request, tagged with its task (the stock loop runs once per task)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["task"] for r in rows) == sorted([POPE_LOCAL_TASK, TASK_B] * 2)
    assert all(r["samples"][0]["visual_tokens_per_layer_prefill"] == [16, 16, 4, 4, 4, 4] for r in rows)


def test_two_ranks_under_torchrun_aggregate_every_request_and_write_a_report_per_rank(env, tiny_dir, tmp_path):
    """lmms-eval data-parallel on 2 CPU ranks (torchrun, gloo), as on several GPUs: 5 questions, so rank 0
    answers 3 and rank 1 answers 2 plus the padding request lmms-eval adds to even them out. The throughput
    metrics cover the 5 real requests of both ranks, and each rank writes its own report file."""
    work = tmp_path / "run"
    work.mkdir()
    pope_local.build_jsonl(work / POPE_LOCAL_JSONL, DATA, limit=5, files=("random",))
    report = tmp_path / "reports" / "fastv.jsonl"
    src = Path(__file__).resolve().parents[1] / "src"
    path = [str(src), *([str(env / "site")] if (env / "site").is_dir() else []), os.environ.get("PYTHONPATH", "")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval",
         "--model", MODEL_ID, "--model_args",
         f"pretrained={tiny_dir},method=fastv,budget=4,layer=2,device_map=cpu,vtprune_report={report}",
         "--tasks", POPE_LOCAL_TASK, "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "1",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=work, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "OMP_NUM_THREADS": "1",
             "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not report.exists()  # each rank writes its own file
    rows = [[json.loads(line) for line in rank_report_path(report, rank, 2).read_text().splitlines()]
            for rank in (0, 1)]
    assert [len(r) for r in rows] == [3, 2]  # rank 1's padding request ran but is not reported
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    (samples_file,) = (tmp_path / "out").rglob(f"*_samples_{POPE_LOCAL_TASK}.jsonl")
    assert len(samples_file.read_text().splitlines()) == 5
    t = results["throughput"]
    assert t["avg_vtprune_requests"] == 5  # both ranks' requests, not rank 0's 3
    every = summarize(rows[0] + rows[1])
    for key in ("prefill_flops_ratio", "kv_cache_ratio", "equivalent_budget", "visual_tokens_in"):
        assert t[f"avg_vtprune_{key}"] == pytest.approx(every[key]), key
    assert t["avg_vtprune_equivalent_budget"] == pytest.approx((2 * 16 + 4 * 4) / 6)


def test_rank_report_path():
    assert rank_report_path(Path("r/fastv.jsonl"), 0, 1) == Path("r/fastv.jsonl")
    assert rank_report_path(Path("r/fastv.jsonl"), 1, 8) == Path("r/fastv.rank1.jsonl")
    assert rank_report_path(Path("r/report"), 0, 2) == Path("r/report.rank0.jsonl")


def test_list_option_and_errors_inside_generate(env, task_manager, tiny_dir, monkeypatch):
    from lmms_eval.models import get_model

    from vtprune.engine.lifecycle import Lifecycle

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # transformers' default (hub kernels on from 5.25)
    lm = get_model(MODEL_ID).create_from_arg_string(f"pretrained={tiny_dir},method=pdrop,layers=[2,4],ratio=0.5",
                                                    {"device": "cpu"})
    assert lm.vtprune_options == {"layers": [2, 4], "ratio": 0.5}
    # the stock class's from_pretrained ran without hub kernels, and the variable is unset again
    assert not lm.model.use_kernels and "USE_HUB_KERNELS" not in os.environ

    def boom(self, *args, **kwargs):
        raise ValueError("injected failure")
    monkeypatch.setattr(Lifecycle, "start", boom)
    from lmms_eval.evaluator import simple_evaluate

    # the stock loop logs the error and would score an empty answer; the plugin raises after the loop
    with pytest.raises(RuntimeError, match="generation failed under vtprune method 'pdrop'.*injected failure"):
        simple_evaluate(model=lm, tasks=[POPE_LOCAL_TASK], task_manager=task_manager, limit=1, bootstrap_iters=0)
    assert "generate" not in lm.model.__dict__  # detached: the stock generate again


# ---------------------------------------------------------------------------------------- model_args errors
@pytest.mark.parametrize("args, error, message", [
    ("method=nope", ValueError, "unknown method 'nope'; accepted: "),
    ("method=parvts,budget=49,no_such_option=1", TypeError,
     r"vtprune_llava_hf: method 'parvts' has no option\(s\) \['no_such_option'\]; its options are \[.*\]; "
     r"the other model_args it accepts are \[.*'attn_implementation'.*'pretrained'"),
    ("method=none,budget=4", TypeError, r"method 'none' has no option\(s\) \['budget'\]"),
])
def test_bad_method_or_option_fails_before_loading(env, args, error, message):
    from lmms_eval.models import get_model

    # the checkpoint does not exist: the vtprune error must come first, before any loading
    with pytest.raises(error, match=message):
        get_model(MODEL_ID).create_from_arg_string(f"pretrained=/no/such/checkpoint,{args}", {"device": "cpu"})


def test_budget_out_of_range_for_the_model(env, tiny_dir):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="budget must be"):
        get_model(MODEL_ID).create_from_arg_string(f"pretrained={tiny_dir},method=fastv,budget={N_VISUAL + 1}",
                                                   {"device": "cpu"})
    with pytest.raises(ValueError, match="parvts: give one of budget .* not both"):
        get_model(MODEL_ID).create_from_arg_string(f"pretrained={tiny_dir},method=parvts,budget=4,keep_ratio=0.5",
                                                   {"device": "cpu"})
    with pytest.raises(ValueError, match="discard_layer"):
        get_model(MODEL_ID).create_from_arg_string(f"pretrained={tiny_dir},method=parvts,budget=4,discard_layer=6",
                                                   {"device": "cpu"})


def test_bundled_model_needs_the_chat_interface(env):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="needs lmms-eval's chat interface"):
        get_model(MODEL_ID, force_simple=True).create_from_arg_string("pretrained=vtprune-default,method=none",
                                                                      {"device": "cpu"})


@pytest.mark.parametrize("value, parsed", [
    ("[8,16,24]", [8, 16, 24]), ("[8]", [8]), ("(2, 4)", [2, 4]), ("'fixed'", "fixed"), ('"0.5"', 0.5),
    ("fixed", "fixed"), ("true", True), (4, 4), (0.25, 0.25), (True, True),
])
def test_parse_model_value(value, parsed):
    got = parse_model_value(value)
    assert got == parsed and type(got) is type(parsed)


# ---------------------------------------------------------------------------------------- the local task
def test_pope_local_rows_and_builder(tmp_path):
    rows = pope_local.pope_rows(DATA, files=("random",))
    assert len(rows) == 24  # 4 COCO photos available x 6 questions (3 yes, 3 no)
    assert sum(r["answer"] == "yes" for r in rows) == 12 and {r["answer"] for r in rows} == {"yes", "no"}
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in rows)
    every = pope_local.pope_rows(DATA)
    assert len(every) == 72 and [r["category"] for r in every[:3]] == ["random", "popular", "adversarial"]
    out = pope_local.build_jsonl(tmp_path / "x.jsonl", DATA, limit=5)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["id"] for r in every[:5]]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        pope_local.build_jsonl(tmp_path / "y.jsonl", DATA, limit=0)
    with pytest.raises(FileNotFoundError, match="photo folder not found"):
        pope_local.build_jsonl(tmp_path / "y.jsonl", tmp_path)
    with pytest.raises(ValueError, match="unknown POPE file 'nope'"):
        pope_local.pope_rows(DATA, files=("nope",))


@pytest.mark.parametrize("answer, parsed", [
    (" Yes\nImage:", "yes"), ("No.", "no"), ("yes, there is a cat", "yes"), ("NO", "no"), ("", ""),
    ("Maybe yes", ""), ("Yesterday", ""), ("  \n", ""),
])
def test_task_scorer(answer, parsed):
    utils = pope_local_utils()
    assert utils.parse_yes_no(answer) == parsed
    assert utils.process_results({"answer": "yes"}, [answer]) == {"accuracy": float(parsed == "yes"),
                                                                  "yes_ratio": float(parsed == "yes")}


def test_task_rows_give_a_photo_or_a_video(tmp_path):
    utils = pope_local_utils()
    photo = pope_local.pope_rows(DATA, files=("random",))[0]
    (image,) = utils.doc_to_visual(photo)
    assert image.mode == "RGB" and image.size[0] > 0
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")  # the path is what lmms-eval's model classes take (they read the frames themselves)
    assert utils.doc_to_visual({"video": str(clip), "question": "q", "answer": "yes"}) == [str(clip)]
    with pytest.raises(FileNotFoundError, match="video file not found"):
        utils.doc_to_visual({"video": str(tmp_path / "missing.mp4")})
    with pytest.raises(KeyError):
        utils.doc_to_visual({"question": "q"})


def test_task_yaml_is_indexed(task_manager):
    assert task_manager.all_tasks == [POPE_LOCAL_TASK]
