"""No host-device synchronisation from vtprune in the decode loop (speed issue), checked with the detector of
``sync_detector.py`` (what counts as a sync, and whose it is). Only the decode phase must be free of them;
prefill syncs happen once per generation and are printed (``pytest -s``). The conformance matrix checks
the padded batch of every family; here: the detector itself, the unpadded case, option variants, hand-written
decode loops and mixed-size groups.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import traceback
from pathlib import Path

import pytest
import qwen_tiny
import torch
import transformers
from conftest import N_VISUAL, batch, cache_keyword, make_prompt, output_cache, tiny_llava
from next_tiny import MIXED, tiny_llava_next
from next_tiny import inputs as next_inputs
from next_tiny import prompt as next_prompt
from sync_detector import VTPRUNE_DIR, SyncDetector, owner
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import vtprune
from vtprune.methods.none import NoPruning

THIS_FILE = Path(__file__).resolve()

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 8
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]
CASES = {"single": PROMPTS[:1], "left-padded-batch": PROMPTS}
# every registered method's pruning example (the conformance matrix checks the padded batch of every family),
# plus option variants with their own decode path
METHODS = [(m, dict(cls.examples["prune"])) for m, cls in sorted(vtprune.METHODS.items())]
VARIANTS = [("st3", {"anneal_every": 3})]


def generate_detected(model, inputs: dict, new: int = NEW) -> SyncDetector:
    with torch.no_grad(), SyncDetector(model) as det:
        model.generate(**inputs, max_new_tokens=new, do_sample=False)
    assert det.decode_calls == new - 1, "every decode step ran under the detector"
    return det


@functools.cache
def stock_decode_events(family: str, case: str) -> int:
    """transformers' own decode syncs with no vtprune attached (what a run may not exceed)."""
    model, inputs = _model(family), _inputs(family, case)
    det = generate_detected(model, inputs)
    assert not det.of("prefill") and not det.of("decode"), "nothing is vtprune's without vtprune"
    return len(det.of("decode", "other"))


@functools.cache
def _model(family: str):
    if family.startswith("qwen"):
        return qwen_tiny.tiny_qwen(family)
    return tiny_llava(attn="eager" if family == "llava-eager" else "sdpa")


def _inputs(family: str, case: str) -> dict:
    return qwen_tiny.batch(CASES[case]) if family.startswith("qwen") else batch(CASES[case])


def check_decode_is_sync_free(family: str, case: str, method: str, opts: dict) -> None:
    model, inputs = _model(family), _inputs(family, case)
    stock = stock_decode_events(family, case)
    with vtprune.apply(model, method, **opts) as run:
        det = generate_detected(model, inputs)
    assert run.gen.phase == "decode" and run.gen.step == NEW - 1
    print(f"\n{family} {case} {method}{opts or ''}: prefill syncs vtprune {len(det.of('prefill'))}, "
          f"transformers {len(det.of('prefill', 'other'))}; decode syncs vtprune {len(det.of('decode'))}, "
          f"transformers {len(det.of('decode', 'other'))} (stock {stock})\n  prefill: {det.summary('prefill')}")
    assert not det.of("decode"), "vtprune synced in the decode loop:\n" + "\n".join(map(str, det.of("decode")))
    # nor does it make transformers sync more (e.g. through the masks it passes)
    assert len(det.of("decode", "other")) <= stock
    sample = run.report()["samples"][0]
    if method != "none":  # the pruned (non-stock) decode path ran
        assert min(sample["visual_tokens_per_layer_prefill"]) < N_VISUAL
    if method == "st3":  # VTA evicted from the KV cache during decoding
        assert sample["visual_tokens_per_layer_last_decode"] != sample["visual_tokens_per_layer_prefill"]


# ---------------------------------------------------------------- the detector itself
@dataclasses.dataclass(frozen=True)
class SyncingInDecode(NoPruning):
    """A method that syncs five ways before every decode layer (and never in the prefill)."""

    name = "syncing"

    def on_decode_layer(self, view, plan):
        index = view.visual_index
        valid = index >= 0
        int(valid.sum())  # _local_scalar_dense
        index[valid]  # boolean-mask indexing
        torch.where(valid)  # nonzero
        valid.cpu().tolist()  # a copy to the host (no op on CPU: the patched method); reading the copy is free
        torch.zeros(3).to(index.device)  # a host tensor copied to the device; making it is free
        return ()


