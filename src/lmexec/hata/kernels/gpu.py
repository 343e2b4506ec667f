"""GPU kernels (Triton): encode, Hamming score + counting top-k, split-K gather decode attention.

Dispatched on CUDA tensors; the tests run them on CPU tensors under ``TRITON_INTERPRET=1`` (set before
triton is imported) against :mod:`.reference`.

* ``_encode_kernel``: one program per (batch x KV head, block of rows, 64-bit word): ``x @ W[:, 64w:64w+64]``
  with ``tl.dot`` (IEEE fp32), ``>= 0``, shifted and summed into the word (bit order version 1).
* ``_rank_kernel``: XOR + popcount (hardware ``popc``; a SWAR bit trick under the interpreter) of the
  packed words against the group's query codes, summed over the group, mapped to a rank bin (0 forced,
  ``1 + distance``, last bin padding) like the CPU kernel, and each block's histogram of the bins
  (``tl.histogram``) added into the (batch, KV head)'s; ``hamming_scores`` runs it with ``SCORES_ONLY``
  (plain distances, no histogram).
  Selection is a counting selection, deterministic and in position order, with no host round trip:
  the histogram gives each (batch, KV head) its threshold bin and tie count; ``_count_kernel`` counts
  per block, and ``_compact_kernel`` sums the counts of the blocks before its own and writes the chosen
  positions (ties to the earlier key), so the result equals the reference exactly. (A first version
  took the histogram with ``torch.bincount``: 1.1 ms of a 2.4 ms step at 128K x batch 8 on an H200,
  its global atomics all landing on a few bins, plus a host synchronisation.)
* ``_attention_kernel``: flash-decoding: the index list of a (batch, KV head) is split into chunks, one
  program each; a program gathers its K/V rows by index, runs an online softmax for the group's query
  heads (padded to 16 rows for ``tl.dot``) and writes a partial output with its max and sum; the
  partials are merged by log-sum-exp.
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.language.extra import libdevice

from lmexec.hata.kernels import triton_interpreting

# SWAR popcount masks; compiled kernels may read a global only when it is a tl.constexpr (the
# interpreter does not enforce this: only a GPU run showed it)
M1 = tl.constexpr(0x5555555555555555)
M2 = tl.constexpr(0x3333333333333333)
M4 = tl.constexpr(0x0F0F0F0F0F0F0F0F)


@triton.jit
def _encode_kernel(x_ptr, w_ptr, out_ptr, N, H, D, R, WORDS, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x H x N x d passes 2**31 at long contexts
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
def _popcount(x, HW_POPCOUNT: tl.constexpr):
    if HW_POPCOUNT:  # one POPC per 32 bits; the interpreter has no libdevice
        return libdevice.popc(x)
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
    valid_ptr,
    hist_ptr,
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
    SCORES_ONLY: tl.constexpr,
    HW_POPCOUNT: tl.constexpr,
    NBINS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x H x N x d passes 2**31 at long contexts
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
        distance += tl.sum(_popcount(keys ^ q[None, :], HW_POPCOUNT), axis=1)
    if SCORES_ONLY:
        tl.store(rank_ptr + bh * N + rows, distance, mask=live)
    else:
        rank = distance + 1
        rank = tl.where((rows < sink) | (rows >= N - recent), 0, rank)
        if HAS_VALID:
            ok = tl.load(valid_ptr + b * N + rows, mask=live, other=1)
            rank = tl.where(ok != 0, rank, pad_bin)
        tl.store(rank_ptr + bh * N + rows, rank, mask=live)
        # this block's share of the (batch, KV head)'s histogram of ranks; rows past N land in the last
        # bin, which no rank reaches (NBINS > pad_bin + 1) and which is never added
        hist = tl.histogram(tl.where(live, rank, NBINS - 1), NBINS)
        bins = tl.arange(0, NBINS)
        tl.atomic_add(hist_ptr + bh * NBINS + bins, hist, mask=(hist > 0) & (bins < NBINS - 1))


@triton.jit
def _threshold(hist_ptr, bh, K, NBINS: tl.constexpr):
    """The rank bin where the K-th smallest rank falls and how many of its keys are taken."""
    hist = tl.load(hist_ptr + bh * NBINS + tl.arange(0, NBINS))
    cumulative = tl.cumsum(hist, axis=0)
    threshold = tl.sum((cumulative < K).to(tl.int32), axis=0)
    below = tl.sum(tl.where(tl.arange(0, NBINS) < threshold, hist, 0), axis=0)
    return threshold, K - below


@triton.jit
def _count_kernel(rank_ptr, hist_ptr, counts_ptr, N, K, NBLOCKS, NBINS: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x H x N x d passes 2**31 at long contexts
    block = tl.program_id(1)
    threshold, _ = _threshold(hist_ptr, bh, K, NBINS)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.load(rank_ptr + bh * N + rows, mask=rows < N, other=2147483647)
    below = tl.sum((rank < threshold).to(tl.int32), axis=0)
    ties = tl.sum((rank == threshold).to(tl.int32), axis=0)
    tl.store(counts_ptr + (bh * NBLOCKS + block) * 2, below)
    tl.store(counts_ptr + (bh * NBLOCKS + block) * 2 + 1, ties)


@triton.jit
def _compact_kernel(
    rank_ptr, hist_ptr, counts_ptr, out_ptr, N, K, NBLOCKS,
    NBINS: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x H x N x d passes 2**31 at long contexts
    block = tl.program_id(1)
    threshold, ties_needed = _threshold(hist_ptr, bh, K, NBINS)
    # the earlier blocks' counts, SCAN at a time: a block count in a constexpr would recompile the
    # kernel each time a growing cache passes a power of two of blocks
    below_before = tl.zeros([], dtype=tl.int32)
    ties_before = tl.zeros([], dtype=tl.int32)
    for start in range(0, block, SCAN):
        earlier = start + tl.arange(0, SCAN)
        before = earlier < block
        at = counts_ptr + (bh * NBLOCKS + earlier) * 2
        below_before += tl.sum(tl.load(at, mask=before, other=0), axis=0)
        ties_before += tl.sum(tl.load(at + 1, mask=before, other=0), axis=0)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.load(rank_ptr + bh * N + rows, mask=rows < N, other=2147483647)
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
    LOW_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x H x N x d passes 2**31 at long contexts
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
        )
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + dims[None, :],
            mask=use[:, None] & dmask,
            other=0.0,
        )
        if LOW_PRECISION:  # bf16/fp16 rows: tensor-core products, fp32 accumulation (as dense SDPA)
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        else:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_K]
        s = tl.where(use[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if LOW_PRECISION:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    base = (bh * SPLITS + split) * BLOCK_G
    tl.store(part_ptr + (base + heads[:, None]) * BLOCK_D + dims[None, :], acc)
    tl.store(stats_ptr + (base + heads) * 2, m_i)
    tl.store(stats_ptr + (base + heads) * 2 + 1, l_i)


@triton.jit
def _merge_kernel(
    part_ptr, stats_ptr, out_ptr, G, D, SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp merge of a (batch, KV head)'s split partials into its query heads' outputs. A head
    whose every split saw no usable row (max -inf) comes out NaN, as in the reference."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B x H x N x d passes 2**31 at long contexts
    splits = tl.arange(0, BLOCK_S)
    heads = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    at = (bh * SPLITS + splits[:, None]) * BLOCK_G + heads[None, :]  # [BLOCK_S, BLOCK_G]
    there = (splits < SPLITS)[:, None]
    m = tl.load(stats_ptr + at * 2, mask=there, other=float("-inf"))
    l_sum = tl.load(stats_ptr + at * 2 + 1, mask=there, other=0.0)
    top = tl.max(m, axis=0)
    total = tl.sum(l_sum * tl.exp(m - top[None, :]), axis=0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for split in range(SPLITS):
        row = (bh * SPLITS + split) * BLOCK_G + heads
        weight = tl.exp(tl.load(stats_ptr + row * 2) - top)
        acc += tl.load(part_ptr + row[:, None] * BLOCK_D + dims[None, :]) * weight[:, None]
    out = acc / total[:, None]
    tl.store(
        out_ptr + (bh * G + heads[:, None]) * D + dims[None, :],
        out,
        mask=(heads[:, None] < G) & (dims[None, :] < D),
    )


def _tensor_core_rows(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """bf16/fp16 K/V rows are multiplied in their own precision on the tensor cores (fp32 accumulation),
    as dense SDPA does; fp32 rows in IEEE fp32. Measured on an H200 at 128K x batch 8, bf16 rows widened
    to fp32 first made the attention kernel 9x slower than on fp32 rows (1.42 vs 0.15 ms). Not under the
    interpreter, whose ``tl.dot`` gives garbage for bf16 operands (seen with triton 3.9)."""
    low = (torch.bfloat16, torch.float16)
    return keys.is_cuda and keys.dtype in low and values.dtype == keys.dtype


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


COUNT_SCAN = 256
"""Earlier blocks' counts the compaction kernel sums per loop step."""


