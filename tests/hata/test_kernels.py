"""The numba CPU kernels equal the torch reference: codes and scores exactly, selections exactly (same
tie rule) and as sets up to ties against ``top_k_indices``, attention outputs to float tolerance."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numba as nb
import numpy as np
import pytest
import torch

from lmexec.errors import UserError
from lmexec.hata import kernels
from lmexec.hata.budget import Budget
from lmexec.hata.cache import LayerCache
from lmexec.hata.codes import unpack_bits
from lmexec.hata.kernels import cpu
from lmexec.hata.kernels import reference as ref
from lmexec.hata.selection import SimHash, top_k_indices

SHAPES = [  # batch, kv heads, group, keys, head_dim, bits
    (1, 1, 1, 1, 16, 32),
    (2, 3, 3, 37, 16, 64),
    (1, 2, 4, 513, 32, 128),
    (3, 2, 2, 700, 8, 256),
    (2, 2, 3, 129, 16, 128),  # 128-bit codes, group of 3: the count-bit-plane path
    (1, 1, 16, 70, 8, 128),  # group of 16: the plain loop
]


def _data(b, h, g, n, d, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen) + 0.2
    values = torch.randn(b, h, n, d, generator=gen)
    query = torch.randn(b, h * g, d, generator=gen)
    w = torch.randn(h, d, bits, generator=gen)
    return query, keys, values, w


def _codes(query, keys, w):
    b, h_q, d = query.shape
    h = keys.shape[1]
    return ref.encode(query.reshape(b, h, h_q // h, d), w), ref.encode(keys, w)


@pytest.mark.parametrize("shape", SHAPES)
def test_encode_and_scores_exact(shape):
    query, keys, _, w = _data(*shape)
    qc, kc = _codes(query, keys, w)
    if keys.shape[2] > cpu.SMALL_ENCODE_ROWS:  # prefill path: the reference's matmul, then packing
        assert torch.equal(cpu.encode(keys, w), kc)
    assert torch.equal(cpu.hamming_scores(qc, kc), ref.hamming_scores(qc, kc))


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_small_encode(shape):
    """Decode-sized encodes are fused (fp32 multiply-add accumulation): bits equal the reference wherever
    the projection is not within rounding of 0."""
    query, keys, _, w = _data(*shape)
    for rows in (
        keys[:, :, :1],
        keys[:, :, : cpu.SMALL_ENCODE_ROWS],
        query.reshape(*keys.shape[:2], -1, keys.shape[3]),
    ):
        got, want = cpu.encode(rows, w), ref.encode(rows, w)
        bits = w.shape[-1]
        differ = unpack_bits(got, bits) != unpack_bits(want, bits)
        near_zero = torch.einsum("bhnd,hdr->bhnr", rows, w).abs() < 1e-4
        assert not bool((differ & ~near_zero).any())
    assert cpu.encode(keys[:, :, :0], w).shape[2] == 0


def _same_up_to_ties(chosen, expected, rank):
    """Same size, and the sorted ranks of the chosen keys equal those of the expected keys."""
    assert chosen.shape == expected.shape
    for a, e, r in zip(
        chosen.reshape(-1, chosen.shape[-1]),
        expected.reshape(-1, chosen.shape[-1]),
        rank.reshape(-1, rank.shape[-1]),
        strict=True,
    ):
        assert len(set(a.tolist())) == a.numel()
        assert torch.equal(r[a].sort().values, r[e].sort().values)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 5, 64, 600, 10_000])  # 10_000: budget beyond the context
def test_topk_equals_reference(shape, k):
    query, keys, _, w = _data(*shape)
    qc, kc = _codes(query, keys, w)
    for sink, recent in ((0, 0), (0, 1), (2, 3)):
        got = cpu.hamming_topk(qc, kc, k, sink, recent)
        want = ref.hamming_topk(qc, kc, k, sink, recent)
        assert torch.equal(got, want)
        assert got.shape[-1] == min(k, keys.shape[2])
        # against the selection path's torch.topk (arbitrary ties): same set up to ties
        n = keys.shape[2]
        if sink + recent <= min(k, n):
            budget = Budget(min(k, n), sink, recent)
            scores = -ref.hamming_scores(qc, kc).float()
            _same_up_to_ties(got, top_k_indices(scores, budget), ref.rank_keys(-scores, sink, recent))


def test_topk_with_padding_never_selects_padding_while_real_keys_remain():
    query, keys, _, w = _data(2, 2, 3, 300, 16, 128, seed=3)
    qc, kc = _codes(query, keys, w)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[0, :120] = False  # left padding of row 0
    for k in (50, 180, 250):
        got = cpu.hamming_topk(qc, kc, k, 1, 2, valid)
        assert torch.equal(got, ref.hamming_topk(qc, kc, k, 1, 2, valid))
        chosen_valid = valid[0][got[0]].sum(dim=-1)  # per KV head
        assert chosen_valid.tolist() == [min(k, 180)] * 2
        assert bool(valid[1][got[1]].all())


@pytest.mark.parametrize("k", [100, 2048, 5000, 8000])
def test_topk_sampled_threshold_is_exact_even_when_the_sample_misleads(k):
    """Above ``SAMPLE_KEYS`` keys the threshold is estimated from every ``step``-th key. Here the sampled
    (even) positions are all near the query and the others far, so the estimate undershoots for large
    k (the kernel must retry with every key) and overshoots for small k: both stay exact."""
    n = 2 * cpu.SAMPLE_KEYS + 3  # step 2
    gen = torch.Generator().manual_seed(11)
    qc = torch.randint(-(2**62), 2**62, (1, 2, 4, 2), generator=gen)
    kc = torch.randint(-(2**62), 2**62, (1, 2, n, 2), generator=gen)
    near = torch.arange(0, n, 2)
    kc[:, :, near] = qc[:, :, :1] ^ (torch.arange(near.numel()) % 7).view(1, 1, -1, 1)  # tiny distances
    for sink, recent in ((0, 1), (3, 5)):
        assert torch.equal(
            cpu.hamming_topk(qc, kc, k, sink, recent), ref.hamming_topk(qc, kc, k, sink, recent)
        )


def test_topk_reads_cache_views_in_place():
    """Codes kept in a growable buffer are a strided view; the kernel reads the buffer without a copy."""
    query, keys, values, w = _data(2, 2, 2, 100, 16, 128, seed=5)
    cache = LayerCache.from_prefill(keys[:, :, :60], values[:, :, :60])
    method = SimHash(bits=128)
    method.prepare(cache, 0)
    start = cache.append(keys[:, :, 60:], values[:, :, 60:])
    method.on_append(cache, 0, start)
    codes = method._codes(cache).view()
    assert not codes.is_contiguous()
    assert cpu.rows_buffer(codes).data_ptr() == codes.data_ptr()
    w0 = method.projection(0, 2, 16)
    qc = ref.encode(query.reshape(2, 2, 2, 16), w0)
    assert torch.equal(codes, ref.encode(keys, w0))
    assert torch.equal(cpu.hamming_topk(qc, codes, 17), ref.hamming_topk(qc, codes.contiguous(), 17))


def test_selection_method_uses_fused_topk():
    query, keys, values, _ = _data(2, 3, 2, 200, 16, 128, seed=7)
    cache = LayerCache.from_prefill(keys, values)
    method = SimHash(bits=128)
    method.prepare(cache, 4)
    budget = Budget(40, sink=2, recent=3)
    scores = method.scores(query, cache, 4)
    fused = method.select(query, cache, 4, budget)
    with kernels.use_backend("torch"):
        assert torch.equal(method.scores(query, cache, 4), scores)
        reference = method.select(query, cache, 4, budget)
    _same_up_to_ties(fused, top_k_indices(scores, budget), ref.rank_keys(-scores, 2, 3))
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_attention_equals_reference(shape, dtype, tol):
    query, keys, values, w = _data(*shape)
    query, keys, values = query.to(dtype), keys.to(dtype), values.to(dtype)
    qc, kc = _codes(query.float(), keys.float(), w)
    for k in (1, 63, 64, 65, 200):
        idx = ref.hamming_topk(qc, kc, k, 0, 1)
        got = cpu.gather_attention(query, keys, values, idx)
        want = ref.gather_attention(query, keys, values, idx)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_gather_attention_masks_and_dense_equivalence():
    query, keys, values, _ = _data(2, 2, 4, 150, 32, 128, seed=9)
    b, h, n, d = keys.shape
    everything = torch.arange(n).expand(b, h, n).contiguous()
    dense = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, h, 4, d), keys, values).reshape(
        b, h * 4, d
    )
    torch.testing.assert_close(
        cpu.gather_attention(query, keys, values, everything), dense, atol=2e-5, rtol=2e-5
    )
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, n, (b, h, 70), generator=gen)
    keep = torch.rand(b, 70, generator=gen) > 0.3
    valid = torch.rand(b, n, generator=gen) > 0.2
    valid[:, idx[:, 0, 0]] = True
    keep[:, 0] = True
    for scale in (None, 0.37):
        got = cpu.gather_attention(query, keys, values, idx, scale, keep, valid)
        want = ref.gather_attention(query, keys, values, idx, scale, keep, valid)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    scale = 1 / math.sqrt(d)
    torch.testing.assert_close(
        kernels.gather_attention(query, keys, values, idx, scale),
        ref.gather_attention(query, keys, values, idx, scale),
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_topk_attention_equals_topk_then_gather(shape, dtype, tol):
    """One kernel selects and attends per (batch, KV head): the reference's selection, then its
    attention, with and without code blocks, forced keys and padding (``valid`` masks both steps)."""
    query, keys, values, w = _data(*shape)
    query, keys, values = query.to(dtype), keys.to(dtype), values.to(dtype)
    _, kc = _codes(query.float(), keys.float(), w)
    b, h, n, d = keys.shape
    qc = cpu.encode(query.float().reshape(b, h, -1, d), w)  # the fused kernel's fp32 FMA encode
    blocks = _blocks_of(kc)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, : n // 3] = False
    for k, sink, recent, mask in (
        (1, 0, 1, None),
        (64, 2, 3, None),
        (600, 0, 1, valid),
        (10_000, 1, 1, valid),
    ):
        idx = ref.hamming_topk(qc, kc, k, sink, recent, mask)
        want = ref.gather_attention(query, keys, values, idx, 0.3, valid=mask)
        for key_blocks in (None, blocks):
            got = cpu.hamming_topk_attention(
                query, w, kc, keys, values, k, sink, recent, mask, 0.3, key_blocks
            )
            assert got.dtype == dtype and got.shape == query.shape
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, equal_nan=True)
        with kernels.use_backend("torch"):
            composed = kernels.hamming_topk_attention(query, w, kc, keys, values, k, sink, recent, mask, 0.3)
        torch.testing.assert_close(composed.float(), want.float(), atol=tol, rtol=tol, equal_nan=True)


def test_attend_equals_select_then_sparse_attention():
    """``SelectionMethod.attend`` is what a decode step calls: the hash methods' fused kernel and the
    default (select, then gather) give the same output, on the numba and the torch backends."""
    from lmexec.hata.attention import sparse_attention
    from lmexec.hata.selection import Quest

    query, keys, values, _ = _data(2, 3, 2, 300, 16, 128, seed=5)
    cache = LayerCache.from_prefill(keys, values)
    budget = Budget(40, sink=2, recent=3)
    for method in (SimHash(bits=128), Quest()):
        method.prepare(cache, 4)
        for backend in ("numba", "torch"):
            with kernels.use_backend(backend):
                indices = method.select(query, cache, 4, budget)
                want = sparse_attention(query, cache.keys, cache.values, indices, 0.25)
                got = method.attend(query, cache, 4, budget, 0.25)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_attend_with_padding_never_attends_padding():
    """With the cache's validity mask set and a budget larger than a row's real tokens, the selection
    must fall back to padding keys; both the fused and the default ``attend`` mask them out."""
    from lmexec.hata.selection.base import VALID_STATE, SelectionMethod

    query, keys, values, _ = _data(2, 2, 3, 90, 16, 128, seed=8)
    cache = LayerCache.from_prefill(keys, values)
    valid = torch.ones(2, 90, dtype=torch.bool)
    valid[1, :70] = False  # row 1: 20 real tokens, budget 40
    cache.state[VALID_STATE] = valid
    method = SimHash(bits=128)
    method.prepare(cache, 3)
    budget = Budget(40, sink=1, recent=2)
    fused = method.attend(query, cache, 3, budget, 0.25)
    composed = SelectionMethod.attend(method, query, cache, 3, budget, 0.25)
    torch.testing.assert_close(fused, composed, atol=2e-5, rtol=2e-5)
    # row 1 equals attention over its real tokens only (20 <= budget: all of them)
    real = ref.gather_attention(
        query[1:], keys[1:, :, 70:], values[1:, :, 70:], torch.arange(20).expand(1, 2, 20), 0.25
    )
    torch.testing.assert_close(fused[1:], real, atol=2e-5, rtol=2e-5)


def test_fp16_attention_falls_back_to_reference():
    query, keys, values, _ = _data(1, 2, 2, 40, 16, 128)
    idx = torch.arange(10).expand(1, 2, 10).contiguous()
    half = [t.half() for t in (query, keys, values)]
    got = kernels.gather_attention(*half, idx)
    assert torch.equal(got, ref.gather_attention(*half, idx))


def test_dispatch(monkeypatch):
    t = torch.zeros(1)
    assert kernels.backend_for(t) == "numba"
    with kernels.use_backend("torch"):
        assert kernels.backend_for(t) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.backend_for(t) == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(UserError, match="LMEXEC_HATA_KERNELS"):
        kernels.backend_for(t)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if kernels.triton_available():
        with pytest.raises(UserError, match="TRITON_INTERPRET"):
            kernels.backend_for(t)
    with pytest.raises(UserError):
        with kernels.use_backend("cuda"):
            pass


def _blocks_of(codes):
    b, h, n, words = codes.shape
    blocks = torch.zeros(
        b, h, -(-n // kernels.CODE_BLOCK_KEYS), kernels.CODE_BLOCK_KEYS * 8 * words, dtype=torch.uint8
    )
    kernels.write_code_blocks(blocks, 0, codes)
    return blocks


def test_code_blocks_layout():
    """Byte ``p`` (little-endian within the int64 words) of key ``32 * blk + j`` is at ``[., ., blk, 32p + j]``."""
    codes = torch.randint(-(2**62), 2**62, (2, 3, 70, 2), generator=torch.Generator().manual_seed(1))
    blocks = _blocks_of(codes)
    as_bytes = codes.contiguous().view(torch.uint8)  # [2, 3, 70, 16]
    for key in (0, 31, 32, 69):
        blk, j = divmod(key, 32)
        assert torch.equal(blocks[:, :, blk, j::32], as_bytes[:, :, key])


@pytest.mark.skipif(not cpu.FAST_SCAN, reason="the block scan needs AVX2")
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_scanning_code_blocks_equals_reference(shape):
    query, keys, _, w = _data(*shape)
    qc, kc = _codes(query, keys, w)
    blocks = _blocks_of(kc)
    assert cpu.code_blocks_usable(kc, blocks, qc.shape[2])
    n = keys.shape[2]
    valid = torch.ones(keys.shape[0], n, dtype=torch.bool)
    valid[0, : n // 3] = False
    for k in (1, 5, 64, 600, 10_000):
        for sink, recent in ((0, 0), (0, 1), (2, 3)):
            want = ref.hamming_topk(qc, kc, k, sink, recent)
            assert torch.equal(cpu.hamming_topk(qc, kc, k, sink, recent, key_blocks=blocks), want)
            padded = ref.hamming_topk(qc, kc, k, sink, recent, valid)
            assert torch.equal(cpu.hamming_topk(qc, kc, k, sink, recent, valid, key_blocks=blocks), padded)
    _, scores = cpu.hamming_topk(qc, kc, 3, return_scores=True, key_blocks=blocks)
    assert torch.equal(scores.long(), ref.hamming_scores(qc, kc))


@pytest.mark.skipif(not cpu.FAST_SCAN, reason="the block scan needs AVX2")
def test_topk_scanning_code_blocks_is_exact_when_the_sample_misleads():
    """Blocks are sampled whole (every ``step``-th block): here the sampled blocks are all near the query
    and the others far, so the estimate undershoots for large k and the kernel must rescan."""
    n = 64 * cpu.SAMPLE_KEYS + 5
    gen = torch.Generator().manual_seed(12)
    qc = torch.randint(-(2**62), 2**62, (1, 2, 4, 2), generator=gen)
    kc = torch.randint(-(2**62), 2**62, (1, 2, n, 2), generator=gen)
    step = -(-n // 32) // (cpu.SAMPLE_KEYS // 32)
    near = torch.cat([torch.arange(s, min(n, s + 32)) for s in range(0, n, 32 * step)])
    kc[:, :, near] = qc[:, :, :1] ^ (torch.arange(near.numel()) % 7).view(1, 1, -1, 1)
    blocks = _blocks_of(kc)
    for k in (100, 5000, 20_000):
        assert torch.equal(
            cpu.hamming_topk(qc, kc, k, 1, 1, key_blocks=blocks), ref.hamming_topk(qc, kc, k, 1, 1)
        )


def test_code_blocks_refused_when_stale_or_mismatched():
    _, keys, _, w = _data(1, 2, 4, 100, 16, 128)
    kc = ref.encode(keys, w)
    blocks = _blocks_of(kc)
    assert not cpu.code_blocks_usable(kc, blocks[:, :, :3], 4)  # covers 96 of 100 keys
    assert not cpu.code_blocks_usable(kc, blocks[:1, :1], 4)
    assert not cpu.code_blocks_usable(kc, blocks, cpu.MAX_SCAN_GROUP + 1)
    assert not cpu.code_blocks_usable(kc, None, 4)


def _keys_of(blocks, n):
    """Undo the block layout: the code bytes ``[B, H, n, bytes]`` of the first ``n`` keys."""
    b, h, n_blocks, width = blocks.shape
    per_key = width // kernels.CODE_BLOCK_KEYS
    keys = blocks.reshape(b, h, n_blocks, per_key, kernels.CODE_BLOCK_KEYS).transpose(-1, -2)
    return keys.reshape(b, h, n_blocks * kernels.CODE_BLOCK_KEYS, per_key)[:, :, :n]


@pytest.mark.parametrize("bits", [32, 128])
def test_hash_methods_keep_code_blocks_in_step_with_rows(bits, monkeypatch):
    """Prefill, then appends across block boundaries and a rewind (as the benchmark does): the block
    buffer always holds the row codes transposed, and selection through it equals the torch backend.
    32-bit codes fill half of their int64 word: the blocks hold the whole word (8 bytes per key)."""
    query, keys, values, _ = _data(2, 3, 2, 200, 16, bits, seed=9)
    if not kernels.code_blocks_wanted(keys):
        pytest.skip("code blocks are kept only where the AVX2 scan runs")
    fused_appends = []
    append_kernel = cpu.append_codes
    monkeypatch.setattr(
        cpu,
        "append_codes",
        lambda k, start, *a: (fused_appends.append(k.length - start), append_kernel(k, start, *a)),
    )
    cache = LayerCache.empty(2, 3, 16, capacity=64)  # small: the buffers (blocks too) grow on the way
    cache.append(keys[:, :, :61], values[:, :, :61])
    method = SimHash(bits=bits)
    method.prepare(cache, 0)
    budget = Budget(40, sink=1, recent=2)
    for stop in (62, 64, 65, 97, 130, 120, 200):
        if stop < cache.length:  # rewind, then overwrite
            for buffer in (cache.key_buffer, cache.value_buffer, method._codes(cache)):
                buffer.length = stop - 3
            cache.extras["simhash_code_blocks"].length = -(-(stop - 3) // 32)
        start = cache.append(keys[:, :, cache.length : stop], values[:, :, cache.length : stop])
        method.on_append(cache, 0, start)
        rows = method._codes(cache).view()
        blocks = cache.extras["simhash_code_blocks"].view()
        assert blocks.shape[2] == -(-stop // 32)
        assert cpu.code_blocks_usable(rows, blocks, 2)
        assert torch.equal(_keys_of(blocks, stop), rows.contiguous().view(torch.uint8))
        w = method.projection(0, 3, 16)
        assert torch.equal(rows[:, :, start:], cpu.encode(keys[:, :, start:stop], w))  # one fused call
        fused = method.select(query, cache, 0, budget)
        attended = method.attend(query, cache, 0, budget, 0.25)  # the kernel's arrays follow the growth
        with kernels.use_backend("torch"):
            assert torch.equal(fused, method.select(query, cache, 0, budget))
            torch.testing.assert_close(attended, method.attend(query, cache, 0, budget, 0.25))
    assert cache.extras["simhash_code_blocks"].reallocations >= 1
    assert cache.key_buffer.reallocations >= 1
    assert fused_appends == [61, 1, 2, 1, 32, 33, 3]  # decode sizes: one kernel call; the 83 rows: encode


def test_attend_after_the_buffers_are_replaced():
    """A beam reorder assigns new storage to every buffer: the kernels' handles follow, and decoding on
    equals decoding a cache built from the reordered keys."""
    query, keys, values, _ = _data(3, 2, 2, 150, 16, 128, seed=6)
    budget = Budget(30, sink=1, recent=2)
    perm = torch.tensor([2, 0, 1])
    cache = LayerCache.from_prefill(keys, values)
    method = SimHash(bits=128)
    method.prepare(cache, 0)
    method.attend(query, cache, 0, budget, 0.25)  # the kernels take their handles
    for buffer in (cache.key_buffer, cache.value_buffer, *cache.extras.values()):
        buffer.data = buffer.data.index_select(0, perm)
    fresh = LayerCache.from_prefill(keys[perm], values[perm])
    method.prepare(fresh, 0)
    new_k, new_v = keys[:, :, :1] + 1, values[:, :, :1]
    for c in (cache, fresh):
        method.on_append(c, 0, c.append(new_k, new_v))
    got = method.attend(query, cache, 0, budget, 0.25)
    torch.testing.assert_close(got, method.attend(query, fresh, 0, budget, 0.25), atol=0, rtol=0)
    with kernels.use_backend("torch"):
        torch.testing.assert_close(got, method.attend(query, cache, 0, budget, 0.25), atol=2e-5, rtol=2e-5)


def test_append_codes_refuses_buffers_it_would_overrun():
    from lmexec.hata.cache import GrowableBuffer

    keys = GrowableBuffer(1, 2, 16, torch.float32, capacity=40)
    keys.append(torch.randn(1, 2, 40, 16))
    w = torch.randn(2, 16, 128)
    codes = GrowableBuffer(1, 2, 2, torch.int64, capacity=40)
    blocks = GrowableBuffer(1, 2, kernels.code_block_bytes(2), torch.uint8, capacity=2)
    kernels.append_codes(keys, 0, w, codes, blocks)  # fits
    for bad in (
        dict(codes=GrowableBuffer(1, 2, 2, torch.int64, capacity=39)),
        dict(blocks=GrowableBuffer(1, 2, kernels.code_block_bytes(2), torch.uint8, capacity=1)),
        dict(blocks=GrowableBuffer(1, 2, 128, torch.uint8, capacity=2)),
        dict(w=torch.randn(2, 16, 256)),
        dict(w=torch.randn(3, 16, 128)),
        dict(start=41),
    ):
        args = {"keys": keys, "start": 0, "w": w, "codes": codes, "blocks": blocks, **bad}
        with pytest.raises(ValueError, match="append_codes"):
            kernels.append_codes(**args)


def test_append_codes_reads_bf16_keys_in_place():
    """A bf16 cache: the append kernel widens the stored keys itself, giving the codes of the fp32 keys."""
    _, keys, values, _ = _data(1, 2, 1, 80, 16, 128, seed=4)
    keys, values = keys.bfloat16(), values.bfloat16()
    cache = LayerCache.empty(1, 2, 16, dtype=torch.bfloat16, capacity=32)
    method = SimHash(bits=128)
    method.prepare(cache, 0)
    for stop in range(1, 80, 7):
        start = cache.append(keys[:, :, cache.length : stop], values[:, :, cache.length : stop])
        method.on_append(cache, 0, start)
    w = method.projection(0, 2, 16)
    rows = method._codes(cache).view()
    starts = [0, *range(1, 79, 7)]  # the appends: 0..1, 1..8, 8..15, ..., 71..78
    for start, stop in zip(starts, [*starts[1:], 78], strict=True):
        assert torch.equal(rows[:, :, start:stop], cpu.encode(keys[:, :, start:stop].float(), w))
    if kernels.code_blocks_wanted(rows):
        blocks = cache.extras["simhash_code_blocks"].view()
        assert torch.equal(_keys_of(blocks, 78), rows.contiguous().view(torch.uint8))


def test_exp_nonpositive_matches_numpy():
    """The gather's softmax exp, compiled with the gather's fastmath flags: within 6e-7 relative of
    exp, 0 below -87 and for -inf, NaN stays NaN."""
    x = np.concatenate([-np.logspace(-8, 2, 5000), [0.0, -87.0, -87.5, -1e30, -np.inf, np.nan]])
    x = x.astype(np.float32)
    got = _exp_all(x)
    want = np.exp(x.astype(np.float64))
    ok = x >= -87.0
    assert np.all(np.abs(got[ok] - want[ok]) <= 6e-7 * want[ok])
    assert np.all(got[x < -87.0] == 0.0)
    assert np.isnan(got[-1])


@nb.njit(cache=False, fastmath=cpu._FAST)
def _exp_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = cpu._exp_nonpositive(x[i])
    return out


def test_write_code_blocks_refuses_a_buffer_that_cannot_hold_the_keys():
    codes = torch.zeros(1, 2, 40, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="cannot hold"):
        cpu.write_code_blocks(torch.zeros(1, 2, 2, 128, dtype=torch.uint8), 0, codes)  # 4 bytes per key
    with pytest.raises(ValueError, match="cannot hold"):
        cpu.write_code_blocks(torch.zeros(1, 2, 1, 256, dtype=torch.uint8), 0, codes)  # one block for 40 keys


@pytest.mark.slow
def test_block_scan_without_avx2_codegen(tmp_path):
    """Where numba may not use AVX2 (here forced with ``NUMBA_CPU_NAME=generic``) the scan is not chosen,
    and the portable lookup it compiles to anyway is exact."""
    script = """
