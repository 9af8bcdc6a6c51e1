"""The conformance matrix on a CUDA device, in half precision: every registered method x every family's tiny
model (:mod:`families`: the axes of ``test_conformance.py``) x {SDPA bfloat16, SDPA float16, FlashAttention-2
bfloat16}. Marked ``cuda`` (``pytest -m cuda``, run by ``scripts/gpu_check.sh``); skipped where
``torch.cuda.is_available()`` is False, and the FlashAttention-2 cases where ``flash_attn`` does not import or the
device is not a CUDA one. ``VTPRUNE_TEST_DEVICE`` (default ``cuda``) names another device, e.g. ``cpu`` to check
the tests themselves where there is no GPU (``VTPRUNE_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py``).

* keep-all = stock, token for token: with options that keep every visual token (``examples["keep_all"]``),
  the greedy tokens equal the stock model's on the same device, dtype and attention, single and in a
  left-padded batch. The same shapes run the same kernels, so any difference is vtprune's.
* batched = one by one, with pruning (``examples["prune"]``): a left-padded batch generates what each sample
  generates alone, **up to near-ties**. A batch is another shape, so the GPU runs other kernel tilings and
  the logits differ by rounding, the stock model's too. So each step's raw logits must agree within
  :data:`TIE_EPS` x eps(dtype) x the largest logit, and the tokens must be equal until a step where they were
  a near-tie (the sequences diverge from there and are not compared further). The tolerance is checked on
  the device itself: the stock model's batch against its samples alone passes it, a pruned model against the
  stock one fails it.

The CPU matrix (``test_conformance.py``) holds these exactly in float32; this one checks the CUDA kernels,
half precision and FlashAttention's varlen / dense paths that the CPU cannot run.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from families import FAMILIES, METHODS, method_options

import vtprune


def _flash_attn_imports() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch / CUDA
        return False
    return True


DEVICE = os.environ.get("VTPRUNE_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                 reason="no CUDA device (torch.cuda.is_available() is False)")]

NEW = 8
BATCH = (0, 1, 2)
TIE_EPS = 6  # logits of a batch and of a sample alone may differ by this many eps(dtype) x the largest logit
FA2 = "flash_attention_2"
CASES = [
    pytest.param("sdpa", torch.bfloat16, id="sdpa-bf16"),
    pytest.param("sdpa", torch.float16, id="sdpa-fp16"),
    pytest.param(FA2, torch.bfloat16, id="fa2-bf16",
                 marks=pytest.mark.skipif(not (ON_CUDA and _flash_attn_imports()),
                                          reason="flash_attn does not import, or the device is not a CUDA one")),
]


@functools.cache
def model(family: str, attn: str, dtype: torch.dtype):
    """The family's tiny model (built in float32 on the CPU from its seed, as on the CPU matrix) on
    :data:`DEVICE` in ``dtype``, the language model's attention ``attn``."""
    return FAMILIES[family].build(attn).to(DEVICE, dtype)


@functools.cache
def inputs(family: str, idx: tuple[int, ...], dtype: torch.dtype) -> dict:
    """Samples ``idx`` of the family's batch on :data:`DEVICE`, floating-point tensors (pixels) in ``dtype``."""
    return {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)
            for k, v in FAMILIES[family].batch(idx).items()}


def generate(m, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``NEW`` tokens: (tokens [B, NEW], raw logits [B, NEW, V] in float32)."""
    out = m.generate(**x, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, -NEW:], torch.stack(out.logits, dim=1).float()


@functools.cache
def stock(family: str, attn: str, dtype: torch.dtype, idx: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return generate(model(family, attn, dtype), inputs(family, idx, dtype))


def assert_equal_up_to_near_ties(tokens: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor,
                                 ref_logits: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``tokens`` [T] / ``logits`` [T, V] against the reference's: step by step, the logits within
    ``TIE_EPS * eps(dtype) * max |logit|``, until the first step whose tokens differ (a near-tie, since its
    logits were within the tolerance); later steps follow other prefixes and are not compared."""
    tol = TIE_EPS * torch.finfo(dtype).eps * float(torch.maximum(logits.abs().max(), ref_logits.abs().max()))
    for t in range(tokens.shape[0]):
        diff = float((logits[t] - ref_logits[t]).abs().max())
        assert diff <= tol, (f"{what}: step {t}: logits differ by up to {diff:.4f} (tolerance {tol:.4f}); tokens "
                             f"{tokens.tolist()} vs {ref_tokens.tolist()}")
        if tokens[t] != ref_tokens[t]:
            return


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn,dtype", CASES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_keeping_every_token_equals_stock_on_cuda(family, attn, dtype, method):
    m, fam = model(family, attn, dtype), FAMILIES[family]
    for idx in ((0,), BATCH):
        with vtprune.apply(m, method, **method_options(method, "keep_all")) as run:
            tokens, logits = generate(m, inputs(family, idx, dtype))
        ref_tokens, ref_logits = stock(family, attn, dtype, idx)
        assert torch.equal(tokens, ref_tokens), (
            f"samples {idx}: {tokens.tolist()} vs stock {ref_tokens.tolist()} (logits differ by up to "
            f"{float((logits - ref_logits).abs().max()):.4f})")
        sample = run.report()["samples"][0]
        assert sample["visual_tokens_per_layer_prefill"] == [fam.n_visual] * fam.layers


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attn,dtype", CASES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_equals_one_by_one_with_pruning_on_cuda(family, attn, dtype, method):
    m, fam = model(family, attn, dtype), FAMILIES[family]
    with vtprune.apply(m, method, **method_options(method, "prune")) as run:
        together, together_logits = generate(m, inputs(family, BATCH, dtype))
        counts = run.report()["samples"][0]["visual_tokens_per_layer_prefill"]
        for i in BATCH:
            alone, alone_logits = generate(m, inputs(family, (i,), dtype))
            assert_equal_up_to_near_ties(together[i], together_logits[i], alone[0], alone_logits[0], dtype,
                                         f"sample {i} in the batch vs alone")
    if method != "none":
        assert min(counts) < fam.n_visual  # the example really prunes


@pytest.mark.parametrize("attn,dtype", CASES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_near_tie_check_tells_rounding_from_pruning(family, attn, dtype):
    m = model(family, attn, dtype)
    together, together_logits = stock(family, attn, dtype, BATCH)
    for i in BATCH:  # rounding: the stock model's batch against its samples alone
        alone, alone_logits = stock(family, attn, dtype, (i,))
        assert_equal_up_to_near_ties(together[i], together_logits[i], alone[0], alone_logits[0], dtype, "stock")
    with vtprune.apply(m, "fastv", **method_options("fastv", "prune")):  # pruning: another model
        pruned, pruned_logits = generate(m, inputs(family, (1,), dtype))
    alone, alone_logits = stock(family, attn, dtype, (1,))
    with pytest.raises(AssertionError, match="logits differ"):
        assert_equal_up_to_near_ties(pruned[0], pruned_logits[0], alone[0], alone_logits[0], dtype, "fastv vs stock")
