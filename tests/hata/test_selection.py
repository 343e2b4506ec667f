"""Each method's scores against a direct, loop-based reimplementation on small tensors."""

import math

import numpy as np
import pytest
import torch

from lmexec.errors import UserError
from lmexec.hata.budget import Budget
from lmexec.hata.cache import LayerCache
from lmexec.hata.codes import random_projection
from lmexec.hata.selection import METHODS, Dense, Hata, Loki, Oracle, Quest, SimHash, SparQ, fit_basis

B, HQ, HKV, N, D = 2, 6, 3, 50, 16
G = HQ // HKV


def prepared(method, k, v, layer=2, split=None):
    """A cache filled by prefill of ``split`` keys and then one-token appends (exercises on_append)."""
    split = N if split is None else split
    cache = LayerCache.from_prefill(k[:, :, :split], v[:, :, :split])
    method.prepare(cache, layer)
    for t in range(split, k.shape[2]):
        start = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        method.on_append(cache, layer, start)
    return cache


def softmax_group_sum(logits):  # logits[b][h][g] = list over keys
    out = torch.zeros(B, HKV, len(logits[0][0][0]))
    for b in range(B):
        for h in range(HKV):
            for g in range(G):
                out[b, h] += torch.softmax(torch.tensor(logits[b][h][g]), 0)
    return out


def test_oracle_scores(qkv):
    q, k, v = qkv
    got = Oracle().scores(q, prepared(Oracle(), k, v), 2)
    logits = [
        [
            [[float(q[b, h * G + g] @ k[b, h, i]) / math.sqrt(D) for i in range(N)] for g in range(G)]
            for h in range(HKV)
        ]
        for b in range(B)
    ]
    assert torch.allclose(got, softmax_group_sum(logits), atol=1e-5)


@pytest.mark.parametrize("split", [N, 30, 17])
def test_simhash_scores_are_minus_summed_hamming(qkv, split):
    q, k, v = qkv
    method = SimHash(bits=64, seed=5)
    got = method.scores(q, prepared(method, k, v, layer=3, split=split), 3)
    w = random_projection(HKV, D, 64, seed=5 + 3)
    expected = torch.zeros(B, HKV, N)
    for b in range(B):
        for h in range(HKV):
            for g in range(G):
                qbits = (q[b, h * G + g] @ w[h]) >= 0
                for i in range(N):
                    expected[b, h, i] -= int((qbits != ((k[b, h, i] @ w[h]) >= 0)).sum())
    assert torch.equal(got, expected)


def test_hata_with_given_projection_matches_hamming_and_simhash(qkv):
    q, k, v = qkv
    w = random_projection(HKV, D, 128, seed=11)
    simhash = SimHash(bits=128, seed=9)  # layer 2 -> seed 11
    hata = Hata(weights={2: w})
    assert torch.equal(hata.scores(q, prepared(hata, k, v), 2), simhash.scores(q, prepared(simhash, k, v), 2))
    assert Hata(weights=w).selection_bytes_per_token(D) == 16


def test_gqa_summed_selection_shares_one_index_list_per_kv_head(qkv):
    q, k, v = qkv
    method = SimHash(bits=128)
    cache = prepared(method, k, v)
    idx = method.select(q, cache, 2, Budget(10))
    assert idx.shape == (B, HKV, 10)  # one list per KV head, not per query head, no union
    w = method.projection(2, HKV, D)
    for b in range(B):
        for h in range(HKV):
            per_head = [
                ((q[b, h * G + g] @ w[h] >= 0) != (k[b, h] @ w[h] >= 0)).sum(-1) for g in range(G)
            ]  # [N] each
            summed = torch.stack(per_head).sum(0)
            chosen = set(idx[b, h].tolist())
            worst_chosen = max(int(summed[i]) for i in chosen if i != N - 1)
            best_left = min(int(summed[i]) for i in range(N) if i not in chosen)
            assert worst_chosen <= best_left


