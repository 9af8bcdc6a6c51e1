"""The FlashAttention-2 path, emulated on CPU.

transformers' own FA2 glue runs for real (``integrations/flash_attention.py`` ->
``modeling_flash_attention_utils._flash_attention_forward``: unpadding, the varlen / dense choice, the
packed-sequence check); only the kernels it imports lazily from ``flash_attn`` are replaced, by small
pure-torch reference implementations of ``flash_attn_func`` / ``flash_attn_varlen_func`` (layout
[B, S, H, D] / [total, H, D], GQA, causal aligned bottom-right as in flash-attn >= 2.1). Models are built
with SDPA and switched to ``flash_attention_2`` on the text config, then vtprune under FA2 must generate
exactly the tokens it generates under SDPA.
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import qwen_tiny
import torch
import transformers.modeling_flash_attention_utils as fa_utils
from conftest import N_VISUAL, batch, make_prompt, tiny_llava

import vtprune
from vtprune import cli
from vtprune.bench import archs
from vtprune.engine import attention as engine_attention

pytestmark = pytest.mark.usefixtures("one_thread", "emulated_fa2")

FA2 = "flash_attention_2"
NEW = 10
PROMPTS = [make_prompt(2, 4, 1), make_prompt(5, 9, 2), make_prompt(3, 2, 3)]  # 3 lengths: left padding
LAYERS = 6
PARVTS_DISCARD = 3  # ParVTS's default discard_layer: layers 0-2 hold both paths packed
# every registered method's pruning example, plus the multi-path schedule whose question lives in one path
METHODS = [(m, dict(cls.examples["prune"])) for m, cls in sorted(vtprune.METHODS.items())]
METHODS += [("parvts", {"budget": 5, "schedule": "sequential_non_subject_first"})]


# ---------------------------------------------------------------------------------------- reference kernels
CALLS = {"dense": 0, "varlen": 0}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """One sequence: q [Sq, H, D], k / v [Sk, H_kv, D] -> [Sq, H, D]. Causal aligned bottom-right: query i
    sees keys j <= i + Sk - Sq; a query that sees no key gets zeros (as flash-attn)."""
    sq, heads, _ = q.shape
    sk, kv_heads = k.shape[0], k.shape[1]
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)
    v = v.float().repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        seen = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        logits = logits.masked_fill(~seen, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Reference ``flash_attn.flash_attn_func``: q [B, Sq, H, D], k / v [B, Sk, H_kv, D] -> [B, Sq, H, D]."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and alibi_slopes is None
    CALLS["dense"] += 1
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Reference ``flash_attn.flash_attn_varlen_func``: q [total_q, H, D], k / v [total_k, H_kv, D]; sequence i
    is rows cu_seqlens[i]:cu_seqlens[i + 1] of each."""
    assert dropout_p == 0.0 and window_size == (-1, -1) and block_table is None
    CALLS["varlen"] += 1
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max(b - a for a, b in zip(cq, cq[1:], strict=False)) == int(max_seqlen_q)
    out = torch.zeros_like(q)
    for i in range(len(cq) - 1):
        out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], scale, causal)
    return out