def test_detector_catches_a_syncing_decode_hook():
    model, inputs = _model("llava"), _inputs("llava", "single")
    with vtprune.apply(model, SyncingInDecode()):
        det = generate_detected(model, inputs)
    calls = (NEW - 1) * len(model.model.language_model.layers)
    found = collections.Counter((e.what, e.why) for e in det.of("decode"))
    assert found == {("Tensor.__int__", "a read of tensor data on the host"): calls,
                     ("aten::index", "data-dependent size (boolean-mask indexing)"): calls,
                     ("aten::nonzero", "data-dependent size (nonzero, torch.where(cond), argwhere)"): calls,
                     ("Tensor.cpu", "a copy to the host"): calls,
                     ("Tensor.to", "a host-to-device copy"): calls}, found
    assert all("on_decode_layer" in e.where() and "run.py" in e.where() for e in det.of("decode"))
    # vtprune's own one-off prefill work is recorded as prefill (e.g. the padding counts)
    assert any("state.py" in e.where(1) for e in det.of("prefill"))
    # transformers' per-step stopping-criteria check is seen, and is not vtprune's
    assert any("__call__" in e.where(1) for e in det.of("decode", "other"))


def test_owner_rule():
    """Who owns a sync, from the stack (outermost first)."""
    hf = Path(transformers.__file__).parent

    def stack(*frames):
        return [traceback.FrameSummary(str(path), 1, name, lookup_line=False) for path, name in frames]

    test = (THIS_FILE, "test")
    generate = (VTPRUNE_DIR / "engine/lifecycle.py", "_batch")
    forward = (hf / "models/llama/modeling_llama.py", "forward")
    # transformers' stopping criteria inside the generate that vtprune's wrapper calls
    assert owner(stack(test, generate, (hf / "generation/utils.py", "_sample"),
                       (hf / "generation/stopping_criteria.py", "__call__"))) == "other"
    # vtprune's hook, directly or through a method (a test's) or a transformers helper it calls
    hook = (VTPRUNE_DIR / "engine/run.py", "_decode_layer")
    assert owner(stack(test, generate, forward, hook, (VTPRUNE_DIR / "engine/state.py", "keep_visual"))) == "vtprune"
    assert owner(stack(test, generate, forward, hook, (THIS_FILE, "on_decode_layer"))) == "vtprune"
    assert owner(stack(test, generate, forward, hook, (hf / "cache_utils.py", "get_seq_length"))) == "vtprune"
    # the attention kernel that vtprune's scoring wrapper calls is transformers'; the wrapper's own code is ours
    wrapper = (VTPRUNE_DIR / "engine/attention.py", "vtprune_attention")
    assert owner(stack(test, generate, forward, wrapper, (hf / "integrations/sdpa_attention.py", "sdpa"))) == "other"
    assert owner(stack(test, generate, forward, wrapper)) == "vtprune"
    assert owner(stack(test, forward)) == "other"


def test_transformers_syncs_are_not_attributed_to_vtprune(monkeypatch):
    """With nothing pruned the run computes what the stock model computes: the same syncs, none vtprune's,
    also those inside the attention kernel that vtprune's scoring wrapper calls."""
    model, inputs = _model("llava"), _inputs("llava", "left-padded-batch")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def syncing_sdpa(module, query, *args, **kwargs):  # a kernel that syncs (stands for transformers' code)
        bool(query.isfinite().all())
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", syncing_sdpa)
    stock = generate_detected(model, inputs)
    with vtprune.apply(model, "none"):
        det = generate_detected(model, inputs)
    layers = len(model.model.language_model.layers)
    kernel = [e for e in det.of("decode", "other") if "syncing_sdpa" in e.where(1)]
    assert len(kernel) == (NEW - 1) * layers
    # decode steps on which the method does nothing run the stock layers, not vtprune's scoring wrapper
    assert not any("vtprune_attention" in e.where(2) for e in kernel)
    prefill = [e for e in det.of("prefill", "other") if "syncing_sdpa" in e.where(1)]
    assert sum("vtprune_attention" in e.where(2) for e in prefill) == layers  # the LM's, through the wrapper
    assert not det.of("decode")

    def seen(d):
        return collections.Counter((e.what, e.where(1)) for e in d.of("decode", "other"))

    assert seen(det) == seen(stock)  # stopping criteria, SDPA mask check (padding), the kernel's