def _rank_block(words: int) -> int:
    """Keys per program of the rank, count and compact kernels (fewer for wide codes: registers)."""
    return min(1024, 4096 // _pow2(words))


def _ranks(query_codes, key_codes, sink, recent, valid, scores_only=False):
    """Rank bins ``[B*H, N]`` (int32), their histogram ``[B*H, NBINS]`` and the keys per program.

    ``scores_only``: write the plain distances into the ranks instead (no sink/recent/padding bins) and
    skip the histogram, which only the selection needs."""
    b, h, n, words = key_codes.shape
    g = query_codes.shape[2]
    keys, stride_b, stride_h = _key_strides(key_codes)
    queries = query_codes.contiguous()
    ranks = torch.empty(b * h, n, dtype=torch.int32, device=key_codes.device)
    pad_bin = g * words * 64 + 2
    n_bins = _pow2(pad_bin + 2)  # one spare bin past the padding's, for rows past N
    hist = ranks if scores_only else torch.zeros(b * h, n_bins, dtype=torch.int32, device=key_codes.device)
    valid_t = valid.to(torch.int8).contiguous() if valid is not None else ranks
    block = _rank_block(words)
    grid = (b * h, triton.cdiv(n, block))
    _launch_rank(
        grid,
        queries,
        keys,
        ranks,
        valid_t,
        hist,
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
        SCORES_ONLY=scores_only,
        NBINS=n_bins,
        BLOCK_N=block,
        BLOCK_W=_pow2(words),
    )
    return ranks, hist, block


_hw_popcount = [True]
"""Whether the compiled rank kernel uses libdevice's popcount (cleared if this Triton cannot build it)."""


def _launch_rank(grid, *args, **kwargs) -> None:
    if _hw_popcount[0] and not triton_interpreting():
        try:
            _rank_kernel[grid](*args, HW_POPCOUNT=True, **kwargs)
            return
        except CompilationError as error:  # an older or newer Triton without libdevice.popc
            if "popc" not in str(error):
                raise
            warnings.warn(f"HATA rank kernel without hardware popcount: {error}", stacklevel=3)
            _hw_popcount[0] = False
    _rank_kernel[grid](*args, HW_POPCOUNT=False, **kwargs)


def hamming_scores(query_codes: torch.Tensor, key_codes: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = key_codes.shape
    if n == 0:
        return torch.zeros(b, h, 0, dtype=torch.int64, device=key_codes.device)
    distance, _, _ = _ranks(query_codes, key_codes, 0, 0, None, scores_only=True)
    return distance.view(b, h, n).long()


def hamming_topk(
    query_codes: torch.Tensor,
    key_codes: torch.Tensor,
    k: int,
    sink: int = 0,
    recent: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Counting selection in three kernels and no host synchronisation: ranks + histogram, per-block
    counts below / at the threshold bin, then each block writes its chosen positions at offsets summed
    from the counts of the blocks before it."""
    b, h, n, _ = key_codes.shape
    k = min(k, n)
    out = torch.empty(b * h, k, dtype=torch.int64, device=key_codes.device)
    if k == 0:
        return out.view(b, h, 0)
    ranks, hist, block = _ranks(query_codes, key_codes, sink, recent, valid)
    rows, n_bins = hist.shape
    n_blocks = triton.cdiv(n, block)
    counts = torch.empty(rows, n_blocks, 2, dtype=torch.int32, device=ranks.device)
    _count_kernel[(rows, n_blocks)](ranks, hist, counts, n, k, n_blocks, NBINS=n_bins, BLOCK_N=block)
    _compact_kernel[(rows, n_blocks)](
        ranks, hist, counts, out, n, k, n_blocks, NBINS=n_bins, BLOCK_N=block, SCAN=COUNT_SCAN
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
        LOW_PRECISION=_tensor_core_rows(keys, values),
        BLOCK_G=block_g,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    out = torch.empty(b, h_q, d, dtype=query.dtype, device=query.device)
    _merge_kernel[(b * h,)](
        part, stats, out, g, d, splits, BLOCK_S=_pow2(splits), BLOCK_G=block_g, BLOCK_D=block_d
    )
    return out