def test_loki_scores(qkv):
    q, k, v = qkv
    method = Loki(rank=4)
    got = method.scores(q, prepared(method, k, v, split=40), 2)
    # basis from the 40 prefill keys via numpy SVD (directions agree with eigh up to sign)
    basis = []
    for h in range(HKV):
        x = k[:, h, :40].reshape(-1, D).numpy().astype(np.float64)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        basis.append(torch.tensor(vt[:4].T, dtype=torch.float32))
    logits = [
        [
            [
                [
                    float((q[b, h * G + g] @ basis[h]) @ (k[b, h, i] @ basis[h])) / math.sqrt(D)
                    for i in range(N)
                ]
                for g in range(G)
            ]
            for h in range(HKV)
        ]
        for b in range(B)
    ]
    assert torch.allclose(got, softmax_group_sum(logits), atol=1e-4)
    assert method.selection_bytes_per_token(D) == 8


def test_loki_uses_calibrated_basis(qkv):
    q, k, v = qkv
    calib = fit_basis(torch.randn(1, HKV, 200, D))
    method = Loki(bases={2: calib})
    method.prepare(LayerCache.from_prefill(k, v), 2)
    assert method.bases[2] is calib


def test_fit_basis_orders_by_variance():
    x = torch.randn(1, 1, 4000, 3) * torch.tensor([0.1, 5.0, 1.0])
    basis = fit_basis(x)[0]
    assert torch.allclose(basis[:, 0].abs(), torch.tensor([0.0, 1.0, 0.0]), atol=0.05)
    assert torch.allclose(basis[:, 1].abs(), torch.tensor([0.0, 0.0, 1.0]), atol=0.05)


def test_sparq_scores(qkv):
    q, k, v = qkv
    method = SparQ(rank=5)
    got = method.scores(q, prepared(method, k, v), 2)
    logits = [[[None] * G for _ in range(HKV)] for _ in range(B)]
    for b in range(B):
        for h in range(HKV):
            magnitude = [sum(abs(float(q[b, h * G + g, j])) for g in range(G)) for j in range(D)]
            channels = sorted(range(D), key=lambda j: -magnitude[j])[:5]
            for g in range(G):
                qq = q[b, h * G + g]
                share = float(qq[channels].abs().sum() / qq.abs().sum())
                logits[b][h][g] = [
                    float(qq[channels] @ k[b, h, i, channels]) / math.sqrt(D * share) for i in range(N)
                ]
    assert torch.allclose(got, softmax_group_sum(logits), atol=1e-5)
    assert method.selection_bytes_per_token(D) == 10