# ---------------------------------------------------------------- every method, LLaVA and Qwen2-VL
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_decode_loop_without_padding_has_no_vtprune_sync(method, opts, family):
    check_decode_is_sync_free(family, "single", method, opts)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method,opts", VARIANTS, ids=[f"{m}{o}" for m, o in VARIANTS])
def test_option_variants_decode_loop_has_no_vtprune_sync(method, opts, family, case):
    check_decode_is_sync_free(family, case, method, opts)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method,opts", [("st3", {"anneal_every": 2}), ("parvts", {"budget": 4})], ids=["st3", "parvts"])
def test_llava_eager_decode_loop_has_no_vtprune_sync(method, opts, case):
    """Eager attention: every pruned layer gets an additive mask built by vtprune at each decode step."""
    check_decode_is_sync_free("llava-eager", case, method, opts)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_hand_written_decode_loop_gets_the_stock_positions_without_a_sync(family):
    """A hand-written decode loop without position_ids after ParVTS shortened layer 0's cache: the cache
    answers the stock length (``engine/conversation.py``), so the model derives the stock decode positions
    (Qwen2-VL: M-RoPE, from rope_deltas) every step, without a sync: the loop decodes what generate does."""
    model, inputs = _model(family), _inputs(family, "single")
    inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with vtprune.apply(model, "parvts", budget=4, discard_layer=2):
        if family.startswith("qwen"):
            model.model.rope_deltas = None
        lengths, tokens = [], []
        with torch.no_grad(), SyncDetector(model) as det:
            out = model(**inputs, use_cache=True)
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            for _ in range(NEW - 1):
                tokens.append(int(token))
                lengths.append(cache.get_seq_length())
                out = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache})
                token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        assert cache.layers[0].keys.shape[2] < inputs["input_ids"].shape[1]  # ParVTS shortened layer 0's cache
        generated = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, -NEW:].tolist()
    s = inputs["input_ids"].shape[1]
    assert lengths == list(range(s, s + NEW - 1))
    assert tokens == generated
    assert det.decode_calls == NEW - 1
    print(f"\n{family} parvts hand-written loop: prefill syncs vtprune {len(det.of('prefill'))}; "
          f"decode syncs vtprune {len(det.of('decode'))}, transformers {len(det.of('decode', 'other'))}")
    assert not det.of("decode"), "\n".join(map(str, det.of("decode")))


def test_llava_next_groups_have_no_vtprune_sync_in_decode():
    """A LLaVA-NeXT batch of mixed image sizes runs one ``generate`` per group of alike samples
    (``engine/groups.py``): each group's set-up (selecting its samples, encoding its images, the previous
    group's report) is one-off work before its prefill; no decode step of any group syncs."""
    model = tiny_llava_next()
    x = next_inputs([next_prompt(2 + b, 3 + 2 * b, 20 + b) for b in range(len(MIXED))], MIXED)
    for method, opts in [("none", {}), ("st3", {})]:
        with vtprune.apply(model, method, **opts) as run, torch.no_grad(), SyncDetector(model) as det:
            model.generate(**x, max_new_tokens=NEW, do_sample=False)
        groups = run.report()["timing"]["groups"]
        assert len(groups) == 3 and det.decode_calls == len(groups) * (NEW - 1)
        print(f"\nllava_next groups {method}: prefill syncs vtprune {len(det.of('prefill'))}; decode syncs vtprune "
              f"{len(det.of('decode'))}, transformers {len(det.of('decode', 'other'))}")
        assert not det.of("decode"), "\n".join(map(str, det.of("decode")))
