"""GPU kernels (Triton): encode, Hamming score + counting top-k, split-K gather decode attention.

Dispatched on CUDA tensors; the tests run them on CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is imported) against :mod:`.reference`.

* ``_encode_kernel``: one program per (batch x KV head, block of rows, 64-bit word): ``x @ W[:, 64w:64w+64]``
  with ``tl.dot`` (IEEE fp32), ``>= 0``, shifted and summed into the word (bit order version 1).
* ``_rank_kernel``: XOR + SWAR popcount of the packed words against the group's query codes, summed over
  the group, mapped to a rank bin (0 forced, ``1 + distance``, last bin padding) like the CPU kernel.
  Selection is a counting selection, deterministic and in position order: a histogram of the bins
  (``torch.bincount``) gives each (batch, KV head) its threshold bin and tie count; ``_count_kernel``
  counts per block, an exclusive scan gives block offsets, and ``_compact_kernel`` writes the chosen
  positions (ties to the earlier key), so the result equals the reference exactly.
* ``_attention_kernel``: flash-decoding: the index list of a (batch, KV head) is split into chunks, one
  program each; a program gathers its K/V rows by index, runs an online softmax for the group's query
  heads (padded to 16 rows for ``tl.dot``) and writes a partial output with its max and sum; the
  partials are merged by log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# SWAR popcount masks; compiled kernels may read a global only when it is a tl.constexpr (the
# interpreter does not enforce this: only a GPU run showed it)
M1 = tl.constexpr(0x5555555555555555)
M2 = tl.constexpr(0x3333333333333333)
M4 = tl.constexpr(0x0F0F0F0F0F0F0F0F)


@triton.jit
def _encode_kernel(x_ptr, w_ptr, out_ptr, N, H, D, R, WORDS, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    block = tl.program_id(1)
    word = tl.program_id(2)
    h = bh % H
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    cols = word * 64 + tl.arange(0, 64)
    x = tl.load(
        x_ptr + (bh * N + rows[:, None]) * D + dims[None, :],
        mask=(rows[:, None] < N) & (dims[None, :] < D),
        other=0.0,
    )
    w = tl.load(
        w_ptr + (h * D + dims[:, None]) * R + cols[None, :],
        mask=(dims[:, None] < D) & (cols[None, :] < R),
        other=0.0,
    )
    projected = tl.dot(x, w, input_precision="ieee")
    bits = ((projected >= 0) & (cols[None, :] < R)).to(tl.int64)
    shifts = tl.arange(0, 64).to(tl.int64)
    packed = tl.sum(bits << shifts[None, :], axis=1)
    tl.store(out_ptr + (bh * N + rows) * WORDS + word, packed, mask=rows < N)


@triton.jit
def _popcount(x):
    x = x - ((x >> 1) & M1)
    x = (x & M2) + ((x >> 2) & M2)
    x = (x + (x >> 4)) & M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return (x & 0x7F).to(tl.int32)


@triton.jit
def _rank_kernel(
    q_ptr,
    k_ptr,
    rank_ptr,
    dist_ptr,
    valid_ptr,
    N,
    H,
    G,
    W,
    stride_kb,
    stride_kh,
    sink,
    recent,
    pad_bin,
    HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    bh = tl.program_id(0)
    block = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.arange(0, BLOCK_W)
    live = rows < N
    keys = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + rows[:, None] * W + words[None, :],
        mask=live[:, None] & (words[None, :] < W),
        other=0,
    )
    distance = tl.zeros([BLOCK_N], dtype=tl.int32)
    for g in range(G):
        q = tl.load(q_ptr + (bh * G + g) * W + words, mask=words < W, other=0)
        distance += tl.sum(_popcount(keys ^ q[None, :]), axis=1)
    tl.store(dist_ptr + bh * N + rows, distance, mask=live)
    rank = distance + 1
    rank = tl.where((rows < sink) | (rows >= N - recent), 0, rank)
    if HAS_VALID:
        ok = tl.load(valid_ptr + b * N + rows, mask=live, other=1)
        rank = tl.where(ok != 0, rank, pad_bin)
    tl.store(rank_ptr + bh * N + rows, rank, mask=live)


@triton.jit
def _count_kernel(rank_ptr, thr_ptr, counts_ptr, N, NBLOCKS, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.load(rank_ptr + bh * N + rows, mask=rows < N, other=2147483647)
    threshold = tl.load(thr_ptr + bh)
    below = tl.sum((rank < threshold).to(tl.int32), axis=0)
    ties = tl.sum((rank == threshold).to(tl.int32), axis=0)
    tl.store(counts_ptr + (bh * NBLOCKS + block) * 2, below)
    tl.store(counts_ptr + (bh * NBLOCKS + block) * 2 + 1, ties)


@triton.jit
def _compact_kernel(rank_ptr, thr_ptr, need_ptr, offsets_ptr, out_ptr, N, K, NBLOCKS, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.load(rank_ptr + bh * N + rows, mask=rows < N, other=2147483647)
    threshold = tl.load(thr_ptr + bh)
    ties_needed = tl.load(need_ptr + bh)
    below_before = tl.load(offsets_ptr + (bh * NBLOCKS + block) * 2)
    ties_before = tl.load(offsets_ptr + (bh * NBLOCKS + block) * 2 + 1)
    is_below = (rank < threshold).to(tl.int32)
    is_tie = (rank == threshold).to(tl.int32)
    below_excl = below_before + tl.cumsum(is_below, axis=0) - is_below
    ties_excl = ties_before + tl.cumsum(is_tie, axis=0) - is_tie
    take = (is_below != 0) | ((is_tie != 0) & (ties_excl < ties_needed))
    position = below_excl + tl.minimum(ties_excl, ties_needed)
    tl.store(out_ptr + bh * K + position, rows.to(tl.int64), mask=take & (rows < N))


@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    keep_ptr,
    valid_ptr,
    part_ptr,
    stats_ptr,
    H,
    G,
    D,
    K,
    N,
    CHUNK,
    SPLITS,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    scale,
    HAS_KEEP: tl.constexpr,
    HAS_VALID: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + (bh * G + heads[:, None]) * D + dims[None, :],
        mask=(heads[:, None] < G) & (dims[None, :] < D),
        other=0.0,
    )
    q = q * scale
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start = split * CHUNK
    for offset in range(0, CHUNK, BLOCK_K):
        slots = start + offset + tl.arange(0, BLOCK_K)
        live = (slots < K) & (slots < start + CHUNK)
        rows = tl.load(idx_ptr + bh * K + slots, mask=live, other=0)
        use = live
        if HAS_KEEP:
            use = use & (tl.load(keep_ptr + b * K + slots, mask=live, other=0) != 0)
        if HAS_VALID:
            use = use & (tl.load(valid_ptr + b * N + rows, mask=live, other=0) != 0)
        dmask = dims[None, :] < D
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + dims[None, :],
            mask=use[:, None] & dmask,
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + dims[None, :],
            mask=use[:, None] & dmask,
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_K]
        s = tl.where(use[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    base = (bh * SPLITS + split) * BLOCK_G
    tl.store(part_ptr + (base + heads[:, None]) * BLOCK_D + dims[None, :], acc)
    tl.store(stats_ptr + (base + heads) * 2, m_i)
    tl.store(stats_ptr + (base + heads) * 2 + 1, l_i)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(max(1, n)))


def encode(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    r = w.shape[-1]
    words = (r + 63) // 64
    out = torch.empty(b, h, n, words, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    xf = x.float().contiguous()
    wf = w.float().contiguous().to(x.device)
    block_n = 16 if n <= 16 else 64
    grid = (b * h, triton.cdiv(n, block_n), words)
    _encode_kernel[grid](xf, wf, out, n, h, d, r, words, BLOCK_N=block_n, BLOCK_D=_pow2(d, 16))
    return out


def _key_strides(key_codes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if key_codes.stride(3) != 1 or key_codes.stride(2) != key_codes.shape[3]:
        key_codes = key_codes.contiguous()
    return key_codes, key_codes.stride(0), key_codes.stride(1)


def _ranks(query_codes, key_codes, sink, recent, valid):
    b, h, n, words = key_codes.shape
    g = query_codes.shape[2]
    keys, stride_b, stride_h = _key_strides(key_codes)
    queries = query_codes.contiguous()
    ranks = torch.empty(b * h, n, dtype=torch.int32, device=key_codes.device)
    distance = torch.empty(b * h, n, dtype=torch.int32, device=key_codes.device)
    pad_bin = g * words * 64 + 2
    valid_t = valid.to(torch.int8).contiguous() if valid is not None else ranks
    block_n = 128
    grid = (b * h, triton.cdiv(n, block_n))
    _rank_kernel[grid](
        queries,
        keys,
        ranks,
        distance,
        valid_t,
        n,
        h,
        g,
        words,
        stride_b,
        stride_h,
        sink,
        recent,
        pad_bin,
        HAS_VALID=valid is not None,
        BLOCK_N=block_n,
        BLOCK_W=_pow2(words),
    )
    return ranks, distance, pad_bin + 1


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = key_codes.shape
    if n == 0:
        return torch.zeros(b, h, 0, dtype=torch.int64, device=key_codes.device)
    _, distance, _ = _ranks(query_codes, key_codes, 0, 0, None)
    return distance.view(b, h, n).long()


def hamming_topk(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    b, h, n, _ = key_codes.shape
    k = min(k, n)
    out = torch.empty(b * h, k, dtype=torch.int64, device=key_codes.device)
    if k == 0:
        return out.view(b, h, 0)
    ranks, _, n_bins = _ranks(query_codes, key_codes, sink, recent, valid)
    rows = b * h
    offsets = torch.arange(rows, device=ranks.device)[:, None] * n_bins
    hist = torch.bincount((ranks.long() + offsets).view(-1), minlength=rows * n_bins).view(rows, n_bins)
    cumulative = hist.cumsum(dim=1)
    threshold = (cumulative < k).sum(dim=1)  # first bin whose cumulative count reaches k
    below = torch.where(
        threshold > 0,
        cumulative.gather(1, (threshold - 1).clamp_min(0)[:, None])[:, 0],
        torch.zeros_like(threshold),
    )
    ties_needed = (k - below).to(torch.int32).contiguous()
    threshold = threshold.to(torch.int32).contiguous()
    block_n = 128
    n_blocks = triton.cdiv(n, block_n)
    counts = torch.empty(rows, n_blocks, 2, dtype=torch.int32, device=ranks.device)
    _count_kernel[(rows, n_blocks)](ranks, threshold, counts, n, n_blocks, BLOCK_N=block_n)
    block_offsets = (counts.cumsum(dim=1) - counts).to(torch.int32).contiguous()
    _compact_kernel[(rows, n_blocks)](
        ranks, threshold, ties_needed, block_offsets, out, n, k, n_blocks, BLOCK_N=block_n
    )
    return out.view(b, h, k)


def gather_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    b, h_q, d = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g = h_q // h
    k_count = indices.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if keys.stride(3) != 1:
        keys = keys.contiguous()
    if values.stride(3) != 1:
        values = values.contiguous()
    q = query.reshape(b, h, g, d).float().contiguous()
    idx = indices.to(torch.int64).contiguous()
    block_k = 32 if k_count <= 32 else 64
    splits = max(1, min(triton.cdiv(k_count, block_k), 32))
    chunk = triton.cdiv(triton.cdiv(k_count, splits), block_k) * block_k
    splits = triton.cdiv(k_count, chunk)
    block_g, block_d = _pow2(g, 16), _pow2(d, 16)
    part = torch.empty(b * h, splits, block_g, block_d, dtype=torch.float32, device=query.device)
    stats = torch.empty(b * h, splits, block_g, 2, dtype=torch.float32, device=query.device)
    keep_t = keep.to(torch.int8).contiguous() if keep is not None else idx
    valid_t = valid.to(torch.int8).contiguous() if valid is not None else idx
    _attention_kernel[(b * h, splits)](
        q,
        keys,
        values,
        idx,
        keep_t,
        valid_t,
        part,
        stats,
        h,
        g,
        d,
        k_count,
        n,
        chunk,
        splits,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        scale,
        HAS_KEEP=keep is not None,
        HAS_VALID=valid is not None,
        BLOCK_G=block_g,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    m, l = stats[..., 0], stats[..., 1]  # [BH, S, BLOCK_G]
    top = m.max(dim=1, keepdim=True).values
    weight = torch.exp(m - top)  # NaN only where a whole row was dropped, as in the reference
    total = (l * weight).sum(dim=1)
    out = (part * weight[..., None]).sum(dim=1) / total[..., None]
    out = out[:, :g, :d].reshape(b, h_q, d)
    return out.to(query.dtype)