@pytest.mark.parametrize("split", [N, 33, 16, 1])
def test_quest_scores_and_incremental_pages(qkv, split):
    q, k, v = qkv
    page = 8
    method = Quest(page=page)
    got = method.scores(q, prepared(method, k, v, split=split), 2)
    pages = [(s, min(s + page, N)) for s in range(0, N, page)]
    page_logits = [[[None] * G for _ in range(HKV)] for _ in range(B)]
    for b in range(B):
        for h in range(HKV):
            for g in range(G):
                qq = q[b, h * G + g]
                row = []
                for s, e in pages:
                    lo, hi = k[b, h, s:e].min(0).values, k[b, h, s:e].max(0).values
                    row.append(
                        sum(max(float(qq[j] * lo[j]), float(qq[j] * hi[j])) for j in range(D)) / math.sqrt(D)
                    )
                page_logits[b][h][g] = row
    page_scores = softmax_group_sum(page_logits)
    expected = torch.stack([page_scores[:, :, i // page] for i in range(N)], dim=-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert method.selection_bytes_per_token(64) == 2 * 64 * 2 / 8


def test_quest_selects_whole_pages(qkv):
    q, k, v = qkv
    method = Quest(page=5)
    cache = prepared(method, k, v)
    idx = method.select(q, cache, 2, Budget(20, recent=0))
    for row in idx.reshape(-1, 20).tolist():
        assert len({i // 5 for i in row}) == 4


def test_dense_selects_everything(qkv):
    q, k, v = qkv
    idx = Dense().select(q, prepared(Dense(), k, v), 2, Budget(3))
    assert idx.shape == (B, HKV, N) and Dense().selection_bytes_per_token(D) is None


def test_registry_and_bad_settings():
    assert set(METHODS) == {"dense", "oracle", "simhash", "hata", "loki", "quest", "sparq"}
    with pytest.raises(UserError, match="lmexec hata train"):
        Hata()
    with pytest.raises(UserError, match="bits must be one of"):
        SimHash(bits=100)
    with pytest.raises(UserError, match="page size"):
        Quest(page=0)
    with pytest.raises(UserError, match="rank must be between 1 and head_dim=16"):
        SparQ(rank=40).selection_bytes_per_token(16)
    with pytest.raises(UserError, match="64 bits but 128"):
        Hata(weights=torch.randn(3, 16, 64), bits=128)


def test_hata_projection_shape_mismatch(qkv):
    q, k, v = qkv
    method = Hata(weights=torch.randn(4, D, 128))  # 4 KV heads, the cache has 3
    with pytest.raises(UserError, match="n_kv_heads=3"):
        method.prepare(LayerCache.from_prefill(k, v), 2)
    with pytest.raises(UserError, match="no projection for layer 5"):
        Hata(weights={2: torch.randn(HKV, D, 128)}).prepare(LayerCache.from_prefill(k, v), 5)


def test_projection_on_another_device_is_copied_once_and_again_after_an_in_place_edit():
    w = random_projection(2, 16, 64, 3)
    method = Hata(weights={0: w})
    first = method.projection_on(0, 2, 16, torch.device("meta"))  # any device but the weights'
    assert first.device.type == "meta" and method.projection_on(0, 2, 16, torch.device("meta")) is first
    assert method.projection_on(0, 2, 16, torch.device("cpu")) is method.projection(0, 2, 16)
    w.mul_(-1)  # e.g. a training update in place
    assert method.projection_on(0, 2, 16, torch.device("meta")) is not first


@pytest.mark.parametrize("name", ["oracle", "loki", "quest", "sparq", "simhash"])
def test_select_skips_padding_while_real_keys_remain(name):
    """Padding keys that would score best (copies of the query) must not take the budget from real
    keys: Quest ignored the mask and attended only padding (NaN) or the one forced key."""
    from lmexec.hata.selection.base import VALID_STATE

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 16, generator=gen)
    k = torch.randn(1, 1, 64, 16, generator=gen)
    v = torch.randn(1, 1, 64, 16, generator=gen)
    k[:, :, :32] = q[:, :1].unsqueeze(2) * 50
    valid = torch.ones(1, 64, dtype=torch.bool)
    valid[:, :32] = False
    method = METHODS[name]()
    cache = LayerCache.from_prefill(k, v)
    cache.state[VALID_STATE] = valid
    method.prepare(cache, 0)
    for budget in (Budget(16, 0, 0), Budget(16)):
        chosen = method.select(q, cache, 0, budget)
        assert bool(valid[0, chosen.flatten()].all()), chosen
        out = method.attend(q, cache, 0, budget)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["quest", "loki"])
def test_features_rebuilt_without_padding_ignore_what_the_padding_holds(name):
    """Quest's page min/max and Loki's fitted basis are built at prefill, before the padding is known;
    ``on_padding`` rebuilds them so the pad keys' values no longer change any real key's score."""
    from lmexec.hata.selection.base import VALID_STATE

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 16, generator=gen)
    k = torch.randn(2, 2, 70, 16, generator=gen)
    v = torch.randn(2, 2, 70, 16, generator=gen)
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, :27] = False  # row 1: left padding, ending inside a page
    scores = []
    for pad_value in (0.0, 40.0):
        keys = k.clone()
        keys[1, :, :27] = pad_value
        method = METHODS[name]()
        cache = LayerCache.from_prefill(keys, v)
        method.prepare(cache, 0)
        cache.state[VALID_STATE] = valid
        method.on_padding(cache, 0)
        scores.append(method.scores(q, cache, 0).masked_fill(~valid[:, None, :], 0))
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)


def test_method_settings_that_are_mistakes_are_refused():
    """rank=0 silently meant the default d/4; numpy weights crashed with an AttributeError."""
    for method in (Loki(rank=0), SparQ(rank=0)):
        with pytest.raises(UserError, match="rank must be between 1 and head_dim"):
            method.check_model(2, 16)
    for weights in ({0: np.zeros((2, 16, 64), np.float32)}, np.zeros((2, 16, 64), np.float32)):
        with pytest.raises(UserError, match="hash weights must be torch tensors, got ndarray"):
            Hata(weights=weights)
