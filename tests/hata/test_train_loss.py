"""Paper loss terms against hand-computed values and a pair-by-pair loop; label construction."""

from __future__ import annotations

import math

import pytest
import torch

from lmexec.hata.training.data import LayerData, paper_labels
from lmexec.hata.training.loss import paper_loss, relaxed_codes


def _pairwise_reference(w, data, labels, eps, lam, eta, sigma):
    """The reference's loss written over explicit (query head, pair) lists, as in its training script."""
    b_n, h_q, p_n, _ = data.queries.shape
    h_kv, r = w.shape[0], w.shape[2]
    g = h_q // h_kv
    sim = 0.0
    sums = torch.zeros(h_q, r, dtype=torch.float64)
    n_pairs = 0
    for h in range(h_q):
        wh = w[h // g].double()
        count = 0
        for b in range(b_n):
            for p in range(p_n):
                q = torch.tanh(sigma * data.queries[b, h, p].double() @ wh / 2)
                for t in range(int(data.positions[b, p]) + 1):
                    k = torch.tanh(sigma * data.keys[b, h // g, t].double() @ wh / 2)
                    sim += labels[b, h, p, t].item() * (q - k).square().sum().item()
                    sums[h] += q + k
                    count += 1
        n_pairs = count
    similarity = eps * sim / n_pairs
    balance = lam * (sums / (n_pairs * r)).square().sum().item()
    gram = w.double().transpose(1, 2) @ w.double() - torch.eye(r, dtype=torch.float64)
    decorrelation = eta * gram.square().sum().sqrt().item()
    return similarity, balance, decorrelation


def test_loss_terms_by_hand():
    """One query, two keys, one head, d = 1, r = 1: every term worked out on paper."""
    w = torch.tensor([[[2.0]]])  # [H_kv=1, d=1, r=1]
    data = LayerData(
        queries=torch.tensor([[[[1.0]]]]),  # [B=1, H_q=1, P=1, d=1]
        keys=torch.tensor([[[[1.0], [-3.0]]]]),  # [B=1, H_kv=1, T=2, d=1]
        positions=torch.tensor([[1]]),
    )
    labels = torch.tensor([[[[20.0, -1.0]]]])
    sigma = 0.1
    q, k0, k1 = math.tanh(0.1), math.tanh(0.1), math.tanh(-0.3)  # tanh(sigma * x * w / 2)
    terms = paper_loss(w, data, labels, eps=0.01, lam=1.0, eta=2.0, sigma=sigma)
    assert terms.similarity.item() == pytest.approx(0.01 * (20 * (q - k0) ** 2 - (q - k1) ** 2) / 2, rel=1e-4)
    assert terms.balance.item() == pytest.approx(((2 * q + k0 + k1) / 2) ** 2, rel=1e-4)
    assert terms.decorrelation.item() == pytest.approx(2.0 * abs(4.0 - 1.0), rel=1e-6)
    assert terms.total.item() == pytest.approx(
        terms.similarity.item() + terms.balance.item() + terms.decorrelation.item()
    )


def test_loss_equals_pairwise_loop():
    g = torch.Generator().manual_seed(7)
    data = LayerData(
        queries=torch.randn(2, 4, 3, 5, generator=g) * 3,
        keys=torch.randn(2, 2, 9, 5, generator=g) * 3,
        positions=torch.tensor([[2, 5, 8], [0, 4, 7]]),
    )
    w = torch.randn(2, 5, 32, generator=g)
    labels = paper_labels(data.raw_scores(), data.valid())
    terms = paper_loss(w, data, labels, eps=0.01, lam=1.0, eta=2.0, sigma=0.1)
    expected = _pairwise_reference(w, data, labels, 0.01, 1.0, 2.0, 0.1)
    got = (terms.similarity.item(), terms.balance.item(), terms.decorrelation.item())
    assert got == pytest.approx(expected, rel=1e-5)


def test_loss_with_any_labels_equals_pairwise_loop():
    """Not only the paper's labels: arbitrary values, zeros on visible pairs (no pull), unsorted positions."""
    g = torch.Generator().manual_seed(8)
    data = LayerData(
        queries=torch.randn(2, 4, 3, 5, generator=g),
        keys=torch.randn(2, 2, 9, 5, generator=g),
        positions=torch.tensor([[8, 2, 5], [4, 4, 0]]),
    )
    w = torch.randn(2, 5, 16, generator=g)
    labels = torch.randint(-2, 3, (2, 4, 3, 9), generator=g).float() * data.valid()
    terms = paper_loss(w, data, labels, eps=0.01, lam=1.0, eta=2.0, sigma=0.1)
    expected = _pairwise_reference(w, data, labels, 0.01, 1.0, 2.0, 0.1)
    got = (terms.similarity.item(), terms.balance.item(), terms.decorrelation.item())
    assert got == pytest.approx(expected, rel=1e-5)


def test_relaxed_codes_are_tanh_half():
    x = torch.randn(1, 2, 4, 3)
    w = torch.randn(2, 3, 32)
    expected = 2 * torch.sigmoid(0.1 * torch.einsum("bhnd,hdr->bhnr", x, w)) - 1
    torch.testing.assert_close(relaxed_codes(x, w, 0.1), expected)


def test_paper_labels():
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0, 0.0, -1.0, 9.0, 8.0, 7.0, 6.0, 100.0]])
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, 11] = False  # not visible: label 0 whatever its score
    labels = paper_labels(scores, valid, top_frac=0.2)  # 11 visible -> round(2.2) = 2 positives
    expected = torch.full((1, 12), -1.0)
    expected[0, 7], expected[0, 8], expected[0, 11] = 20.0, 1.0, 0.0
    torch.testing.assert_close(labels, expected)
    # round(4.4) = 4 positives: 20, 13.67, 7.33, 1 in score order
    labels = paper_labels(scores, valid, top_frac=0.4)
    assert labels[0, [7, 8, 9, 10]].tolist() == pytest.approx([20, 20 - 19 / 3, 20 - 38 / 3, 1])
    assert (labels[0, :7] == -1).all()
    # at least one positive per query
    assert (paper_labels(scores[:, :3], valid[:, :3], top_frac=0.1) == 20).sum() == 1
