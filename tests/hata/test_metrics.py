import torch

from lmexec.hata.attention import attention_probs, dense_attention, sparse_attention
from lmexec.hata.metrics import mass_recall, membership, output_error, topk_recall


def test_recall_counts_overlap():
    sel = torch.tensor([[[0, 1, 2, 3]]])
    ref = torch.tensor([[[2, 3, 4, 5]]])
    assert topk_recall(sel, ref, 10).item() == 0.5
    assert topk_recall(ref, ref, 10).item() == 1.0
    assert membership(sel, 6)[0, 0].tolist() == [True] * 4 + [False] * 2


def test_mass_recall_and_output_error_bounds(qkv):
    q, k, v = qkv
    probs = attention_probs(q, k)
    everything = torch.arange(50).expand(2, 3, 50)
    assert torch.allclose(mass_recall(probs, everything), torch.ones(2, 3))
    dense = dense_attention(q, k, v)
    assert output_error(sparse_attention(q, k, v, everything), dense, 3).max() < 1e-5
    half = everything[..., :25]
    by_hand = probs[0, 1, :, :25].sum(-1).mean()
    assert torch.allclose(mass_recall(probs, half)[0, 1], by_hand)
    err = output_error(sparse_attention(q, k, v, half), dense, 3)
    o_s, o = sparse_attention(q, k, v, half)[0, 2], dense[0, 2]
    assert torch.allclose(
        err[0, 1],
        (
            (o_s - o).norm() / o.norm()
            + (sparse_attention(q, k, v, half)[0, 3] - dense[0, 3]).norm() / dense[0, 3].norm()
        )
        / 2,
    )