@pytest.fixture(scope="module")
def emulated_fa2():
    """Put the reference kernels where transformers' glue keeps what ``lazy_import_flash_attention`` loaded
    (so it never imports flash_attn), restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fa_utils, "_loaded_implementation", FA2)
        mp.setattr(fa_utils, "_flash_fn", flash_attn_func)
        mp.setattr(fa_utils, "_flash_varlen_fn", flash_attn_varlen_func)
        mp.setattr(fa_utils, "_flash_with_kvcache_fn", None)
        mp.setattr(fa_utils, "_pad_fn", fa_utils._pad_input)  # transformers' equivalents of flash_attn.bert_padding
        mp.setattr(fa_utils, "_unpad_fn", fa_utils._unpad_input)
        mp.setattr(fa_utils, "_process_flash_kwargs_fn", fa_utils._lazy_define_process_function(flash_attn_varlen_func))
        mp.setattr(fa_utils, "_process_with_kvcache_kwargs_fn", dict)
        yield


@contextlib.contextmanager
def attention(model, impl: str):
    """Run ``model``'s language model with ``impl``. Set on the text config directly: transformers' API
    (``set_attn_implementation``) refuses FA2 without flash_attn and CUDA, which the emulation replaces."""
    cfg = model.config.text_config
    old = cfg._attn_implementation
    cfg._attn_implementation = impl
    try:
        yield
    finally:
        cfg._attn_implementation = old


@pytest.fixture
def sdpa_fallback(monkeypatch):
    """Record (layer, mask shape) of each call the vtprune FA2 wrapper sends to SDPA."""
    calls = []
    fallback = engine_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        calls.append((module.layer_idx, tuple(attention_mask.shape)))
        return fallback(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(engine_attention, "sdpa_attention_forward", spy)
    return calls


def generate(model, inputs, impl: str, method: str | None = None, opts: dict | None = None, **kw):
    """Greedy new tokens under attention ``impl``, stock (``method`` None) or under vtprune; also the run's
    report. Under FA2, checks that every attention call went to a flash kernel or to the SDPA fallback."""
    kw.setdefault("max_new_tokens", NEW)
    before = CALLS["dense"] + CALLS["varlen"]
    report = None
    with attention(model, impl):
        if method is None:
            out = model.generate(**inputs, do_sample=False, **kw)
        else:
            with vtprune.apply(model, method, **(opts or {})) as run:
                out = model.generate(**inputs, do_sample=False, **kw)
            report = run.report()
    flash_calls = CALLS["dense"] + CALLS["varlen"] - before
    if impl == FA2:
        assert flash_calls > 0
    else:
        assert flash_calls == 0
    return out[:, -kw["max_new_tokens"]:], report, flash_calls


@pytest.fixture(scope="module")
def model():
    return tiny_llava(LAYERS)


def one(inputs: dict, i: int) -> dict:
    """Sample ``i`` of a LLaVA batch alone, padding removed."""
    keep = inputs["attention_mask"][i].bool()
    return {"input_ids": inputs["input_ids"][i:i + 1, keep], "attention_mask": inputs["attention_mask"][i:i + 1, keep],
            "pixel_values": inputs["pixel_values"][i:i + 1]}


# ---------------------------------------------------------------------------------------- the emulation
def test_reference_kernels_match_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, h, 8, generator=g) for s, h in ((5, 4), (9, 2), (9, 2)))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        attn_mask=torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)).transpose(1, 2)  # bottom-right causal
    assert torch.allclose(flash_attn_func(q, k, v, causal=True), sdpa, atol=1e-5)
    cu_q, cu_k = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 9, 18], dtype=torch.int32)
    varlen = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 5, 9, causal=True)
    assert torch.allclose(varlen.view(2, 5, 4, 8), sdpa, atol=1e-5)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "left-padded-batch"])
def test_emulated_fa2_equals_sdpa_on_the_stock_model(model, prompts):
    inputs = batch(prompts)
    varlen = CALLS["varlen"]
    fa2, _, calls = generate(model, inputs, FA2)
    assert calls == LAYERS * NEW  # prefill + NEW - 1 decode steps, every layer through the FA2 glue
    assert (CALLS["varlen"] > varlen) == (len(prompts) > 1)  # padding -> unpad + varlen kernel
    assert torch.equal(fa2, generate(model, inputs, "sdpa")[0])


# ---------------------------------------------------------------------------------------- vtprune under FA2
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_vtprune_under_fa2_equals_sdpa_and_batched_equals_one_by_one(model, sdpa_fallback, method, opts):
    full = batch(PROMPTS)
    sdpa, sdpa_report, _ = generate(model, full, "sdpa", method, opts)
    assert not sdpa_fallback  # the fallback is the FA2 wrapper's only
    fa2, fa2_report, flash_calls = generate(model, full, FA2, method, opts)
    assert torch.equal(fa2, sdpa)
    for key in ("visual_tokens_per_layer_prefill", "visual_tokens_per_layer_last_decode"):
        assert [s[key] for s in fa2_report["samples"]] == [s[key] for s in sdpa_report["samples"]]
    # the SDPA fallback runs ParVTS's packed layers (prefill only), nothing else
    packed = list(range(PARVTS_DISCARD)) if method == "parvts" else []
    assert [layer for layer, _ in sdpa_fallback] == packed
    assert all(len(shape) == 4 for _, shape in sdpa_fallback)
    assert flash_calls == LAYERS * NEW - len(packed)
    for i in range(len(PROMPTS)):
        sdpa_fallback.clear()
        alone, _, _ = generate(model, one(full, i), FA2, method, opts)
        assert torch.equal(alone[0], fa2[i]), f"sample {i}"
        assert [layer for layer, _ in sdpa_fallback] == packed
    assert torch.equal(alone, generate(model, one(full, 2), "sdpa", method, opts)[0])  # batch 1: no mask at all


def test_gapped_positions_never_reach_packed_sequence_detection(model, monkeypatch):
    """A pruned layer's position ids are the kept tokens' original, gapped ones; at batch 1 with no mask,
    transformers' glue would read them as packed sequences (``_is_packed_sequence``) and take the varlen
    path, with a host sync per layer. The wrapper drops them (RoPE is already applied)."""
    checks = []
    original = fa_utils._is_packed_sequence

    def spy(position_ids, batch_size):
        packed = bool(original(position_ids, batch_size))
        checks.append(packed)
        return packed

    monkeypatch.setattr(fa_utils, "_is_packed_sequence", spy)
    inputs = batch(PROMPTS[1:2])
    varlen = CALLS["varlen"]
    fa2, report, _ = generate(model, inputs, FA2, "fastv", {"budget": 2, "layer": 1})
    assert report["samples"][0]["visual_tokens_per_layer_prefill"] == [N_VISUAL] + [2] * (LAYERS - 1)
    assert checks and not any(checks)
    assert CALLS["varlen"] == varlen  # batch 1, no padding: only the dense kernel
    assert torch.equal(fa2, generate(model, inputs, "sdpa", "fastv", {"budget": 2, "layer": 1})[0])


def test_row_logits_reads_a_padding_mask_like_the_full_mask():
    g = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    full = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    rows = torch.tensor([[5, 3], [5, 0]])
    for mask in (valid, valid.long()):
        assert torch.equal(engine_attention.row_logits(query, key, rows, mask, 0.35),
                           engine_attention.row_logits(query, key, rows, full, 0.35))


# ---------------------------------------------------------------------------------------- Qwen2-VL
@pytest.fixture(scope="module")
def qwen():
    return qwen_tiny.tiny_qwen("qwen2_vl")


@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"budget": 4})])
@pytest.mark.parametrize("n", [1, 3], ids=["single", "left-padded-batch"])
def test_qwen2_vl_under_fa2_equals_sdpa(qwen, method, opts, n):
    inputs = qwen_tiny.batch([qwen_tiny.make_prompt(2, 4, 1), qwen_tiny.make_prompt(5, 9, 2),
                              qwen_tiny.make_prompt(3, 2, 3)][:n])
    fa2, _, calls = generate(qwen, inputs, FA2, method, opts, max_new_tokens=6)
    assert calls == LAYERS * 6
    assert torch.equal(fa2, generate(qwen, inputs, "sdpa", method, opts, max_new_tokens=6)[0])


# ---------------------------------------------------------------------------------------- bench
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available(),
                    reason="FlashAttention-2 can run here")
def test_bench_refuses_flash_attention_2_without_flash_attn_or_cuda(capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no model may be built or loaded when the attention cannot run")
    monkeypatch.setattr(archs, "build_model", boom)
    monkeypatch.setattr(cli.common, "load_model", boom)
    for argv in (["--arch", "tiny"], []):
        assert cli.main(["bench", *argv, "--attn", FA2, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "'flash_attention_2' cannot run here" in err and "CUDA device" in err
        assert "accepted: sdpa, eager, flash_attention_2" in err.lower()
    with pytest.raises(ValueError, match="flash_attention_2' cannot run here"):
        archs.check_attention(FA2, "cpu", torch.float32)


def test_check_attention_names_what_is_missing(monkeypatch):
    archs.check_attention("sdpa", "cpu")
    archs.check_attention("eager", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unsupported attention implementation 'flex_attention'; accepted: "
                                         "sdpa, eager, flash_attention_2"):
        archs.check_attention("flex_attention")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "flash_attn is installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    archs.check_attention(FA2, "cuda", torch.bfloat16)
    archs.check_attention(FA2, "cuda:0")
    with pytest.raises(ValueError, match=r"float16 / bfloat16 only \(dtype float32\)") as e:
        archs.check_attention(FA2, "cuda", torch.float32)
    assert "flash_attn package" not in str(e.value) and "CUDA" not in str(e.value)
    with pytest.raises(ValueError, match=r"CUDA device only \(device 'cpu'\)"):
        archs.check_attention(FA2, "cpu", torch.bfloat16)