import torch
from lmexec.hata.kernels import cpu, reference as ref
assert not cpu.FAST_SCAN
gen = torch.Generator().manual_seed(3)
qc = torch.randint(-(2**62), 2**62, (1, 2, 4, 2), generator=gen)
kc = torch.randint(-(2**62), 2**62, (1, 2, 300, 2), generator=gen)
blocks = torch.zeros(1, 2, 10, 512, dtype=torch.uint8)
cpu.write_code_blocks(blocks, 0, kc)
assert not cpu.code_blocks_usable(kc, blocks, 4)
out = torch.empty(1, 2, 50, dtype=torch.int64)
scores = torch.empty(1, 2, 300, dtype=torch.int32)
cpu._hamming_topk_kernel(cpu._np(qc), cpu._np(kc), blocks.numpy(), True, 300, 50, 1, 1, cpu._DUMMY_MASK,
                         False, out.numpy(), scores.numpy(), True, cpu._workspace(2, 300))
assert torch.equal(out, ref.hamming_topk(qc, kc, 50, 1, 1))
assert torch.equal(scores.long(), ref.hamming_scores(qc, kc))
print("ok")
"""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_kernel_arguments_are_checked_before_any_unchecked_read(backend):
    q, keys = torch.randn(1, 4, 16), torch.randn(1, 2, 40, 16)
    with kernels.use_backend(backend):
        for bad in (40, -1, 10**9):
            with pytest.raises(ValueError, match="outside the 40 rows"):
                kernels.gather_attention(q, keys, keys, torch.full((1, 2, 3), bad))
        with pytest.raises(ValueError, match="must be"):
            kernels.gather_attention(
                q,
                torch.randn(2, 2, 40, 16),
                torch.randn(2, 2, 40, 16),
                torch.zeros(2, 2, 3, dtype=torch.long),
            )
        with pytest.raises(ValueError, match="valid must be a bool tensor"):
            kernels.gather_attention(
                q, keys, keys, torch.zeros(1, 2, 3, dtype=torch.long), valid=torch.ones(1, 40)
            )
        with pytest.raises(ValueError, match="encode"):
            kernels.encode(torch.randn(2, 3, 40, 16), torch.randn(1, 16, 64))
        codes = kernels.encode(torch.randn(2, 3, 40, 16), torch.randn(3, 16, 64))
        with pytest.raises(ValueError, match=r"valid has shape \[1, 3\]"):
            kernels.hamming_topk(codes[:, :, :2], codes, 4, valid=torch.ones(1, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="k must be >= 0, got -1"):
            kernels.hamming_topk(codes[:, :, :2], codes, -1)
        with pytest.raises(ValueError, match="key codes describe 40 keys but keys/values hold 30"):
            short = torch.randn(2, 3, 30, 16)
            kernels.hamming_topk_attention(
                torch.randn(2, 6, 16), torch.randn(3, 16, 64), codes, short, short, 4
            )


def test_no_selected_row_gives_zeros():
    """Attention over an empty selection is zeros (the dispatcher answers before choosing a backend)."""
    q, keys = torch.randn(1, 4, 16), torch.randn(1, 2, 40, 16)
    codes = kernels.encode(keys, torch.randn(2, 16, 64))
    none = torch.zeros(1, 2, 0, dtype=torch.long)
    assert torch.equal(kernels.gather_attention(q, keys, keys, none), torch.zeros(1, 4, 16))
    out = kernels.hamming_topk_attention(q, torch.randn(2, 16, 64), codes, keys, keys, 0)
    assert torch.equal(out, torch.zeros(1, 4, 16))


def test_the_fused_step_checks_w():
    q, keys = torch.randn(1, 4, 16), torch.randn(1, 2, 40, 16)
    codes = kernels.encode(keys, torch.randn(2, 16, 64))
    for bad in (torch.randn(1, 8, 64), torch.randn(2, 16, 128)):
        with pytest.raises(ValueError, match="W .* must be"):
            kernels.hamming_topk_attention(q, bad, codes, keys, keys, 4)


def test_fused_attention_over_no_keys_is_zero_as_the_composition_gives():
    """An empty cache (no codes) selects nothing: the CPU fused kernel divided by a zero total (NaN)."""
    query, _, _, w = _data(1, 2, 2, 1, 16, 64)
    codes = torch.zeros(1, 2, 0, 1, dtype=torch.int64)
    for n_rows in (0, 10):
        keys = values = torch.randn(1, 2, n_rows, 16)
        with kernels.use_backend("torch"):
            composed = kernels.hamming_topk_attention(query, w, codes, keys, values, 5)
        fused = kernels.hamming_topk_attention(query, w, codes, keys, values, 5)
        assert torch.equal(composed, torch.zeros_like(composed)) and torch.equal(fused, composed)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_codes_that_are_not_int64_words_are_refused(dtype):
    """int32 words were sign-extended into the popcount (scores above 64 for 32 bits) on one backend and
    read as zeros on the other."""
    query_codes = torch.zeros(1, 1, 2, 1, dtype=dtype)
    key_codes = torch.zeros(1, 1, 6, 1, dtype=dtype)
    for backend in ("torch", "numba"):
        with kernels.use_backend(backend), pytest.raises(ValueError, match="int64 words"):
            kernels.hamming_scores(query_codes, key_codes)
        with kernels.use_backend(backend), pytest.raises(ValueError, match="int64 words"):
            kernels.hamming_topk(query_codes, key_codes, 3)
