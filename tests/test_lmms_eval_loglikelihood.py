"""lmms-eval's ``loglikelihood`` under vtprune, end to end through ``simple_evaluate``: a small
``multiple_choice`` task (the local POPE questions and photos of ``test_lmms_eval_plugin``, two made-up
answers in the tiny model's vocabulary) scored by ``vtprune_llava_hf`` (simple class: lmms-eval builds
loglikelihood requests for simple models only) on the tiny random LLaVA checkpoint, under ``none``, FastV and
ParVTS, pruning and keeping every token.

Checked: the task completes and scores; under ``none`` each request's value is the mean negative
log-likelihood of the answer's tokens computed here by hand from the stock model; keeping every token gives
exactly those values; pruning gives finite, different ones and one report per request.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `lmms` extra)")

import test_lmms_eval_plugin as plugin_tests  # noqa: E402
import torch  # noqa: E402

from vtprune.lmms_eval_tasks import POPE_LOCAL_JSONL, TASKS_DIR  # noqa: E402

env, tiny_dir = plugin_tests.env, plugin_tests.tiny_dir  # the fixtures: working directory + entry point, checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "vtprune_mc_local"
CHOICES = ["w10", "w11 w12"]  # words of the tiny word-level vocabulary; the second is two tokens
N = 2  # questions, two requests each


@pytest.fixture(scope="module")
def mc_tasks(env):
    """The multiple-choice task: the packaged POPE task with its output type, choices, target and metric
    replaced (answer ``yes`` -> choice 0, ``no`` -> 1); a task manager that indexes it."""
    from lmms_eval.tasks import TaskManager

    folder = env / "mc_tasks"
    folder.mkdir()
    (folder / "mc_utils.py").write_text("def doc_to_target(doc):\n    return 0 if doc['answer'] == 'yes' else 1\n")
    (folder / "mc.yaml").write_text(
        f"include: {TASKS_DIR / 'vtprune_pope_local.yaml'}\ntask: {TASK}\noutput_type: multiple_choice\n"
        f"doc_to_choice: {json.dumps(CHOICES)}\ndoc_to_target: !function mc_utils.doc_to_target\n"
        "process_results: null\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return TaskManager("WARNING", include_path=[str(TASKS_DIR), str(folder)], include_defaults=False)


def evaluate(mc_tasks, tiny_dir, method: str, report=None) -> tuple[dict, list[tuple[float, bool]]]:
    """lmms-eval's results and each request's (value, is_greedy) (doc by doc, choice by choice)."""
    extra = f",vtprune_report={report}" if report else ""
    results = plugin_tests.evaluate(mc_tasks, f"pretrained={tiny_dir},method={method}{extra}", tasks=(TASK,),
                                    limit=N, force_simple=True)
    acc = results["results"][TASK]["acc,none"]
    samples = results["samples"][TASK]
    assert len(samples) == N and 0.0 <= acc <= 1.0
    values = []
    for s in samples:
        pairs = [tuple(resp[0]) for resp in s["resps"]]  # per choice: [(value, is_greedy)]
        assert len(pairs) == len(CHOICES) and all(isinstance(v, float) and isinstance(g, bool) for v, g in pairs)
        values += pairs
        lls = [v for v, _ in pairs]
        assert s["acc"] == float(min(range(len(lls)), key=lls.__getitem__) == s["target"])  # argmin of the loss
    assert acc == pytest.approx(sum(s["acc"] for s in samples) / N)
    return results, values


@pytest.fixture(scope="module")
def by_hand(env, tiny_dir) -> list[tuple[float, bool]]:
    """Per doc and choice: the mean negative log-likelihood of the choice's tokens after
    ``<image>\\n{question}`` (the chat template's user turn; the continuation is " " + choice) from the stock
    model, and whether greedy decoding gives them."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    docs = [json.loads(line) for line in (env / POPE_LOCAL_JSONL).read_text().splitlines()][:N]
    out = []
    for doc in docs:
        with Image.open(doc["image"]) as im:
            image = im.convert("RGB")
        for choice in CHOICES:
            x = processor(text=[f"<image>\n{doc['question'].strip()} {choice}"], images=[image], return_tensors="pt")
            k = len(choice.split())  # word-level tokenizer: one token per word
            with torch.no_grad():
                logp = model(**x).logits[0, -k - 1:-1].float().log_softmax(-1)  # the rows that predict the choice
            target = x["input_ids"][0, -k:]
            out.append((-logp.gather(1, target[:, None]).mean().item(), bool((logp.argmax(-1) == target).all())))
    return out


@pytest.fixture(scope="module")
def with_none(mc_tasks, tiny_dir):
    return evaluate(mc_tasks, tiny_dir, "none")


def test_none_scores_the_stock_model(with_none, by_hand):
    results, pairs = with_none
    assert [v for v, _ in pairs] == pytest.approx([v for v, _ in by_hand], abs=1e-5)
    assert [g for _, g in pairs] == [g for _, g in by_hand]
    assert results["throughput"]["avg_vtprune_requests"] == N * len(CHOICES)


@pytest.mark.parametrize("method", ["fastv:budget=16", "parvts:budget=16"])
def test_keeping_every_token_scores_as_none(mc_tasks, tiny_dir, with_none, method):
    _, pairs = evaluate(mc_tasks, tiny_dir, method)
    assert pairs == with_none[1]


@pytest.mark.parametrize("method, per_layer", [
    ("fastv:budget=4,layer=2", [16, 16, 4, 4, 4, 4]),
    ("parvts:budget=4,discard_layer=2", [16, 16, 4, 4, 4, 4]),
])
def test_pruning_scores_the_pruned_model(env, mc_tasks, tiny_dir, with_none, method, per_layer):
    report = env / f"{method.split(':')[0]}.jsonl"
    results, pairs = evaluate(mc_tasks, tiny_dir, method, report)
    values = [v for v, _ in pairs]
    assert all(math.isfinite(v) for v in values)
    assert values != pytest.approx([v for v, _ in with_none[1]], abs=1e-5)  # the pruned model scores differently
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == N * len(CHOICES)  # one report per forward call = per request
    assert {(r["task"], r["request_type"]) for r in rows} == {(TASK, "loglikelihood")}
    assert all(r["samples"][0]["visual_tokens_per_layer_prefill"] == per_layer for r in rows)
    assert results["throughput"]["avg_vtprune_final_budget"] == 4
