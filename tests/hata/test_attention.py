import pytest
import torch
import torch.nn.functional as F

from lmexec.hata.attention import dense_attention, gather_rows, sparse_attention
from lmexec.hata.budget import Budget
from lmexec.hata.cache import LayerCache
from lmexec.hata.selection import Loki, Oracle, Quest, SimHash, SparQ


def sdpa_reference(q, k, v):
    """torch's own attention with native GQA: [B, H_q, d] -> [B, H_q, d]."""
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    return out.squeeze(2)


def test_dense_matches_sdpa(qkv):
    q, k, v = qkv
    assert torch.allclose(dense_attention(q, k, v), sdpa_reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize(
    "method", [Oracle(), SimHash(64), Loki(), Quest(page=4), SparQ()], ids=lambda m: m.name
)
def test_budget_covering_context_equals_dense(qkv, dtype, atol, method):
    q, k, v = (t.to(dtype) for t in qkv)
    cache = LayerCache.from_prefill(k, v)
    method.prepare(cache, layer=2)
    for budget in (Budget(50), Budget(10_000), Budget(0.999, sink=2, recent=2)):
        if budget.tokens(50) < 50:
            continue
        idx = method.select(q, cache, 2, budget)
        out = sparse_attention(q, cache.keys, cache.values, idx)
        assert out.dtype == dtype and out.shape == q.shape
        reference = sdpa_reference(q.float(), k.float(), v.float())
        assert torch.allclose(out.float(), reference, atol=atol, rtol=0)


def test_sparse_attention_is_attention_over_the_gathered_rows(qkv):
    q, k, v = qkv
    idx = torch.stack([torch.randperm(50)[:7] for _ in range(6)]).reshape(2, 3, 7)
    out = sparse_attention(q, k, v, idx)
    for b in range(2):
        for h in range(6):
            kv = h // 2
            rows = idx[b, kv]
            weights = torch.softmax(k[b, kv, rows] @ q[b, h] / 4.0, dim=0)
            assert torch.allclose(out[b, h], weights @ v[b, kv, rows], atol=1e-5)


def test_gather_rows_reads_selected_positions(qkv):
    _, k, _ = qkv
    idx = torch.tensor([[[3, 1]] * 3] * 2)
    assert torch.equal(gather_rows(k, idx)[1, 2], k[1, 2, [3, 1]])


def test_scale_argument(qkv):
    q, k, v = qkv
    out = dense_attention(q, k, v, scale=0.1)
    ref = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True, scale=0.1).squeeze(2)
    assert torch.allclose(out, ref, atol=1e-5)
