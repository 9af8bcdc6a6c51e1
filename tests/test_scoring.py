"""The engine's partial attention rows (engine/attention.row_logits) against the attention they stand for."""

from __future__ import annotations

import pytest
import torch

from vtprune.engine.attention import row_logits
from vtprune.engine.layout import take


def reference(query, key, rows, allowed, scaling):
    """Every query row's logits against every key, GQA by repeating each key head (transformers' repeat_kv),
    then the requested rows; -inf where ``allowed`` ([B, 1, q, k]) is False."""
    groups = query.shape[1] // key.shape[1]
    full = torch.matmul(query.float(), key.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling
    full = full.masked_fill(~allowed, float("-inf"))
    return torch.gather(full, 2, rows[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
@pytest.mark.parametrize("q_len,k_len", [(1, 11), (7, 7), (3, 10)])
def test_row_logits_equal_the_full_attention_rows_gqa(heads, kv_heads, q_len, k_len):
    g = torch.Generator().manual_seed(heads * 100 + q_len)
    b, d = 2, 8
    query = torch.randn(b, heads, q_len, d, generator=g)
    key = torch.randn(b, kv_heads, k_len, d, generator=g)
    rows = torch.tensor([[q_len - 1], [0]]) if q_len > 1 else torch.zeros(b, 1, dtype=torch.long)
    causal = (torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len))[None, None]
    expected = reference(query, key, rows, causal.expand(b, -1, -1, -1), 0.35)
    assert torch.allclose(row_logits(query, key, rows, None, 0.35), expected, atol=1e-5)
    # the same keys under an explicit 4-D mask (a packed-path layer's) that also hides key 1 of sample 0
    mask = causal.expand(b, -1, -1, -1).clone()
    mask[0, :, :, 1] = False
    got = row_logits(query, key, rows, mask, 0.35)
    assert torch.allclose(got, reference(query, key, rows, mask, 0.35), atol=1e-5)
    assert torch.isinf(got[0, :, :, 1]).all()


def test_row_logits_of_a_decode_step_read_a_padding_mask():
    query, key = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8)
    rows = torch.zeros(2, 1, dtype=torch.long)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = row_logits(query, key, rows, padding, 0.5)
    assert torch.isinf(got[0, :, :, :2]).all() and torch.isfinite(got[0, :, :, 2:]).all()
    assert torch.isfinite(got[1]).all()
    assert torch.allclose(got[1], row_logits(query, key, rows, None, 0.5)[1])


@pytest.mark.parametrize("shape,dim,batch", [((1, 4, 9, 8), 2, 1), ((3, 4, 9, 8), 2, 3), ((3, 9, 5), 1, 3),
                                             ((1, 9, 5), 1, 3), ((2, 9), 1, 2), ((1, 2, 3, 9, 4), 3, 2)])
def test_take_equals_gather_with_an_expanded_index(shape, dim, batch):
    """engine.layout.take (KV-cache evictions, hidden states, position embeddings) = torch.gather."""
    g = torch.Generator().manual_seed(len(shape) * 10 + dim + batch)
    x = torch.randn(*shape, generator=g).to(torch.bfloat16)
    index = torch.stack([torch.randperm(shape[dim], generator=g)[:6] for _ in range(batch)])
    full = x.expand(batch, *shape[1:])
    view = [batch] + [1] * (dim - 1) + [6] + [1] * (len(shape) - dim - 1)
    expected = torch.gather(full, dim, index.view(view).expand(batch, *shape[1:dim], 6, *shape[dim + 1:]))
    got = take(x, index, dim)
    assert got.dtype == x.dtype and torch.equal(got, expected)
